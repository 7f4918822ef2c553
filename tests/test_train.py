"""End-to-end training runs on real MNIST, launched as users launch them."""
import json
import subprocess
import sys

import pytest
import torch

from mnist_dist.atomic import read_jsonl
from mnist_dist.sysinfo import physical_cores
from mnist_dist.training import checkpoint

from conftest import ROOT, accelerate_launch, cpu_env, cpu_flags, free_port, run, train_job

pytestmark = pytest.mark.slow  # every test trains

METRIC_KEYS = {"epoch", "train_loss", "test_accuracy", "test_loss", "test_samples", "images_per_s", "wall_s"}


def test_short_run_learns_and_writes_everything(trained_run):
    final = json.loads((trained_run / "metrics.json").read_text())
    # Measured: 400 batches of 64 (a third of an epoch) reach about 98%.
    assert final["test_accuracy"] >= 0.97
    assert final["test_samples"] == 10_000
    assert METRIC_KEYS | {"processes", "global_batch"} <= final.keys()
    assert (final["processes"], final["global_batch"], final["train_images"]) == (1, 64, 400 * 64)
    rows = read_jsonl(trained_run / "metrics.jsonl")
    assert len(rows) == 1 and rows[0].keys() >= METRIC_KEYS
    config = json.loads((trained_run / "config.json").read_text())
    assert (config["lr"], config["batch_size"], config["epochs"]) == (1e-3, 64, 1)
    _model, state = checkpoint.load_model(checkpoint.latest_checkpoint(trained_run))
    assert state["epoch"] == 1 and {"optimizer", "rng", "model_config"} <= state.keys()


def test_prints_what_the_tutorial_prints(tmp_path):
    proc = train_job("--output-dir", tmp_path / "out", "--preset", "tutorial", "--epochs", 1, "--limit-batches", 4,
                     "--log-every", 2)
    out = proc.stdout
    assert "Training images: 60000, test images: 10000" in out
    assert "Using cpu device, 1 process(es)" in out
    assert "Global batch: 64 per process x 1 = 64" in out
    assert "(out): Linear(in_features=3136, out_features=10" in out
    assert out.count("loss: ") >= 2 and "[batch    4/4]" in out
    assert "Test result: Accuracy:" in out and "/10000)" in out and "images/s" in out


def final_weights(run_dir, which="model"):
    return checkpoint.load(checkpoint.latest_checkpoint(run_dir))[which]


def assert_same_weights(run_a, run_b, which="model"):
    a, b = final_weights(run_a, which), final_weights(run_b, which)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bitwise_identical_to_a_straight_run_and_keeps_its_seed_and_batch_limit(tmp_path):
    # Augmentation draws from a generator and the weight average has its own state: both must survive a resume.
    recipe = ["--preset", "tutorial", "--limit-batches", 10, "--seed", 3, "--log-every", 1000, "--augment",
              "--ema", 0.9]
    train_job("--output-dir", tmp_path / "straight", "--epochs", 2, *recipe)
    train_job("--output-dir", tmp_path / "split", "--epochs", 1, *recipe)
    # Nothing of the recipe repeated: the run's own continues (the default preset has neither EMA nor augmentation).
    train_job("--output-dir", tmp_path / "split", "--epochs", 2, "--resume", "latest")
    assert_same_weights(tmp_path / "straight", tmp_path / "split")  # the average, which is evaluated and exported
    assert_same_weights(tmp_path / "straight", tmp_path / "split", "train_model")  # the weights Adam moves
    config = json.loads((tmp_path / "split" / "config.json").read_text())
    assert (config["seed"], config["limit_batches"], config["augment"], config["ema"]) == (3, 10, True, 0.9)
    rows = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [(r["epoch"], r["run"], r["train_images"]) for r in rows] == [(1, 1, 640), (2, 2, 640)]
    assert rows[-1]["test_accuracy"] == read_jsonl(tmp_path / "straight" / "metrics.jsonl")[-1]["test_accuracy"]


