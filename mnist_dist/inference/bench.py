"""Inference benchmark on the MNIST test set: onnxruntime fp32 and INT8 beside PyTorch eager and TorchScript.

Every runtime runs with the same thread count. Each (runtime, batch) cell
is warmed up, then timed batch by batch for a time budget; throughput is
images over the summed batch times, latency the per-batch percentiles.
"""
import time
from pathlib import Path

import numpy as np
import torch

from .. import sysinfo
from ..errors import UserError
from ..exporting import manifest as manifest_lib
from ..exporting.quantize import INT8_FILE, runner_accuracy
from ..exporting.validate import test_images
from . import runtimes

BATCH_SIZES = (1, 64, 1024, 10_000)
RUNTIMES = ("onnxruntime-fp32", "onnxruntime-int8", "pytorch-eager", "torchscript")


def model_flops(model_config: dict, image_size: tuple) -> int:
    """Multiply-adds x 2 of one forward pass, counted from the layers (about 20.8 MFLOP for this CNN)."""
    from ..model import build_model

    flops = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            flops.append(2 * output.numel() * k)
        elif isinstance(module, torch.nn.Linear):
            flops.append(2 * output.numel() * module.in_features)

    model = build_model(model_config)
    for layer in model.modules():
        layer.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, model_config["in_channels"], *image_size))
    return sum(flops)


def sgemm_gflops(threads: int, size: int = 2048, repeats: int = 5) -> dict:
    """This CPU's fp32 matrix-multiply rate at ``threads`` threads, the ceiling the CNN is held against.

    Both torch's BLAS and numpy's are timed and the faster counts: MKL, which torch uses, is
    markedly slower than OpenBLAS on some AMD CPUs, and the ceiling should be the CPU's, not a library's.
    """
    torch.set_num_threads(threads)
    a, b = torch.rand(size, size), torch.rand(size, size)
    rates = {"torch": _best_rate(lambda: a @ b, size, repeats),
             "numpy": _best_rate(lambda: a.numpy() @ b.numpy(), size, repeats)}
    return {**rates, "best": max(rates.values())}


def _best_rate(matmul, size: int, repeats: int) -> float:
    matmul()  # warm-up
    fastest = min(_timed(matmul) for _ in range(repeats))
    return 2 * size**3 / fastest / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def load_runners(model_dir: Path, manifest: dict, names, threads: int, providers) -> dict:
    files = manifest["artifacts"]
    loaders = {
        "onnxruntime-fp32": lambda: runtimes.load_onnx(model_dir / files["onnx"], threads, providers),
        "onnxruntime-int8": lambda: runtimes.load_onnx(model_dir / files.get("int8", INT8_FILE), threads, providers),
        "pytorch-eager": lambda: runtimes.load_reference(model_dir / files["reference"]),
        "torchscript": lambda: runtimes.load_torchscript(model_dir / files["torchscript"]),
    }
    unknown = set(names) - set(loaders)
    if unknown:
        raise UserError(f"unknown runtime(s) {', '.join(sorted(unknown))}; choose from {', '.join(loaders)}")
    if "onnxruntime-int8" in names and "int8" not in files:
        raise UserError(f"{model_dir} has no INT8 model: run `mnist-dist quantize {model_dir}` first")
    return {name: loaders[name]() for name in names}


def time_cell(runner, images: np.ndarray, batch: int, warmup: int, seconds: float, min_batches: int) -> dict:
    """Warm up, then time consecutive batches (wrapping round the images) until the budget is spent."""
    starts = list(range(0, max(len(images) - batch, 0) + 1, batch)) or [0]
    for i in range(warmup):
        runner(images[starts[i % len(starts)] : starts[i % len(starts)] + batch])
    latencies, deadline = [], time.perf_counter() + seconds
    while len(latencies) < min_batches or time.perf_counter() < deadline:
        start = starts[len(latencies) % len(starts)]
        x = images[start : start + batch]
        t0 = time.perf_counter()
        runner(x)
        latencies.append(time.perf_counter() - t0)
    latencies = np.array(latencies)
    n = min(batch, len(images))
    return {"images_per_s": n * len(latencies) / latencies.sum(), "p50_ms": 1e3 * np.percentile(latencies, 50),
            "p90_ms": 1e3 * np.percentile(latencies, 90), "p99_ms": 1e3 * np.percentile(latencies, 99),
            "timed_batches": len(latencies)}


