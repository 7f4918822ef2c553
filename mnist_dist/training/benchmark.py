"""Training benchmark: the tutorial's own pipeline against the project's, in one invocation.

The tutorial baseline is reproduced as written (torchvision's MNIST with a
per-image ToTensor through a DataLoader, batch 64, Adam 1e-3, fp32, test
accuracy after each epoch). The project's pipeline runs as the README runs it,
``accelerate launch jobs/train.py`` (or plain ``python``, for comparison), and
is read back from its metrics.jsonl. Figures are medians after warm-up.
"""
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import sysinfo
from ..atomic import read_jsonl
from ..data import mnist
from ..model import CNN

TARGETS = (0.990, 0.992)
LAUNCHERS = ("accelerate", "python")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextmanager
def tutorial_root(data_dir):
    """A torchvision root for the tutorial's own loader: ``data_dir`` itself, or the bundled MNIST written to a
    temporary folder (torchvision's MNIST class reads files; the baseline must use it, as the tutorial does)."""
    if data_dir:
        yield data_dir
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield mnist.write_raw_files(tmp)


def tutorial_loaders(root, batch_size=64):
    from torchvision import datasets
    from torchvision.transforms import ToTensor

    train = datasets.MNIST(str(root), train=True, download=False, transform=ToTensor())
    test = datasets.MNIST(str(root), train=False, download=False, transform=ToTensor())
    return (torch.utils.data.DataLoader(train, batch_size=batch_size),
            torch.utils.data.DataLoader(test, batch_size=batch_size))


def tutorial_test(model, loader, device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    model.train()
    return correct / len(loader.dataset)


def run_tutorial(root, device: str, batches: int, epochs: int, warmup: int = 10, chunk: int = 10) -> dict:
    """The tutorial's loop: throughput over ``batches`` batches; time to each target over up to ``epochs``."""
    torch.manual_seed(0)
    train_loader, test_loader = tutorial_loaders(root)
    model = CNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    chunk_rates, history, wall, done = [], [], 0.0, 0
    for epoch in range(1, max(epochs, 1) + 1):
        sync(device)
        t0 = chunk_t0 = time.perf_counter()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == warmup or (done > warmup and (done - warmup) % chunk == 0):
                sync(device)
                now = time.perf_counter()
                if done > warmup:
                    chunk_rates.append(chunk * len(y) / (now - chunk_t0))
                chunk_t0 = now
            if epochs == 0 and done >= warmup + batches:
                break
        sync(device)
        wall += time.perf_counter() - t0
        if epochs == 0:
            break
        history.append({"epoch": epoch, "test_accuracy": tutorial_test(model, test_loader, device), "wall_s": wall})
        if history[-1]["test_accuracy"] >= max(TARGETS):
            break
    return summarise("tutorial (as written)", statistics.median(chunk_rates), history,
                     {"batch": 64, "lr": 1e-3, "precision": "fp32", "pipeline": "per-image ToTensor DataLoader"})


def summarise(name: str, images_per_s: float, history: list, settings: dict, extra=None) -> dict:
    result = {"name": name, "images_per_s": images_per_s, "settings": settings, "epochs": history,
              "final_accuracy": history[-1]["test_accuracy"] if history else None,
              "train_s": history[-1]["wall_s"] if history else None}
    for target in TARGETS:
        reached = [row["wall_s"] for row in history if row["test_accuracy"] >= target]
        result[f"time_to_{target * 100:.1f}_s"] = reached[0] if reached else None
    result.update(extra or {})
    return result


def launch_command(train_script, processes: int, launcher: str) -> list:
    """How a user starts the job: ``accelerate launch`` with its defaults, or plain python for one process."""
    if launcher == "python":
        if processes != 1:
            raise ValueError("plain python starts one process; use the accelerate launcher for more")
        return [sys.executable, str(train_script)]
    several = ["--multi_gpu"] if processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", *several, "--num_processes", str(processes),
            "--num_machines", "1", "--dynamo_backend", "no", str(train_script)]


def run_pipeline(name: str, train_script, train_args: list, processes: int, launcher: str, env_extra=None) -> dict:
    """Run the training job as a user would and read its metrics back."""
    import os

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [*launch_command(train_script, processes, launcher), "--output-dir", str(out), "--log-every", "100000",
               *map(str, train_args)]
        env = dict(os.environ, **(env_extra or {}))
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        process_s = time.perf_counter() - started
        rows = read_jsonl(out / "metrics.jsonl")
        final = json.loads((out / "metrics.json").read_text())
        config = json.loads((out / "config.json").read_text())
    history = [{k: row[k] for k in ("epoch", "test_accuracy", "wall_s", "images_per_s")} for row in rows]
    settings = {k: config[k] for k in ("preset", "batch_size", "lr", "schedule", "mixed_precision", "channels_last",
                                       "label_smoothing", "augment", "epochs")}
    settings.update(processes=final["processes"], global_batch=final["global_batch"], device=config["device"],
                    threads=config.get("threads"), launcher=launcher)
    extra = {"startup_s": final["startup_s"], "data_load_s": final["data_load_s"], "process_s": process_s}
    return summarise(name, statistics.median(row["images_per_s"] for row in rows), history, settings, extra)


def benchmark(train_script, data_dir, quick: bool, presets: list, processes: list, tutorial_epochs: int,
              extra_args: list, launchers=("accelerate",)) -> dict:
    """The tutorial, then each preset x process count x launcher, all in this one invocation."""
    from .config import PRESETS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    limit = ["--limit-batches", 30, "--epochs", 1] if quick else []
    with tutorial_root(data_dir) as root:
        results = [run_tutorial(root, device, batches=30 if quick else 300, epochs=0 if quick else tutorial_epochs)]
    data_args = ["--data-dir", data_dir] if data_dir else []
    for preset in presets:
        for n in processes:
            args = ["--preset", preset, *data_args, *limit, *extra_args]
            if n > 1:  # the same global batch, split across processes
                args += ["--batch-size", PRESETS[preset]["batch_size"] // n]
            env = {"ACCELERATE_USE_CPU": "1"} if n > 1 and device == "cpu" else {}
            for launcher in launchers if n == 1 else ["accelerate"]:
                name = f"{preset} ({n} process{'es' if n > 1 else ''}{', python' if launcher == 'python' else ''})"
                results.append(run_pipeline(name, train_script, args, n, launcher, env))
    baseline = results[0]["images_per_s"]
    for r in results:
        r["speedup_images_per_s"] = r["images_per_s"] / baseline
    return {
        "benchmark": "train",
        "quick": quick,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": sysinfo.machine(),
        "versions": sysinfo.versions("torch", "torchvision", "accelerate", "numpy"),
        "targets": list(TARGETS),
        "results": results,
    }


def format_table(report: dict) -> str:
    lines = [f"{'recipe':<24} {'images/s':>9} {'x tutorial':>10} {'to 99.0%':>9} {'to 99.2%':>9} {'final':>7}"]
    for r in report["results"]:
        t1, t2 = r.get("time_to_99.0_s"), r.get("time_to_99.2_s")
        final = f"{100 * r['final_accuracy']:.2f}%" if r["final_accuracy"] is not None else "-"
        lines.append(f"{r['name']:<24} {r['images_per_s']:>9.0f} {r['speedup_images_per_s']:>9.2f}x "
                     f"{_secs(t1):>9} {_secs(t2):>9} {final:>7}")
    return "\n".join(lines)


def _secs(value) -> str:
    return f"{value:.1f}s" if value is not None else "-"
