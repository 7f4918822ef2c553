"""Training benchmark: the tutorial's own pipeline against the project's, in one invocation.

The tutorial baseline is reproduced as written (per-image ToTensor through a
DataLoader, batch 64, Adam 1e-3, fp32, test accuracy after each epoch). The
project's pipeline runs as users run it, through ``jobs/train.py`` (under
``accelerate launch`` for several processes), and is read back from its
metrics.jsonl. Figures are medians after warm-up.
"""
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import sysinfo
from ..atomic import read_jsonl
from ..model import CNN

TARGETS = (0.990, 0.992)
JOBS = Path(__file__).resolve().parents[2] / "jobs"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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


def run_pipeline(name: str, train_args: list, processes: int, env_extra=None) -> dict:
    """Run jobs/train.py as a user would and read its metrics back."""
    import os

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        job = [str(JOBS / "train.py"), "--output-dir", str(out), "--log-every", "100000", *map(str, train_args)]
        if processes > 1:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *job]
        else:
            cmd = [sys.executable, *job]
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
    settings.update(processes=final["processes"], global_batch=final["global_batch"], device=config["device"])
    extra = {"startup_s": final["startup_s"], "data_load_s": final["data_load_s"], "process_s": process_s}
    return summarise(name, statistics.median(row["images_per_s"] for row in rows), history, settings, extra)


def benchmark(root, quick: bool, presets: list, processes: list, tutorial_epochs: int, extra_args: list) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    limit = ["--limit-batches", 30, "--epochs", 1] if quick else []
    results = [run_tutorial(root, device, batches=30 if quick else 300, epochs=0 if quick else tutorial_epochs)]
    for preset in presets:
        for n in processes:
            args = ["--preset", preset, "--data-dir", root, *limit, *extra_args]
            if n > 1:  # the same global batch, split across processes
                from .config import PRESETS

                args += ["--batch-size", PRESETS[preset]["batch_size"] // n]
            env = {"ACCELERATE_USE_CPU": "1"} if n > 1 and device == "cpu" else {}
            results.append(run_pipeline(f"{preset} ({n} process{'es' if n > 1 else ''})", args, n, env))
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
