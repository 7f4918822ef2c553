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
README_TARGETS = (0.990, 0.992, 0.995)
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
                                       "label_smoothing", "augment", "ema", "epochs")}
    settings.update(processes=final["processes"], global_batch=final["global_batch"], device=config["device"],
                    threads=config.get("threads"), launcher=launcher)
    extra = {"startup_s": final["startup_s"], "data_load_s": final["data_load_s"], "process_s": process_s}
    return summarise(name, statistics.median(row["images_per_s"] for row in rows), history, settings, extra)


def benchmark(train_script, data_dir, quick: bool, presets: list, processes: list, tutorial_epochs: int,
              extra_args: list, launchers=("accelerate",), seeds=(0,)) -> dict:
    """The tutorial, then each preset x process count x launcher x seed, all in this one invocation."""
    from ..training.config import PRESETS

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
                for seed in seeds:
                    result = run_pipeline(name, train_script, [*args, "--seed", seed], n, launcher, env)
                    results.append({**result, "seed": seed})
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
        "recipes": [spread(group, results[0]) for group in by_recipe(results[1:])],
    }


def by_recipe(results: list) -> list:
    """Results grouped by recipe name (one group per name, seeds together), in the order they ran."""
    groups: dict = {}
    for r in results:
        groups.setdefault(r["name"], []).append(r)
    return list(groups.values())


def spread(runs: list, tutorial: dict) -> dict:
    """One recipe over its seeds: final accuracies, and median times to each target against the tutorial's."""
    finals = [r["final_accuracy"] for r in runs if r["final_accuracy"] is not None]  # none: throughput only
    summary = {"name": runs[0]["name"], "seeds": [r.get("seed", 0) for r in runs], "final_accuracy": finals,
               "final_mean": statistics.mean(finals) if finals else None,
               "final_min": min(finals, default=None), "final_max": max(finals, default=None),
               "images_per_s": statistics.median(r["images_per_s"] for r in runs),
               "mixed_precision": runs[0]["settings"].get("mixed_precision"), "epochs": len(runs[0]["epochs"])}
    for target in README_TARGETS:
        key = f"time_to_{target * 100:.1f}_s"
        times = [first_time_to(r, target) for r in runs]
        reached = [t for t in times if t is not None]
        summary[key] = statistics.median(reached) if reached and len(reached) == len(runs) else None
        summary[f"reached_{target * 100:.1f}"] = len(reached)
        tutorial_time = first_time_to(tutorial, target)
        if summary[key] and tutorial_time:
            summary[f"sooner_than_tutorial_{target * 100:.1f}"] = tutorial_time / summary[key]
    return summary


def first_time_to(result: dict, target: float):
    reached = [row["wall_s"] for row in result["epochs"] if row["test_accuracy"] >= target]
    return reached[0] if reached else None


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


def readme_table(reports: list) -> str:
    """The README's training table: one row per recipe and machine, seeds summarised; each report carries its
    file name as ``_source``."""
    heads = " | ".join(f"to {100 * t:.1f}%" for t in README_TARGETS)
    lines = [f"| machine | recipe | images/s | vs tutorial | bf16 | final accuracy: mean (min-max), seeds | {heads} |",
             "|---|---|---|---|---|---|" + "---|" * len(README_TARGETS)]
    for report in reports:
        tutorial = report["results"][0]
        recipes = report.get("recipes") or [spread(group, tutorial) for group in by_recipe(report["results"][1:])]
        shown = [spread([tutorial], tutorial)] if tutorial["epochs"] else []  # a throughput-only tutorial: its
        for r in [*shown, *recipes]:  # rate is still every row's "vs tutorial"
            lines.append(f"| {machine_label(report)} | {recipe_label(r, report)} | {r['images_per_s']:,.0f} | "
                         f"{r['images_per_s'] / tutorial['images_per_s']:.2f}x | "
                         f"{'yes' if r['mixed_precision'] == 'bf16' else 'no'} | {accuracy_cell(r)} | "
                         + " | ".join(time_cell(r, t) for t in README_TARGETS) + " |")
    sources = ", ".join(r["_source"] for r in reports)
    versions = ", ".join(sorted({f"torch {r['versions']['torch']}" for r in reports}))
    lines += ["", f"Generated by `jobs/perf_table.py` from {sources} ({versions}). Times are training seconds "
              "(evaluation and start-up excluded) to the first epoch at or above the target, the median over the "
              "seeds; x is how many times sooner than the tutorial in the same run."]
    return "\n".join(lines)


def machine_label(report: dict) -> str:
    m = report["machine"]
    if report["results"] and report["results"][-1]["settings"].get("device", "cpu") == "cuda" and m.get("gpu"):
        return m["gpu"]
    return f"{m['cpu']} ({m.get('cpu_capability', '?')}), {m['cores']} cores"


def recipe_label(summary: dict, report: dict) -> str:
    """Reports written before the launcher was recorded ran one process through plain python."""
    name = summary["name"]
    first = next(r for r in report["results"] if r["name"] == name)
    if "launcher" not in first["settings"] and first["settings"].get("processes") == 1 and name.endswith(" process)"):
        return name[:-1] + ", python)"
    return name


def accuracy_cell(summary: dict) -> str:
    if not summary["epochs"]:
        return "-"  # a throughput-only run
    seeds = len(summary["final_accuracy"])
    epochs = f"{summary['epochs']} epoch{'s' if summary['epochs'] > 1 else ''}"
    if seeds == 1:
        return f"{100 * summary['final_mean']:.2f}% ({epochs})"
    return (f"{100 * summary['final_mean']:.2f}% ({100 * summary['final_min']:.2f}-{100 * summary['final_max']:.2f}), "
            f"{seeds} seeds, {epochs}")


def time_cell(summary: dict, target: float) -> str:
    if not summary["epochs"]:
        return "-"
    key = f"{target * 100:.1f}"
    value = summary[f"time_to_{key}_s"]
    if value is None:
        reached = summary[f"reached_{key}"]
        return f"{reached}/{len(summary['final_accuracy'])} seeds" if reached else "not reached"
    sooner = summary.get(f"sooner_than_tutorial_{key}")
    return f"{value:.1f} s" + (f" ({sooner:.1f}x)" if sooner and summary["name"] != "tutorial (as written)" else "")