def two_gloo_processes():
    return ["--multi_gpu", "--num_processes", 2, "--num_machines", 1, "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def test_two_gloo_processes_count_every_test_image_once(tmp_path):
    out = tmp_path / "out"
    # Eval batch 300 x 2 processes does not divide 10,000: the last batch is padded, and must not be counted.
    accelerate_launch(*two_gloo_processes(), "jobs/train.py", "--output-dir", out, "--preset", "tutorial",
                      "--epochs", 1, "--limit-batches", 20, "--eval-batch-size", 300,
                      env=cpu_env(ACCELERATE_USE_CPU="1"))
    final = json.loads((out / "metrics.json").read_text())
    assert (final["processes"], final["global_batch"], final["test_samples"]) == (2, 128, 10_000)
    assert final["train_images"] == 20 * 128

    single = run([sys.executable, "jobs/evaluate.py", out, "--batch-size", 1000, "--json", tmp_path / "one.json"])
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["processes"] == 1 and one["test_samples"] == 10_000
    assert one["test_correct"] == final["test_correct"]
    assert abs(one["test_loss"] - final["test_loss"]) < 1e-5
    assert "Accuracy" in single.stdout
    # Evaluation alone, under two processes with a padded last batch, counts the same 10,000.
    accelerate_launch(*two_gloo_processes(), "jobs/evaluate.py", out, "--batch-size", 300, "--json",
                      tmp_path / "two.json", env=cpu_env(ACCELERATE_USE_CPU="1"))
    two = json.loads((tmp_path / "two.json").read_text())
    assert (two["processes"], two["test_samples"], two["test_correct"]) == (2, 10_000, one["test_correct"])


def test_two_processes_without_the_cpu_flag_still_join_over_gloo(tmp_path):
    # No ACCELERATE_USE_CPU: the job itself must notice there is no GPU and join the processes.
    out = tmp_path / "out"
    accelerate_launch(*two_gloo_processes(), "jobs/train.py", "--output-dir", out, "--epochs", 1,
                      "--limit-batches", 5)
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2


def test_two_machines_on_loopback_train_together(tmp_path):
    out = tmp_path / "out"
    port = free_port()
    machines = ["--multi_gpu", "--num_machines", 2, "--num_processes", 2, "--main_process_ip", "127.0.0.1",
                "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no"]
    job = ["jobs/train.py", "--output-dir", out, "--preset", "tutorial", "--epochs", 1, "--limit-batches", 10]
    env = cpu_env(ACCELERATE_USE_CPU="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", *machines]
    worker = subprocess.Popen([str(a) for a in [*launch, "--machine_rank", 1, *job]], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        run([*launch, "--machine_rank", 0, *job], env=env, timeout=300)
        assert worker.wait(timeout=120) == 0, worker.stderr.read()
    finally:
        worker.kill()
    final = json.loads((out / "metrics.json").read_text())
    assert (final["processes"], final["global_batch"], final["test_samples"]) == (2, 128, 10_000)
    assert final["train_images"] == 10 * 128


def test_training_benchmark_quick_mode(tmp_path):
    out = tmp_path / "bench.json"
    proc = run([sys.executable, "jobs/bench_train.py", "--quick", "--json", out])
    report = json.loads(out.read_text())
    tutorial, pipeline = report["results"]
    assert (tutorial["name"], pipeline["name"]) == ("tutorial (as written)", "fast (1 process)")
    assert tutorial["images_per_s"] > 0 and pipeline["images_per_s"] > 0
    # The pipeline ran as the README runs it: through accelerate launch, on every core, on the bundled MNIST.
    assert pipeline["settings"]["launcher"] == "accelerate"
    assert pipeline["settings"]["threads"] == physical_cores()
    assert {"cpu", "cores"} <= report["machine"].keys() and "torch" in report["versions"]
    assert "x tutorial" in proc.stdout


def test_onecycle_resume_with_other_steps_per_epoch_is_refused_before_training():
    from mnist_dist.errors import UserError
    from mnist_dist.training.config import TrainConfig
    from mnist_dist.training.loop import check_same_steps

    state = {"path": "epoch_0001.pt", "processes": 2, "steps_per_epoch": 235,
             "train_config": {"batch_size": 128, "limit_batches": None}}
    same_global_batch = TrainConfig(schedule="onecycle", batch_size=256)
    check_same_steps(same_global_batch, state, processes=1)  # 60,000 / 256 = 235 steps either way
    for batch_size, processes in ((128, 1), (64, 2)):
        with pytest.raises(UserError, match=r"235 steps per epoch .* would take 469 .* global batch of 256"):
            check_same_steps(TrainConfig(schedule="onecycle", batch_size=batch_size), state, processes)
    check_same_steps(TrainConfig(schedule="constant", batch_size=64), state, processes=1)  # no plan to break


def test_overwrite_replaces_a_finished_run_with_another_preset(run_copy):
    native_bf16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})  # before the run: it may skip
    replaced = checkpoint.latest_checkpoint(run_copy).read_bytes()
    proc = train_job("--output-dir", run_copy, "--preset", "best", "--epochs", 1, "--limit-batches", 4, "--overwrite")
    assert "Recipe (best): 1 epoch, Adam lr 0.005 onecycle (warm-up 0.3), label smoothing 0.1, augmentation on" \
        in proc.stdout
    assert [p.name for p in checkpoint.list_checkpoints(run_copy)] == ["epoch_0001.pt"]
    assert checkpoint.latest_checkpoint(run_copy).read_bytes() != replaced
    assert [(r["epoch"], r["train_images"]) for r in read_jsonl(run_copy / "metrics.jsonl")] == [(1, 4 * 128)]
    assert [s["step"] for s in read_jsonl(run_copy / "steps.jsonl")] == [4]
    config = json.loads((run_copy / "config.json").read_text())
    assert (config["preset"], config["label_smoothing"], config["augment"], config["limit_batches"]) == \
        ("best", 0.1, True, 4)
    assert config["mixed_precision"] == ("bf16" if native_bf16 else "no")