def run(model_dir, data_dir=None, batch_sizes=BATCH_SIZES, names=RUNTIMES, threads=None, providers=None,
        seconds: float = 3.0, warmup: int = 3, min_batches: int = 5, limit=None, download=True, log=print) -> dict:
    import onnxruntime as ort

    model_dir = Path(model_dir)
    manifest = manifest_lib.load(model_dir)
    threads = threads or runtimes.cpu_count()
    torch.set_num_threads(threads)
    providers = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    used = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    images, labels = test_images(manifest, data_dir, download)
    if limit:
        images, labels = images[:limit], labels[:limit]
    runners = load_runners(model_dir, manifest, names, threads, used)
    flops = model_flops(manifest["model_config"], manifest_lib.image_size(manifest))
    sgemm = sgemm_gflops(threads)
    peak = sgemm["best"]
    expected = None if limit else manifest.get("pytorch_test_accuracy")
    results = []
    for name, runner in runners.items():
        acc = runner_accuracy(runner, images, labels)
        # fp32 runtimes must reproduce the checkpoint's PyTorch accuracy exactly; INT8 reports its drop instead.
        matches = None if expected is None or name.endswith("int8") else acc == expected
        for batch in batch_sizes:
            log(f"{name} batch {batch}")
            cell = time_cell(runner, images, batch, warmup, seconds, min_batches)
            gflops = flops * cell["images_per_s"] / 1e9
            results.append({"runtime": name, "batch": batch, **cell, "accuracy": acc, "gflops": gflops,
                            "share_of_sgemm": gflops / peak, "accuracy_equals_pytorch": matches})
    return {
        "benchmark": "inference",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": sysinfo.machine(),
        "versions": sysinfo.versions("torch", "onnxruntime", "onnx", "numpy"),
        "settings": {"model_dir": str(model_dir), "threads": threads, "batch_sizes": list(batch_sizes),
                     "runtimes": list(names), "seconds_per_cell": seconds, "warmup_batches": warmup,
                     "min_batches": min_batches, "images": len(images)},
        "providers": {"requested": providers, "used": used,
                      "absent": [p for p in providers if p not in available], "available": available},
        "model_mflop_per_image": flops / 1e6,
        "sgemm_gflops": peak,
        "sgemm_gflops_by_library": sgemm,
        "pytorch_test_accuracy": manifest.get("pytorch_test_accuracy"),
        "results": results,
        "comparisons": comparisons(results),
    }


def comparisons(results: list) -> list:
    """Speed-ups against the baselines that matter, batch by batch, from this same run."""
    cell = {(r["runtime"], r["batch"]): r for r in results}
    rows = []
    for (name, batch), r in cell.items():
        for base in ("pytorch-eager", "onnxruntime-fp32"):
            b = cell.get((base, batch))
            if b and name != base and name.startswith("onnxruntime"):
                rows.append({"runtime": name, "baseline": base, "batch": batch,
                             "speedup": r["images_per_s"] / b["images_per_s"],
                             "accuracy_drop_points": 100 * (b["accuracy"] - r["accuracy"])})
    return rows


def format_table(report: dict) -> str:
    lines = [f"{'runtime':<18} {'batch':>6} {'images/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
             f"{'accuracy':>9} {'% sgemm':>8}"]
    for r in report["results"]:
        lines.append(f"{r['runtime']:<18} {r['batch']:>6} {r['images_per_s']:>10.0f} {r['p50_ms']:>8.2f} "
                     f"{r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} {100 * r['accuracy']:>8.2f}% "
                     f"{100 * r['share_of_sgemm']:>7.1f}%")
    lines.append(f"sgemm: {report['sgemm_gflops']:.0f} GFLOP/s at {report['settings']['threads']} threads; "
                 f"model: {report['model_mflop_per_image']:.1f} MFLOP per image")
    for c in report["comparisons"]:
        lines.append(f"{c['runtime']} vs {c['baseline']} at batch {c['batch']}: {c['speedup']:.2f}x, "
                     f"accuracy drop {c['accuracy_drop_points']:+.2f} points")
    return "\n".join(lines)
