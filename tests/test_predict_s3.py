"""predict where the data live: inputs and --out in an S3-compatible store (moto's server, on loopback), no shared
file system, the same rows as from local disk; a broken store is one line, never a hang."""
import io
import json
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mnist_dist.bench.predict import start_moto
from mnist_dist.cli import predict
from mnist_dist.data import mnist
from mnist_dist.inference.chunks import chunk_size

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

    # A bad object among good ones is a row, not a failed job: exit 0 under the launcher, one line, no traceback.
    two = run(launch_cmd("jobs/predict.py", "s3://digits/scans/", *model, "--out", "s3://digits/out/two.parquet"),
              env=cpu_env(ACCELERATE_USE_CPU="1"), check=False)
    assert two.returncode == 0, two.stderr
    assert "16 inputs, 1 failed" in two.stderr and "process 1:" in two.stderr and "Traceback" not in two.stderr
    assert "1 of 16 inputs failed; their rows say why" in two.stderr
    code, _ = in_process("s3://digits/scans/", *model, "--out", "s3://digits/out/one.parquet")
    assert code == 0
    assert in_process(local, *model, "--out", tmp_path / "local.parquet")[0] == 0
    # --max-failed 0, the old way: every process exits 2, once the output is written.
    strict = run(launch_cmd("jobs/predict.py", "s3://digits/scans/", *model, "--out", "s3://digits/strict.parquet",
                            "--max-failed", 0), env=cpu_env(ACCELERATE_USE_CPU="1"), check=False)
    assert root_cause_exit_code(strict.stderr) == 2, strict.stderr
    assert re.findall(r"exitcode\s*:\s*(-?\d+)", strict.stderr) == ["2"] * len(re.findall("exitcode", strict.stderr))
    assert "more than --max-failed 0 allows" in strict.stderr
    assert pq.read_table("digits/strict.parquet", filesystem=s3).to_pylist() == \
        pq.read_table("digits/out/two.parquet", filesystem=s3).to_pylist()
    s3.rm("digits/strict.parquet")
    assert sorted(s3.find("digits/out")) == ["digits/out/one.parquet", "digits/out/two.parquet"]  # parts, leases gone

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
    assert not s3.exists("digits/killed/.preds.csv.lease")  # the workers' clean stop released the lease

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


def lease_age(s3, path: str) -> float:
    """Seconds since the lease object at ``path`` was last written, by the store's clock."""
    written = s3.info(path, refresh=True)["LastModified"]
    return (datetime.now(timezone.utc) - written).total_seconds()


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


