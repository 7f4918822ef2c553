"""predict as a distributed, resumable job: the same bytes from 1 or 2 processes, 1 or 2 machines, or after a kill."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from mnist_dist.data import mnist

from conftest import ROOT, accelerate_launch, cpu_env, run, wait_for, write_test_pngs

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
        assert proc.returncode != 0  # the broken file failed, under the launcher too
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


def test_sigkill_then_resume_gives_the_uninterrupted_file(exported_model, tmp_path):
    pixels, _ = mnist.load_split("test")
    np.save(tmp_path / "digits.npy", pixels[:6000].numpy())
    args = [tmp_path / "digits.npy", "--model", exported_model / "model.onnx", "--chunk-size", 50, "--threads", 1]
    straight = predict_job(*args, "--out", tmp_path / "straight.csv", check=True)
    assert "6000 inputs, 0 failed" in straight.stderr

    out = tmp_path / "killed.csv"
    parts = tmp_path / ".killed.csv.parts"
    job = subprocess.Popen([sys.executable, "jobs/predict.py", *map(str, args), "--out", str(out)], cwd=ROOT,
                           env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(list(parts.glob("*.part"))) >= 5)
        job.send_signal(signal.SIGKILL)
        assert job.wait(timeout=60) == -signal.SIGKILL
    finally:
        job.kill()
    done = sorted(parts.glob("*.part"))
    assert not out.exists() and 5 <= len(done) < 100  # killed mid-run: chunks on disk, no output yet

    # The unfinished run is not mixed with another model's or other inputs' labels.
    other_model = predict_job(*args[:1], "--model", exported_model / "model.int8.onnx", *args[3:], "--out", out,
                              "--resume")
    assert "had other model" in one_error(other_model)
    np.save(tmp_path / "fewer.npy", pixels[:5000].numpy())
    other_inputs = predict_job(tmp_path / "fewer.npy", *args[1:], "--out", out, "--resume")
    assert "had other inputs, total" in one_error(other_inputs)
    assert sorted(parts.glob("*.part")) == done and not out.exists()

    resumed = predict_job(*args, "--out", out, "--resume", "--summary", tmp_path / "summary.json", check=True)
    assert out.read_bytes() == (tmp_path / "straight.csv").read_bytes()
    assert not parts.exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["inputs"], summary["failed"]) == (6000, 0)
    assert summary["resumed_inputs"] == 50 * len(done)  # the finished chunks were kept, not labelled again
    assert "6000 inputs, 0 failed" in resumed.stderr


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
    cases = [
        ([tmp_path / "empty", "--model", model], "holds no images"),
        ([digit_folder, "--model", tmp_path / "absent.onnx"], "does not exist"),
        ([digit_folder, "--model", corrupt / "model.onnx"], "sha256 mismatch"),
    ]
    for args, message in cases:
        for processes in (1, 2):
            assert message in one_error(predict_job(*args, "--out", out, processes=processes))
    assert "--out" in one_error(predict_job(digit_folder, "--model", model, "--out", tmp_path / "no" / "p.csv"))
    assert list(tmp_path.glob("*preds*")) == []


def test_two_machines_on_loopback_write_one_file(exported_model, digit_folder, tmp_path):
    args = [digit_folder, "--model", exported_model / "model.onnx", "--chunk-size", 5]
    predict_job(*args, "--out", tmp_path / "one.csv")
    port = 29_500 + (hash(str(tmp_path)) % 1000)
    machines = ["--multi_gpu", "--num_machines", 2, "--num_processes", 2, "--main_process_ip", "127.0.0.1",
                "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *machines]
    job = ["jobs/predict.py", *args, "--out", tmp_path / "two.csv"]
    env = cpu_env(ACCELERATE_USE_CPU="1")
    worker = subprocess.Popen([str(a) for a in [*launch, "--machine_rank", 1, *job]], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        main = run([*launch, "--machine_rank", 0, *job], env=env, timeout=300, check=False)
        assert worker.wait(timeout=120) != 0  # the broken file: both machines end non-zero
    finally:
        worker.kill()
    assert "32 inputs, 1 failed" in main.stderr and "process 1:" in main.stderr
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
