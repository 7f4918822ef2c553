"""The README's command as Accelerate users run it: bundled data, every core, the launcher's precision, tracking."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mnist_dist import launch
from mnist_dist.atomic import read_jsonl
from mnist_dist.sysinfo import physical_cores

from conftest import ROOT, accelerate_launch, cpu_env, run, sigkill_when, train_job

pytestmark = pytest.mark.slow  # every test launches the training job

SMOKE = ["--epochs", 1, "--limit-batches", 20]


def accelerate_launch_cli() -> list:
    """`accelerate launch`, from the script that `pip install` put beside this Python, as a user types it."""
    script = Path(sys.executable).with_name("accelerate")
    return [script, "launch"] if script.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]


def one_error_line(proc) -> str:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stdout
    return errors[0]


def test_readme_command_trains_offline_from_an_empty_folder(tmp_path):
    """`accelerate launch jobs/train.py` with no data/ folder and no $MNIST_DATA_DIR: the bundled copy, read in
    memory."""
    here = tmp_path / "empty"
    here.mkdir()
    out = tmp_path / "out"
    proc = run([*accelerate_launch_cli(), ROOT / "jobs" / "train.py", *SMOKE, "--output-dir", out], cwd=here)
    final = json.loads((out / "metrics.json").read_text())
    assert final["test_samples"] == 10_000 and final["train_images"] == 20 * 128
    config = json.loads((out / "config.json").read_text())
    assert config["data_source"] == {"chosen_by": "bundled", "path": None}
    assert "Data: the copy bundled with mnist-dist" in proc.stdout
    assert list(here.iterdir()) == []  # nothing downloaded or unpacked where it ran
    # The launcher exported OMP_NUM_THREADS=1; the job still uses every physical core.
    assert config["threads"] == physical_cores()
    assert config["threads_chosen_by"].endswith("physical cores / 1 local process(es)")


@pytest.mark.parametrize("env, requested, expected", [
    ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}, None, "cores"),  # the launcher's silent default
    ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "3"}, None, 3),  # --num_cpu_threads_per_process 3
    ({"OMP_NUM_THREADS": "1"}, None, 1),  # chosen by the user, no launcher
    ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "3"}, 5, 5),  # --threads always wins
    ({"LOCAL_WORLD_SIZE": "2"}, None, "cores/2"),  # two processes on this machine share its cores
])
def test_thread_count_rule(monkeypatch, env, requested, expected):
    for name in ("ACCELERATE_MIXED_PRECISION", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cores = physical_cores()
    expected = {"cores": cores, "cores/2": max(1, cores // 2)}.get(expected, expected)
    assert launch.choose_threads(requested)[0] == expected


def first_loss(args) -> float:
    """The loss a training job prints for its first batch; the job is stopped there (its launcher killed, which
    takes the job with it): evaluating 10,000 images in bf16 is slow where bf16 is emulated."""
    printed = []
    sigkill_when(args, lambda line: printed.append(line) or line.startswith("loss:"))
    return float(printed[-1].split()[1])


def test_the_launchers_mixed_precision_is_honoured_and_the_job_flag_wins(tmp_path):
    launcher = [*accelerate_launch_cli(), "--mixed_precision", "bf16"]
    common = ["--preset", "tutorial", *SMOKE, "--log-every", 1]
    bf16 = first_loss([*launcher, "jobs/train.py", *common, "--output-dir", tmp_path / "bf16"])
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert (config["mixed_precision"], config["mixed_precision_chosen_by"]) == ("bf16", "accelerate launch")
    fp32 = first_loss([*launcher, "jobs/train.py", *common, "--mixed-precision", "no",
                       "--output-dir", tmp_path / "fp32"])
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert (config["mixed_precision"], config["mixed_precision_chosen_by"]) == ("no", "--mixed-precision")
    # Same seed, data and weights: only the arithmetic differs, so bf16 autocast really ran in the first run.
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)


def test_fp16_on_a_cpu_is_refused_in_one_line(tmp_path):
    proc = run([*accelerate_launch_cli(), "--mixed_precision", "fp16", "jobs/train.py", *SMOKE,
                "--output-dir", tmp_path / "out"], check=False)
    assert "fp16 mixed precision (accelerate launch) needs a GPU" in one_error_line(proc)
    assert not (tmp_path / "out").exists()


def test_tensorboard_gets_loss_and_accuracy_and_steps_are_recorded(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    train_job("--output-dir", out, "--preset", "tutorial", "--epochs", 2, "--limit-batches", 30,
              "--metrics-every", 10, "--report-to", "tensorboard")
    steps = read_jsonl(out / "steps.jsonl")
    assert [s["step"] for s in steps] == [10, 20, 30, 40, 50, 60]
    assert [round(s["epoch"], 3) for s in steps] == [0.333, 0.667, 1.0, 1.333, 1.667, 2.0]
    assert all(s["lr"] == 1e-3 and 0 < s["loss"] < 3 for s in steps)
    (events,) = {p.parent for p in out.rglob("events.out.tfevents.*") if p.parent.name == "mnist-dist"}
    scalars = EventAccumulator(str(events))
    scalars.Reload()
    loss = scalars.Scalars("train/loss")
    assert [e.step for e in loss] == [10, 20, 30, 40, 50, 60]
    assert [e.value for e in loss] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
    accuracy = scalars.Scalars("test/accuracy")
    epochs = read_jsonl(out / "metrics.jsonl")
    expected = [(30 * r["epoch"], pytest.approx(r["test_accuracy"])) for r in epochs]
    assert [(e.step, e.value) for e in accuracy] == expected


def test_a_tracker_that_is_not_installed_is_one_error_line(tmp_path):
    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    proc = train_job("--output-dir", tmp_path / "out", "--report-to", "wandb", *SMOKE, check=False)
    assert "the wandb package is not installed" in one_error_line(proc)


def test_bad_input_under_two_processes_is_said_once(tmp_path):
    proc = accelerate_launch("--multi_gpu", "--num_processes", 2, "--num_machines", 1, "--dynamo_backend", "no",
                             "jobs/train.py", "--output-dir", tmp_path / "out", "--epochs", 0,
                             env=cpu_env(ACCELERATE_USE_CPU="1"), check=False)
    assert "--epochs must be a positive integer" in one_error_line(proc)
