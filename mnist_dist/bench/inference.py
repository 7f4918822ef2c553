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
from ..exporting.validate import test_images
from ..inference import manifest as manifest_lib
from ..inference import runtimes
from ..inference.models import open_model
from ..scores import before_and_after, calibration_line, confident_answers

BATCH_SIZES = (1, 64, 1024, 10_000)
# bench's runtime -> (the manifest's artifact, the engine that runs it)
RUNNERS = {
    "onnxruntime-fp32": ("onnx", "onnxruntime"),
    "onnxruntime-int8": ("int8", "onnxruntime"),
    "openvino-fp32": ("onnx", "openvino"),
    "openvino-bf16": ("onnx", "openvino-bf16"),
    "openvino-int8": ("int8", "openvino"),
    "pytorch-eager": ("reference", "pytorch"),
    "torchscript": ("torchscript", "torchscript"),
}
RUNTIMES = tuple(RUNNERS)
MAX_DROP_POINTS = 0.1  # the most a bf16 or INT8 runtime may lose against the fp32 model, in accuracy points


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


def load_runners(model_dir: Path, manifest: dict, names, threads: int, device: str) -> dict:
    """Each runtime opened as users open it; ONNX engines on ``device``, PyTorch's on the CPU as exported."""
    unknown = set(names) - set(RUNNERS)
    if unknown:
        raise UserError(f"unknown runtime(s) {', '.join(sorted(unknown))}; choose from {', '.join(RUNNERS)}")
    if any(name.endswith("int8") for name in names) and "int8" not in manifest["artifacts"]:
        raise UserError(f"{model_dir} has no INT8 model: run `mnist-dist quantize {model_dir}` first")
    runners = {}
    for name in names:
        artifact, engine = RUNNERS[name]
        path = model_dir / manifest["artifacts"][artifact]
        runners[name] = open_model(path, engine, threads, device if path.suffix == ".onnx" else "cpu",
                                   manifest=manifest)
    return runners


def available_runtimes(manifest: dict) -> list:
    """Every runtime this machine can run for this folder: OpenVINO where installed, its bf16 where native."""
    names = [n for n in RUNTIMES if not n.startswith("openvino") or runtimes.openvino_installed()]
    if "openvino-bf16" in names and not runtimes.openvino_bf16():
        names.remove("openvino-bf16")
    if "int8" not in manifest["artifacts"]:
        names = [n for n in names if not n.endswith("int8")]
    return names


def precision(name: str) -> str:
    return name.rsplit("-", 1)[1] if name.endswith(("int8", "bf16")) else "fp32"


def time_cell(runner, images: np.ndarray, batch: int, warmup: int, seconds: float, min_batches: int) -> dict:
    """Warm up, then time consecutive batches (wrapping round the images) until the budget is spent."""
    starts = list(range(0, max(len(images) - batch, 0) + 1, batch)) or [0]
    for i in range(warmup):
        runner(images[starts[i % len(starts)] : starts[i % len(starts)] + batch])
    latencies: list = []
    deadline = time.perf_counter() + seconds
    while len(latencies) < min_batches or time.perf_counter() < deadline:
        start = starts[len(latencies) % len(starts)]
        x = images[start : start + batch]
        t0 = time.perf_counter()
        runner(x)
        latencies.append(time.perf_counter() - t0)
    timed = np.array(latencies)
    n = min(batch, len(images))
    return {"images_per_s": n * len(timed) / timed.sum(), "p50_ms": 1e3 * np.percentile(timed, 50),
            "p90_ms": 1e3 * np.percentile(timed, 90), "p99_ms": 1e3 * np.percentile(timed, 99),
            "timed_batches": len(timed)}