def test_one_run_at_a_time_into_an_s3_output_and_a_dead_runs_lease_taken_over_once_stale(exported_model, s3,
                                                                                          tmp_path):
    array = io.BytesIO()
    np.save(array, np.concatenate([mnist.load_split("test")[0].numpy()] * 2))
    s3.pipe_file("digits/lease/digits.npy", array.getvalue())
    out, lease = "s3://digits/lease/preds.csv", "digits/lease/.preds.csv.lease"
    common = ["s3://digits/lease/digits.npy", "--model", exported_model / "model.onnx", "--runtime", "onnxruntime",
              "--chunk-size", 64, "--threads", 1, "--batch-size", 16]
    job = [sys.executable, "jobs/predict.py", *common, "--out", out, "--lease-ttl", 3]
    # Two runs started together: exactly one proceeds, the other is refused in one line naming the holder.
    both = [subprocess.Popen([str(a) for a in job], cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    wait_for(lambda: any(p.poll() is not None for p in both), timeout=300)
    refused = next(p for p in both if p.poll() is not None)
    holder = json.loads(s3.cat_file(lease))
    errors = [line for line in refused.stderr.read().splitlines() if line.startswith("Error:")]
    assert refused.returncode == 1 and len(errors) == 1, errors
    assert f"--out {out} is in use by another run (pid {holder['pid']} on {holder['host']}" in errors[0]
    running = next(p for p in both if p is not refused)
    assert running.poll() is None and holder["pid"] == running.pid
    # The holder dies without a word (SIGKILL): its lease stays, and --resume takes it over only once stale.
    wait_for(lambda: len(finished_parts(s3, "digits/lease/.preds.csv.parts")) >= 10, timeout=300)
    running.kill()
    running.wait()
    early = run([*job, "--resume"], check=False)
    assert early.returncode == 1 and "--resume takes its lease over once it has not been renewed for 3 s" in \
        early.stderr, early.stderr
    wait_for(lambda: lease_age(s3, lease) > 4)
    resumed = run([*job, "--resume", "--summary", tmp_path / "summary.json"])
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_inputs"] >= 10 * 64
    assert not s3.exists(lease)  # released at the end
    assert in_process(*common, "--out", tmp_path / "straight.csv")[0] == 0
    assert s3.cat_file("digits/lease/preds.csv") == (tmp_path / "straight.csv").read_bytes()
    assert "kept from the run resumed" in resumed.stderr


def test_inputs_from_a_folder_and_a_bucket_in_one_job_are_each_read_from_their_own_place(exported_model, s3,
                                                                                          tmp_path):
    local = tmp_path / "held"
    write_test_pngs(local, 20, "digit_{:03d}.png")
    (local / "digit_005b.png").write_bytes(b"not an image")
    remote = tmp_path / "remote"
    write_test_pngs(remote, 12, "scan_{:03d}.png")
    s3.put(f"{remote}/", "digits/mixed/", recursive=True)
    model = ["--model", exported_model / "model.onnx", "--runtime", "onnxruntime"]
    for name, inputs in {"both": [local, "s3://digits/mixed/"], "local": [local], "remote": ["s3://digits/mixed/"]}\
            .items():
        assert in_process(*inputs, *model, "--out", tmp_path / f"{name}.jsonl")[0] == 0
    rows = {name: (tmp_path / f"{name}.jsonl").read_text().splitlines() for name in ("both", "local", "remote")}
    assert rows["both"] == rows["local"] + rows["remote"]
    assert sum(1 for row in rows["both"] if json.loads(row)["error"]) == 1  # only the broken file


def test_killed_workers_are_restarted_and_continue_from_the_finished_chunks(exported_model, s3, tmp_path):
    """accelerate launch --max_restarts 3 over a 200,000-row array in the bucket; one worker SIGKILLed twice."""
    array = io.BytesIO()
    np.save(array, np.concatenate([mnist.load_split("test")[0].numpy()] * 20))
    s3.pipe_file("digits/big/digits.npy", array.getvalue())
    args = ["s3://digits/big/digits.npy", "--model", exported_model / "model.onnx", "--runtime", "onnxruntime",
            "--chunk-size", 4096]
    env = cpu_env(ACCELERATE_USE_CPU="1")
    run(launch_cmd("jobs/predict.py", *args, "--out", "s3://digits/big/straight.csv"), env=env)
    parts = "digits/big/.preds.csv.parts"
    job = subprocess.Popen([str(a) for a in launch_cmd("jobs/predict.py", *args, "--out", "s3://digits/big/preds.csv",
                                                       "--summary", tmp_path / "summary.json", restarts=3)],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for kill in (1, 2):  # at 6, then 12 finished chunks (of 64): each time mid-run, after work was kept
            wait_for(lambda kill=kill: len(finished_parts(s3, parts)) >= 6 * kill, timeout=300)
            psutil.Process(job.pid).children()[-1].kill()  # a worker, not the launcher
        _, stderr = job.communicate(timeout=600)
    finally:
        job.kill()
    assert job.returncode == 0, stderr[-3000:]
    assert s3.cat_file("digits/big/preds.csv") == s3.cat_file("digits/big/straight.csv")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["restarts"] == 2 and summary["resumed_inputs"] >= 12 * chunk_size(200_000, 4096)
    assert "kept from the attempt before restart 2" in stderr
