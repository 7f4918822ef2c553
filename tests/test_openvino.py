"""OpenVINO beside onnxruntime: the same answers as PyTorch, in predict and serve, and one line where it is missing."""
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mnist_dist.bench import inference as bench
from mnist_dist.data import mnist
from mnist_dist.inference import manifest as manifest_lib
from mnist_dist.inference import runtimes
from mnist_dist.inference.manifest import model_input
from mnist_dist.inference.models import open_model
from mnist_dist.serving.app import create_app, load
from mnist_dist.serving.options import ServeOptions

from conftest import cpu_env, run, skip_unless_required

try:
    import openvino  # noqa: F401
except ImportError:
    skip_unless_required("the openvino extra is not installed")


@pytest.fixture(scope="module")
def test_set(exported_model):
    images, labels = mnist.load_split("test")
    x = model_input(images.numpy(), manifest_lib.load(exported_model))
    reference = runtimes.run_batched(open_model(exported_model / "reference.pt"), x, 1000).argmax(1)
    return x, labels.numpy(), reference


def accuracy_points(predictions, labels) -> float:
    return 100 * float((predictions == labels).mean())


def test_openvino_fp32_agrees_with_pytorch_on_every_test_image(exported_model, test_set):
    x, _, reference = test_set
    predictions = runtimes.run_batched(open_model(exported_model / "model.onnx", "openvino", 2), x, 1000).argmax(1)
    assert (predictions == reference).all()


def test_openvino_int8_and_bf16_lose_at_most_a_tenth_of_a_point(exported_model, test_set):
    x, labels, reference = test_set
    fp32 = accuracy_points(reference, labels)
    int8 = runtimes.run_batched(open_model(exported_model / "model.int8.onnx", "openvino", 2), x, 1000).argmax(1)
    assert fp32 - accuracy_points(int8, labels) <= bench.MAX_DROP_POINTS
    if not runtimes.openvino_bf16():
        pytest.skip("this CPU has no native bf16")
    bf16 = runtimes.run_batched(open_model(exported_model / "model.onnx", "openvino-bf16", 2), x, 1000).argmax(1)
    assert fp32 - accuracy_points(bf16, labels) <= bench.MAX_DROP_POINTS


def test_predict_and_serve_run_on_openvino(exported_model, tmp_path):
    pixels, _ = mnist.load_split("test")
    np.save(tmp_path / "digits.npy", pixels[:500].numpy())
    outputs = {}
    for runtime in ("onnxruntime", "openvino"):
        out = tmp_path / f"{runtime}.csv"
        proc = run([sys.executable, "jobs/predict.py", tmp_path / "digits.npy",
                    "--model", exported_model / "model.onnx", "--out", out, "--runtime", runtime])
        assert f"process 0: {runtime}" in proc.stderr
        outputs[runtime] = [line.split(",")[1] for line in out.read_text().splitlines()[1:]]
    assert outputs["openvino"] == outputs["onnxruntime"]
    with TestClient(create_app(load(ServeOptions(str(exported_model), runtime="openvino")))) as client:
        assert client.get("/v1/model").json()["runtime"].startswith("openvino CPU fp32")
        assert client.get("/v2/models/mnist").json()["platform"] == "openvino"  # Triton's name for what runs it
        answer = client.post("/v1/predict", json={"images": pixels[:20].numpy().tolist()}).json()["results"]
    assert [str(r["prediction"]) for r in answer] == outputs["onnxruntime"][:20]


def test_auto_follows_the_benchmark_beside_the_model(exported_model, tmp_path):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(exported_model, folder)
    rows = [{"runtime": name, "batch": batch, "images_per_s": speed} for name, batch, speed in [
        ("onnxruntime-fp32", 1, 9000), ("openvino-fp32", 1, 5000),
        ("onnxruntime-fp32", 1024, 7000), ("openvino-fp32", 1024, 9000)]]
    (folder / "bench.json").write_text(json.dumps({"results": rows}))
    assert runtimes.choose_runtime(folder / "model.onnx", "auto", 1)[0] == "onnxruntime"
    assert runtimes.choose_runtime(folder / "model.onnx", "auto", 256)[0] == "openvino"  # 1024 is nearer than 1
    # The server chooses for its largest batch, as under load: here OpenVINO, slower for one image, faster for many.
    assert load(ServeOptions(str(folder), threads=1)).default().runner.description.startswith("openvino CPU fp32")
    assert load(ServeOptions(str(folder), threads=1, max_batch=1)).default().runner.description.startswith(
        "onnxruntime")


def test_auto_without_a_benchmark_follows_what_was_measured_on_each_cpu(exported_model, monkeypatch):
    fp32, int8 = exported_model / "model.onnx", exported_model / "model.int8.onnx"
    assert not (exported_model / "bench.json").exists()
    monkeypatch.setattr(runtimes.sysinfo, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert [runtimes.choose_runtime(m, "auto", b)[0] for m, b in [(fp32, 1), (fp32, 256), (int8, 1), (int8, 256)]] \
        == ["onnxruntime", "onnxruntime", "onnxruntime", "openvino"]
    monkeypatch.setattr(runtimes.sysinfo, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    chosen = [runtimes.choose_runtime(m, "auto", b)[0] for m, b in [(fp32, 1), (fp32, 256)]]
    assert chosen == ["onnxruntime", "openvino"]


def test_a_missing_openvino_is_one_error_line(exported_model, tmp_path):
    shadow = tmp_path / "shadow" / "openvino"  # an openvino that fails to import, as a broken or absent install
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'openvino'\")\n")
    np.save(tmp_path / "digits.npy", mnist.load_split("test")[0][:5].numpy())
    proc = run([sys.executable, "-m", "mnist_dist.cli", "predict", tmp_path / "digits.npy", "--model",
                exported_model / "model.onnx", "--runtime", "openvino"],
               env=cpu_env(PYTHONPATH=str(tmp_path / "shadow")), check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1 and 'pip install "mnist-dist[openvino]"' in errors[0]