def run(model_dir, data_dir=None, batch_sizes=BATCH_SIZES, names=None, threads=None, providers=None,
        seconds: float = 3.0, warmup: int = 3, min_batches: int = 5, limit=None, download=True, log=print) -> dict:
    import onnxruntime as ort

    model_dir = Path(model_dir)
    manifest = manifest_lib.load(model_dir)
    threads = threads or sysinfo.physical_cores()
    torch.set_num_threads(threads)
    providers = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    used = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    device = "cuda:0" if "CUDAExecutionProvider" in used else "cpu"
    images, labels = test_images(manifest, data_dir, download)
    if limit:
        images, labels = images[:limit], labels[:limit]
    names = list(names or available_runtimes(manifest))
    runners = load_runners(model_dir, manifest, names, threads, device)
    flops = model_flops(manifest["model_config"], manifest_lib.image_size(manifest))
    sgemm = sgemm_gflops(threads)
    peak = sgemm["best"]
    predictions = {name: runtimes.run_batched(runner, images, 1000).argmax(1) for name, runner in runners.items()}
    # PyTorch is what the others answer to, timed among them or not; its logits give the calibration
    eager = runners.get("pytorch-eager") or open_model(model_dir / manifest["artifacts"]["reference"],
                                                        threads=threads, manifest=manifest)
    reference_logits = runtimes.run_batched(eager, images, 1000)
    reference = reference_logits.argmax(1)
    fp32_accuracy = float((reference == labels).mean())
    results = []
    for name, runner in runners.items():
        check = validation(name, predictions[name], reference, labels, fp32_accuracy)
        if limit:  # a smoke run: a few hundred images cannot tell a 0.1-point drop, so nothing is judged
            check["valid"] = None
        for batch in batch_sizes:
            log(f"{name} batch {batch}")
            cell = time_cell(runner, images, batch, warmup, seconds, min_batches)
            gflops = flops * cell["images_per_s"] / 1e9
            results.append({"runtime": name, "batch": batch, **cell, **check, "gflops": gflops,
                            "share_of_sgemm": gflops / peak})
    return {
        "benchmark": "inference",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": sysinfo.machine(),
        "versions": sysinfo.versions("torch", "onnxruntime", "openvino", "onnx", "numpy"),
        "native_bf16": "openvino-bf16" in names,
        "settings": {"model_dir": str(model_dir), "threads": threads, "batch_sizes": list(batch_sizes),
                     "runtimes": names, "seconds_per_cell": seconds, "warmup_batches": warmup,
                     "min_batches": min_batches, "images": len(images)},
        "providers": {"requested": providers, "used": used,
                      "absent": [p for p in providers if p not in available], "available": available},
        "model_mflop_per_image": flops / 1e6,
        "sgemm_gflops": peak,
        "sgemm_gflops_by_library": sgemm,
        "model": manifest["source_checkpoint"],
        "pytorch_test_accuracy": fp32_accuracy,
        "calibration": before_and_after(reference_logits, labels, manifest_lib.temperature(manifest)),
        "results": results,
        "comparisons": comparisons(results),
        "fastest": fastest(results),
    }


def validation(name: str, predictions, reference, labels, fp32_accuracy: float) -> dict:
    """An fp32 runtime must match PyTorch's accuracy exactly; bf16 and INT8 may lose MAX_DROP_POINTS at most,
    judged on the whole test set."""
    accuracy = float((predictions == labels).mean())
    drop = 100 * (fp32_accuracy - accuracy)
    exact = precision(name) == "fp32"
    return {"precision": precision(name), "accuracy": accuracy, "accuracy_drop_points": drop,
            "argmax_agreement": float((predictions == reference).mean()),
            "valid": accuracy == fp32_accuracy if exact else drop <= MAX_DROP_POINTS + 1e-9}


def fastest(results: list) -> list:
    """The fastest valid runtime at each batch size, with its lead over onnxruntime fp32."""
    rows = []
    for batch in sorted({r["batch"] for r in results}):
        cells = [r for r in results if r["batch"] == batch and r["valid"] is not False]
        if not cells:
            continue
        best = max(cells, key=lambda r: r["images_per_s"])
        base = next((r for r in cells if r["runtime"] == "onnxruntime-fp32"), None)
        rows.append({"batch": batch, "runtime": best["runtime"], "images_per_s": best["images_per_s"],
                     "vs_onnxruntime_fp32": best["images_per_s"] / base["images_per_s"] if base else None})
    return rows


def comparisons(results: list) -> list:
    """Speed-ups against the baselines that matter, batch by batch, from this same run."""
    cell = {(r["runtime"], r["batch"]): r for r in results}
    rows = []
    for (name, batch), r in cell.items():
        for base in ("pytorch-eager", "onnxruntime-fp32"):
            b = cell.get((base, batch))
            if b and name != base and name not in ("pytorch-eager", "torchscript"):
                rows.append({"runtime": name, "baseline": base, "batch": batch,
                             "speedup": r["images_per_s"] / b["images_per_s"],
                             "accuracy_drop_points": 100 * (b["accuracy"] - r["accuracy"])})
    return rows


