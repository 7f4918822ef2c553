"""Bad input: one clear line, a non-zero exit, and nothing on disk overwritten."""
import sys

import pytest

from conftest import file_hashes, run, train_job

pytestmark = pytest.mark.slow  # every test starts a job to see it refused


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--batch-size", "-8"], "--batch-size must be a positive integer"),
        (["--resume", "missing.pt"], "does not exist"),
        (["--data-dir", "/nonexistent/mnist", "--no-download", "--resume", "latest", "--epochs", "2"],
         "MNIST not found under /nonexistent/mnist"),
        (["--epochs", "2"], "already holds a training run"),
    ],
)
def test_bad_input_leaves_an_existing_run_untouched(run_copy, args, message):
    before = file_hashes(run_copy)
    proc = train_job("--output-dir", run_copy, *args, check=False)
    assert_one_line_error(proc, message)
    assert file_hashes(run_copy) == before


def test_corrupt_resume_checkpoint(run_copy):
    bad = run_copy / "checkpoints" / "epoch_0002.pt"
    bad.write_bytes(b"not a checkpoint")
    before = file_hashes(run_copy)
    proc = train_job("--output-dir", run_copy, "--epochs", 3, "--resume", bad, check=False)
    assert_one_line_error(proc, "is corrupt or not a mnist-dist checkpoint")
    assert file_hashes(run_copy) == before


def test_truncated_resume_checkpoint(run_copy):
    good = run_copy / "checkpoints" / "epoch_0001.pt"
    truncated = run_copy / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    proc = train_job("--output-dir", run_copy, "--epochs", 3, "--resume", truncated, check=False)
    assert_one_line_error(proc, "truncated.pt is corrupt")


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    proc = train_job("--output-dir", blocker / "run", "--epochs", 1, check=False)
    assert_one_line_error(proc, "is not writable")
    assert blocker.read_text() == "keep me"


def test_onecycle_run_refuses_a_changed_epoch_count(tmp_path):
    out = tmp_path / "run"
    train_job("--output-dir", out, "--epochs", 2, "--limit-batches", 2, "--schedule", "onecycle")
    before = file_hashes(out)
    proc = train_job("--output-dir", out, "--epochs", 3, "--limit-batches", 2, "--schedule", "onecycle",
                     "--resume", "latest", check=False)
    assert_one_line_error(proc, "planned for 2 epochs", "--epochs 2")
    assert file_hashes(out) == before


def cli(*args, **kwargs):
    return run([sys.executable, "-m", "mnist_dist.cli", *args], check=False, **kwargs)


def test_output_files_are_checked_before_any_work(trained_run, exported_model, tmp_path):
    missing = tmp_path / "no-such-folder"
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    model = exported_model / "model.onnx"
    cases = [
        (["predict", exported_model, "--model", model, "--out", missing / "preds.csv"], "does not exist"),
        (["bench", "--model-dir", exported_model, "--json", blocker / "bench.json"], "is not a folder"),
        (["evaluate", trained_run, "--json", missing / "metrics.json"], "does not exist"),
        (["preview", "--out", missing / "grid.png"], "does not exist"),
        (["preview", "--out", tmp_path], "is a directory"),
    ]
    for args, message in cases:
        proc = cli(*args)
        assert_one_line_error(proc, message)
        # Refused up front: none of the work's own output (results, tables, summaries) was printed.
        assert proc.stdout == "" and "inputs," not in proc.stderr, args
    assert not missing.exists() and blocker.read_text() == "keep me"


@pytest.mark.parametrize("args, message", [
    (["quantize", "MODEL", "--calibration-images", "0"], "'--calibration-images': 0 is not in the range"),
    (["bench", "--model-dir", "MODEL", "--seconds", "0"], "'--seconds': 0.0 is not in the range"),
    (["bench", "--model-dir", "MODEL", "--runtimes", "onnxruntime-fp32,tensorrt"], "unknown tensorrt; choose from"),
    (["bench", "--model-dir", "MODEL", "--batch-sizes", "64,0"], "0: each value must be at least 1"),
    (["bench", "--model-dir", "MODEL", "--batch-sizes", "64,many"], "comma-separated list of int"),
])
def test_bad_option_values_are_one_line(exported_model, args, message):
    before = file_hashes(exported_model)
    proc = cli(*[exported_model if a == "MODEL" else a for a in args])
    assert_one_line_error(proc, message)
    assert file_hashes(exported_model) == before


def test_resuming_another_runs_checkpoint_into_a_run_folder_is_refused(run_copy, trained_run):
    foreign = sorted((trained_run / "checkpoints").glob("epoch_*.pt"))[-1]  # the same recipe, another folder
    before = file_hashes(run_copy)
    proc = train_job("--output-dir", run_copy, "--epochs", 2, "--resume", foreign, check=False)
    assert_one_line_error(proc, "holds another training run", "--overwrite")
    assert file_hashes(run_copy) == before
