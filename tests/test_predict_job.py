"""predict as a distributed job: the same bytes from 1 or 2 processes or 1 or 2 machines; bad jobs refused at once."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, accelerate_launch, cpu_env, free_port, root_cause_exit_code, run, write_test_pngs

pytestmark = pytest.mark.slow  # every test launches predict jobs

TWO_PROCESSES = ["--multi_gpu", "--num_processes", 2, "--num_machines", 1, "--mixed_precision", "no",
                 "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """31 test digits as PNGs (an odd number) and one broken file among them."""
    folder = tmp_path_factory.mktemp("digits")
    write_test_pngs(folder, 31, "digit_{:03d}.png")
    (folder / "digit_015b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


def predict_job(*args, processes=1, check=False, **kwargs):
    if processes == 1:
        return run([sys.executable, "jobs/predict.py", *args], check=check, **kwargs)
    return accelerate_launch(*TWO_PROCESSES, "jobs/predict.py", *args, env=cpu_env(ACCELERATE_USE_CPU="1"),
                             check=check, **kwargs)


def test_one_and_two_processes_write_the_same_bytes(exported_model, digit_folder, tmp_path):
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"{processes}.csv"
        # Chunks of 3: 32 inputs make 11 chunks, split 6 + 5, the last one short.
        proc = predict_job(digit_folder, "--model", exported_model / "model.onnx", "--out", out, "--chunk-size", 3,
                           "--summary", tmp_path / "summary.json", processes=processes)
        assert proc.returncode == 0, proc.stderr  # the broken file is a row, under the launcher too
        outputs[processes] = out.read_bytes()
        assert json.loads((tmp_path / "summary.json").read_text())["labelled_now"] == 32  # each input once
        assert not (tmp_path / f".{out.name}.parts").exists()
    assert outputs[1] == outputs[2]
    lines = outputs[1].decode().splitlines()
    assert len(lines) == 1 + 32
    assert [line.split(",")[0].rsplit("/", 1)[1] for line in lines[1:17]] == \
        [f"digit_{i:03d}.png" for i in range(16)]  # sorted paths: digit_015.png, then digit_015b.png
    broken = next(line for line in lines if "digit_015b.png" in line)
    assert broken.split(",")[1] == "" and "not a readable image" in broken


def test_summary_names_processes_runtimes_and_end_to_end_rate(exported_model, digit_folder, tmp_path):
    proc = predict_job(digit_folder, "--model", exported_model / "model.onnx", "--out", tmp_path / "p.json",
                       "--runtime", "onnxruntime", processes=2)
    summary = [line for line in proc.stderr.splitlines() if "inputs," in line]
    assert len(summary) == 1, proc.stderr
    assert "32 inputs, 1 failed" in summary[0] and "images/s end to end" in summary[0]
    assert "process 0: onnxruntime CPUExecutionProvider, 1 thread" in summary[0] and "process 1:" in summary[0]
    rows = json.loads((tmp_path / "p.json").read_text())  # the JSON array, whole
    assert len(rows) == 32 and sum(1 for r in rows if r["error"]) == 1


def one_error(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode not in (0, 2) and len(errors) == 1, proc.stderr
    return errors[0]


def test_bad_jobs_are_refused_in_one_line_and_write_nothing(exported_model, digit_folder, tmp_path):
    model = exported_model / "model.onnx"
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("manifest.json", "model.onnx"):
        (corrupt / name).write_bytes((exported_model / name).read_bytes())
    (corrupt / "model.onnx").write_bytes((corrupt / "model.onnx").read_bytes()[:3000])
    out = tmp_path / "preds.csv"
    # Two processes for the case every process must find for itself (the model each one opens); the refusal of
    # two processes that disagree is in the two-machine test.
    cases = [
        ([tmp_path / "empty", "--model", model], "holds no images", 1),
        ([digit_folder, "--model", tmp_path / "absent.onnx"], "does not exist", 1),
        ([digit_folder, "--model", corrupt / "model.onnx"], "sha256 mismatch", 1),
        ([digit_folder, "--model", corrupt / "model.onnx"], "sha256 mismatch", 2),
    ]
    for args, message, processes in cases:
        assert message in one_error(predict_job(*args, "--out", out, processes=processes))
    assert "--out" in one_error(predict_job(digit_folder, "--model", model, "--out", tmp_path / "no" / "p.csv"))
    assert list(tmp_path.glob("*preds*")) == []


def test_two_machines_on_loopback_write_one_file(exported_model, digit_folder, tmp_path):
    args = ["--model", exported_model / "model.onnx", "--chunk-size", 5]
    predict_job(digit_folder, *args, "--out", tmp_path / "one.csv")
    fewer = tmp_path / "fewer"
    shutil.copytree(digit_folder, fewer)
    (fewer / "digit_000.png").unlink()

    def two_machines(worker_inputs) -> tuple:
        """(main machine's stderr, worker machine's stderr), the worker given ``worker_inputs``."""
        machines = ["--multi_gpu", "--num_machines", 2, "--num_processes", 2, "--main_process_ip", "127.0.0.1",
                    "--main_process_port", free_port(), "--mixed_precision", "no", "--dynamo_backend", "no"]
        launch = [sys.executable, "-m", "accelerate.commands.launch", *machines]
        job = ["jobs/predict.py", *args, "--out", tmp_path / "two.csv"]
        env = cpu_env(ACCELERATE_USE_CPU="1")
        worker = subprocess.Popen([str(a) for a in [*launch, "--machine_rank", 1, *job[:1], worker_inputs, *job[1:]]],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            main = run([*launch, "--machine_rank", 0, *job[:1], digit_folder, *job[1:]], env=env, timeout=300,
                       check=False)
            return main.stderr, worker.communicate(timeout=120)[1]
        finally:
            worker.kill()

    # The second machine sees other files: one line from the main process, both end at once, nothing written.
    main, worker = two_machines(fewer)
    errors = [line for line in main.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: process 1 sees 31 inputs where the main process sees 32: every process must see the "
                      "same inputs (a shared file system or an object store)"], main
    assert root_cause_exit_code(main) == 1 and root_cause_exit_code(worker) == 1
    assert not (tmp_path / "two.csv").exists() and not (tmp_path / ".two.csv.parts").exists()

    main, worker = two_machines(digit_folder)
    assert "Root Cause" not in main and "Root Cause" not in worker  # the broken file is a row: both exit 0
    assert "32 inputs, 1 failed" in main and "process 1:" in main
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()


def test_predict_benchmark_quick_mode(exported_model, tmp_path):
    out = tmp_path / "bench.json"
    run([sys.executable, "jobs/bench_predict.py", "--quick", "--processes", "plain", "--sets", "jpegs,npy",
         "--model", exported_model / "model.onnx", "--work-dir", tmp_path / "sets", "--json", out])
    report = json.loads(out.read_text())
    assert {(r["set"], r["inputs"], r["variant"]) for r in report["results"]} == {
        ("jpegs", 20, "1 process, no launcher"), ("npy", 10_000, "1 process, no launcher")}
    for r in report["results"]:
        assert r["startup_s"] > 0 and r["wall_s"] > 0 and r["peak_rss_mb"] > 50  # quick mode measures little
        assert r["accuracy"] > 0.8, r  # the sets are labelled: predictions are scored