def format_table(report: dict) -> str:
    lines = [f"{'runtime':<18} {'batch':>6} {'images/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
             f"{'accuracy':>9} {'drop':>6} {'agree':>7} {'% sgemm':>8}"]
    for r in report["results"]:
        lines.append(f"{r['runtime']:<18} {r['batch']:>6} {r['images_per_s']:>10.0f} {r['p50_ms']:>8.2f} "
                     f"{r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} {100 * r['accuracy']:>8.2f}% "
                     f"{r['accuracy_drop_points']:>6.2f} {100 * r['argmax_agreement']:>6.2f}% "
                     f"{100 * r['share_of_sgemm']:>7.1f}%{'  OUT OF TOLERANCE' if r['valid'] is False else ''}")
    lines.append(f"sgemm: {report['sgemm_gflops']:.0f} GFLOP/s at {report['settings']['threads']} threads; "
                 f"model: {report['model_mflop_per_image']:.1f} MFLOP per image")
    for c in report["comparisons"]:
        if c["baseline"] == "onnxruntime-fp32":
            lines.append(f"{c['runtime']} vs onnxruntime-fp32 at batch {c['batch']}: {c['speedup']:.2f}x, "
                         f"accuracy drop {c['accuracy_drop_points']:+.2f} points")
    if "calibration" in report:  # reports written before calibration existed have none
        lines.append("calibration on the test set, " + calibration_line(**report["calibration"]))
    for f in report["fastest"]:
        lead = f" ({f['vs_onnxruntime_fp32']:.2f}x onnxruntime-fp32)" if f["vs_onnxruntime_fp32"] else ""
        lines.append(f"fastest at batch {f['batch']}: {f['runtime']}, {f['images_per_s']:.0f} images/s{lead}")
    return "\n".join(lines)


def calibration_table(reports: list) -> str:
    """The README's calibration table: each benchmarked model's test-set calibration without and with its
    temperature (reports written before calibration existed are left out)."""
    lines = ["| machine | model | test accuracy | temperature | ECE | NLL | answers >= 0.9 sure |",
             "|---|---|---|---|---|---|---|"]
    for report in (r for r in reports if "calibration" in r):
        before, after = report["calibration"]["before"], report["calibration"]["after"]
        recipe = report.get("model", {}).get("recipe", {})
        epochs = f"{recipe['epochs']} epoch" + ("s" if recipe.get("epochs") != 1 else "")
        model = f"`{recipe['preset']}`, seed {recipe['seed']}, {epochs}" if recipe else "?"

        lines.append(f"| {report['machine']['cpu']} ({report['machine'].get('cpu_capability', '?')}) | {model} | "
                     f"{100 * report['pytorch_test_accuracy']:.2f}% | {after['temperature']:.3f} | "
                     f"{100 * before['ece']:.2f}% -> **{100 * after['ece']:.2f}%** | "
                     f"{before['nll']:.4f} -> {after['nll']:.4f} | "
                     f"{confident_answers(before)} -> {confident_answers(after)} |")
    sources = ", ".join(r["_source"] for r in reports if "calibration" in r)
    lines += ["", f"Generated by `jobs/perf_table.py` from {sources}: `mnist-dist bench` on all 10,000 test images; "
              "ECE over 15 equal-width confidence bins; before = plain softmax, after = the exported temperature."]
    return "\n".join(lines)


def readme_table(reports: list) -> str:
    """The README's inference table: images/s per runtime and batch size, and the lead over onnxruntime fp32."""
    lines = []
    for report in reports:
        m = report["machine"]
        batches = report["settings"]["batch_sizes"]
        cells = {(r["runtime"], r["batch"]): r for r in report["results"]}
        names = list(dict.fromkeys(r["runtime"] for r in report["results"]))
        lines += [f"**{m['cpu']} ({m.get('cpu_capability', '?')}), {report['settings']['threads']} threads**, "
                  f"images/s (x onnxruntime fp32), from {report['_source']}:", "",
                  "| runtime | " + " | ".join(f"batch {b:,}" for b in batches) + " | test accuracy (drop) |",
                  "|---|" + "---|" * (len(batches) + 1)]
        for name in names:
            row = []
            for b in batches:
                cell, base = cells.get((name, b)), cells.get(("onnxruntime-fp32", b))
                row.append("-" if cell is None else f"{cell['images_per_s']:,.0f}" +
                           (f" ({cell['images_per_s'] / base['images_per_s']:.2f}x)" if base else ""))
            first = cells[name, batches[0]]
            drop = first.get("accuracy_drop_points")
            accuracy = f"{100 * first['accuracy']:.2f}%" + ("" if drop is None else f" ({drop:+.2f})")
            lines.append(f"| {name} | " + " | ".join(row) + f" | {accuracy} |")
        fastest = report.get("fastest")
        if fastest:
            lines += ["", "Fastest here: " + "; ".join(f"batch {f['batch']:,}: {f['runtime']}" for f in fastest) + "."]
        lines.append("")
    return "\n".join(lines).rstrip()
