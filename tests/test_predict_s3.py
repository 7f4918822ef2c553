"""predict where the data live: inputs and --out in an S3-compatible store (moto's server, on loopback), no shared
file system, the same rows as from local disk; a broken store is one line, never a hang."""
import io
import json
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mnist_dist.bench.predict import start_moto
from mnist_dist.cli import predict
from mnist_dist.data import mnist

from conftest import ROOT, cpu_env, free_port, launch_cmd, root_cause_exit_code, run, wait_for, write_test_pngs

pytestmark = pytest.mark.slow  # every test starts moto's S3 server and predict jobs


@pytest.fixture(scope="module")
def s3():
    """A bucket named "digits" on a real S3 endpoint on loopback, and a file system for the test's own looks."""
    server, endpoint = start_moto()
    try:
        with pytest.MonkeyPatch.context() as env:  # for the jobs started here and in this process alike
            for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
                env.setenv(name, value)
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("digits")
            yield fs
    finally:
        server.kill()


def in_process(*args) -> tuple:
    """(exit code, output) of `mnist-dist predict ARGS` run in this process: one process, no launcher."""
    result = CliRunner().invoke(predict, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_two_processes_on_the_bucket_write_what_one_process_and_local_disk_write(exported_model, s3, tmp_path):
    local = tmp_path / "scans"
    write_test_pngs(local, 15, "digit_{:03d}.png")
    (local / "digit_007b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    s3.put(f"{local}/", "digits/scans/", recursive=True)
    model = ["--model", exported_model / "model.onnx", "--chunk-size", 3]

    two = run(launch_cmd("jobs/predict.py", "s3://digits/scans/", *model, "--out", "s3://digits/out/two.parquet"),
              env=cpu_env(ACCELERATE_USE_CPU="1"), check=False)
    assert root_cause_exit_code(two.stderr) == 2, two.stderr  # the broken object, under the launcher too
    assert "16 inputs, 1 failed" in two.stderr and "process 1:" in two.stderr
    code, _ = in_process("s3://digits/scans/", *model, "--out", "s3://digits/out/one.parquet")
    assert code == 2
    assert in_process(local, *model, "--out", tmp_path / "local.parquet")[0] == 2
    assert sorted(s3.find("digits/out")) == ["digits/out/one.parquet", "digits/out/two.parquet"]  # parts gone

    two_rows, one_rows = (pq.read_table(f"digits/out/{n}.parquet", filesystem=s3).to_pylist() for n in ("two", "one"))
    local_rows = pq.read_table(tmp_path / "local.parquet").to_pylist()
    assert two_rows == one_rows
    assert [r["input"] for r in two_rows] == sorted(f"s3://digits/scans/{p.name}" for p in local.iterdir())
    assert [{**r, "input": r["input"].rsplit("/", 1)[1]} for r in two_rows] == \
        [{**r, "input": r["input"].rsplit("/", 1)[1]} for r in local_rows]
    broken = next(r for r in two_rows if r["input"].endswith("digit_007b.png"))
    assert broken["prediction"] is None and broken["top3"] == [] and "not a readable image" in broken["error"]
    assert sum(r["prediction"] == label for r, label in zip(two_rows, labels_in_name_order())) >= 14


def labels_in_name_order() -> list:
    """The labels of digit_000..digit_014 with the broken digit_007b.png (label -1) sorted in after digit_007."""
    labels = mnist.load_split("test")[1][:15].tolist()
    return [*labels[:8], -1, *labels[8:]]


def test_sigkill_mid_run_then_resume_on_one_process_gives_the_uninterrupted_rows(exported_model, s3, tmp_path):
    array = io.BytesIO()
    np.save(array, mnist.load_split("test")[0][:6000].numpy())
    s3.pipe_file("digits/arrays/digits.npy", array.getvalue())
    args = ["s3://digits/arrays/digits.npy", "--model", exported_model / "model.onnx", "--chunk-size", 50,
            "--runtime", "onnxruntime"]
    assert in_process(*args, "--out", tmp_path / "straight.csv")[0] == 0

    out, parts = "s3://digits/killed/preds.csv", "digits/killed/.preds.csv.parts"
    job = subprocess.Popen([str(a) for a in launch_cmd("jobs/predict.py", *args, "--out", out)], cwd=ROOT,
                           env=cpu_env(ACCELERATE_USE_CPU="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(finished_parts(s3, parts)) >= 6)
        workers = psutil.Process(job.pid).children(recursive=True)
        job.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, "workers outlived their killed launcher"
    finally:
        job.kill()
    done = finished_parts(s3, parts)
    assert 6 <= len(done) < 120 and not s3.exists("digits/killed/preds.csv")  # mid-run: parts, no output

    # Another model and batch size are refused, each named; the parts are left as they were.
    code, output = in_process(*args[:2], exported_model / "model.int8.onnx", *args[3:], "--batch-size", 64,
                              "--out", out, "--resume")
    assert code == 1 and output.count("Error:") == 1 and "had other --model" in output
    assert "--batch-size 256, not 64" in output
    assert finished_parts(s3, parts) == done

    code, output = in_process(*args, "--out", out, "--resume", "--summary", tmp_path / "summary.json")
    assert code == 0, output
    assert s3.cat_file("digits/killed/preds.csv") == (tmp_path / "straight.csv").read_bytes()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["inputs"], summary["resumed_inputs"]) == (6000, 50 * len(done))  # kept, not labelled again
    s3.invalidate_cache()
    assert not s3.exists(parts)


def finished_parts(s3, folder: str) -> list:
    """The chunk parts in ``folder`` (job.json sits beside them)."""
    return sorted(p for p in (s3.ls(folder, refresh=True) if s3.exists(folder) else []) if p.endswith(".part"))


def test_a_broken_store_is_one_line_and_no_hang(exported_model, s3):
    model = ["--model", exported_model / "model.onnx"]
    cases = {
        "the bucket no-such-bucket does not exist": ["s3://no-such-bucket/scans/", *model],
        "--out s3://no-such-bucket/p.csv is not writable (The specified bucket does not exist)":
            ["s3://digits/one.png", *model, "--out", "s3://no-such-bucket/p.csv"],
    }
    for message, args in cases.items():
        code, output = in_process(*args)
        assert code == 1 and output.count("Error:") == 1 and message in output, output

    # Refused credentials (a second server that checks them) and an unreachable endpoint: a job of its own, bounded.
    checking, checks_keys = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # a server that checks keys
    try:
        for endpoint, message in [(checks_keys, "Forbidden: check the credentials"),
                                  (f"http://127.0.0.1:{free_port()}", "Could not connect to the endpoint URL")]:
            started = time.monotonic()
            proc = run([sys.executable, "jobs/predict.py", "s3://digits/", *model], check=False, timeout=120,
                       env=cpu_env(AWS_ENDPOINT_URL=endpoint))
            errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
            assert proc.returncode == 1 and len(errors) == 1 and message in errors[0], proc.stderr
            assert "Traceback" not in proc.stderr and time.monotonic() - started < 60
    finally:
        checking.kill()
