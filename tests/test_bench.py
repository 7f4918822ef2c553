"""Inference bench on a small --limit (the full benchmark is not for CI)."""
import json
import sys
import time

from mnist_dist.bench import inference as bench
from mnist_dist.model import CNN
from mnist_dist.reports import plots

from conftest import cpu_flags, run


def test_model_flops_match_the_layers():
    assert round(bench.model_flops(CNN().config, (28, 28)) / 1e6, 1) == 20.8


def test_bench_reports_every_runtime_and_batch(exported_model, tmp_path):
    import shutil

    import onnxruntime

    model = tmp_path / "model"  # bench writes bench.json beside the model, which `--runtime auto` reads: a copy
    shutil.copytree(exported_model, model)
    native_bf16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})  # before the run: it may skip
    out = tmp_path / "bench.json"
    started = time.perf_counter()
    proc = run([sys.executable, "-m", "mnist_dist.cli", "bench", "--model-dir", model, "--limit", 300,
                "--batch-sizes", "1,64", "--seconds", "0.2", "--threads", "1", "--json", out,
                "--providers", "CUDAExecutionProvider,CPUExecutionProvider"])
    wall = time.perf_counter() - started
    report = json.loads(out.read_text())
    assert {"cpu", "cores"} <= report["machine"].keys()
    assert {"torch", "onnxruntime", "onnx"} <= report["versions"].keys()
    assert report["settings"]["threads"] == 1 and report["settings"]["images"] == 300
    cells = {(r["runtime"], r["batch"]) for r in report["results"]}
    expected = [rt for rt in bench.RUNTIMES if native_bf16 or rt != "openvino-bf16"]
    assert cells == {(rt, b) for rt in expected for b in (1, 64)}
    keys = {"runtime", "batch", "images_per_s", "p50_ms", "p90_ms", "p99_ms", "accuracy", "share_of_sgemm"}
    assert all(keys <= r.keys() for r in report["results"])
    # Each cell timed some batches, and the times it reports fit in the command's wall time.
    timed = [r["timed_batches"] * min(r["batch"], 300) / r["images_per_s"] for r in report["results"]]
    assert all(r["timed_batches"] >= 1 for r in report["results"])
    assert sum(timed) < wall
    p50 = {(r["runtime"], r["batch"]): r["p50_ms"] for r in report["results"]}
    assert all(0 < p50[name, 1] < p50[name, 64] for name in expected)  # 64 images take longer than 1
    fp32 = {r["accuracy"] for r in report["results"] if r["precision"] == "fp32"}
    assert len(fp32) == 1  # every fp32 runtime (eager, TorchScript, onnxruntime, OpenVINO) agrees on all 300
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert ("CUDAExecutionProvider" in report["providers"]["absent"]) == (not has_cuda)
    assert ("not available" in proc.stdout) == (not has_cuda)
    assert any(c["runtime"] == "onnxruntime-int8" and c["baseline"] == "onnxruntime-fp32"
               for c in report["comparisons"])
    calibration = report["calibration"]  # on the 300 images benchmarked
    assert calibration["after"]["ece"] < calibration["before"]["ece"]
    assert calibration["after"]["temperature"] == json.loads((model / "manifest.json").read_text())[
        "calibration"]["temperature"]
    assert f"ECE {100 * calibration['before']['ece']:.2f}% -> {100 * calibration['after']['ece']:.2f}%" in proc.stdout
    plots.png_size(model / "confusion.png")  # bench drew the report's pictures too
    plots.png_size(model / "calibration.png")
    assert "| onnxruntime-int8 | 64 |" in (model / "report.md").read_text()
    assert json.loads((model / "bench.json").read_text()) == report


def test_int8_manifest_entry(exported_model):
    manifest = json.loads((exported_model / "manifest.json").read_text())
    assert manifest["artifacts"]["int8"] == "model.int8.onnx"
    assert manifest["int8"]["calibration"]["split"] == "train"
    from mnist_dist.inference.manifest import sha256

    assert manifest["files"]["model.int8.onnx"]["sha256"] == sha256(exported_model / "model.int8.onnx")
    assert abs(manifest["int8"]["accuracy"] - manifest["pytorch_test_accuracy"]) < 0.01
