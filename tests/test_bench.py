"""Inference bench on a small --limit (the full benchmark is not for CI)."""
import json
import sys

from mnist_dist.inference import bench
from mnist_dist.model import CNN
from mnist_dist.reports import plots

from conftest import run


def test_model_flops_match_the_layers():
    assert round(bench.model_flops(CNN().config, (28, 28)) / 1e6, 1) == 20.8


def test_bench_reports_every_runtime_and_batch(exported_model, tmp_path):
    out = tmp_path / "bench.json"
    proc = run([sys.executable, "-m", "mnist_dist.cli", "bench", "--model-dir", exported_model, "--limit", 300,
                "--batch-sizes", "1,64", "--seconds", "0.2", "--threads", "1", "--json", out,
                "--providers", "CUDAExecutionProvider,CPUExecutionProvider"])
    report = json.loads(out.read_text())
    assert {"cpu", "cores"} <= report["machine"].keys()
    assert {"torch", "onnxruntime", "onnx"} <= report["versions"].keys()
    assert report["settings"]["threads"] == 1 and report["settings"]["images"] == 300
    cells = {(r["runtime"], r["batch"]) for r in report["results"]}
    assert cells == {(rt, b) for rt in bench.RUNTIMES for b in (1, 64)}
    keys = {"runtime", "batch", "images_per_s", "p50_ms", "p90_ms", "p99_ms", "accuracy", "share_of_sgemm"}
    assert all(keys <= r.keys() and r["images_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"] for r in report["results"])
    fp32 = {r["accuracy"] for r in report["results"] if r["runtime"] != "onnxruntime-int8"}
    assert len(fp32) == 1  # eager, TorchScript and ONNX agree on every one of the 300 images' labels
    assert "CUDAExecutionProvider" in report["providers"]["absent"] and "not available" in proc.stdout
    assert any(c["runtime"] == "onnxruntime-int8" and c["baseline"] == "onnxruntime-fp32"
               for c in report["comparisons"])
    assert plots.png_size(exported_model / "confusion.png") == (800, 800)
    assert "| onnxruntime-int8 | 64 |" in (exported_model / "report.md").read_text()


def test_int8_manifest_entry(exported_model):
    manifest = json.loads((exported_model / "manifest.json").read_text())
    assert manifest["artifacts"]["int8"] == "model.int8.onnx"
    assert manifest["int8"]["calibration"]["split"] == "train"
    from mnist_dist.exporting.manifest import sha256

    assert manifest["files"]["model.int8.onnx"]["sha256"] == sha256(exported_model / "model.int8.onnx")
    assert abs(manifest["int8"]["accuracy"] - manifest["pytorch_test_accuracy"]) < 0.01
