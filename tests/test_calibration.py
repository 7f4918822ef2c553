"""Calibrated confidence: the temperature fitted at export, and what it does on the 10,000 test images."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mnist_dist import scores
from mnist_dist.data import mnist
from mnist_dist.training import checkpoint

from conftest import calibrated_softmax, ece_15_bins


def test_the_fitted_temperature_minimises_the_negative_log_likelihood():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    logits = rng.normal(size=(2000, 10))
    logits[np.arange(2000), labels] += rng.uniform(0, 6, 2000)  # right more often than not, unevenly sure
    for stretch in (0.2, 1.0, 5.0):  # under-confident, about right, over-confident
        grid = np.exp(np.linspace(np.log(0.01), np.log(100), 4001))
        picked = [calibrated_softmax(logits * stretch, t)[np.arange(2000), labels] for t in grid]
        nll = [-np.log(np.maximum(p, 1e-300)).mean() for p in picked]
        best = grid[int(np.argmin(nll))]
        assert abs(scores.fit_temperature(logits * stretch, labels) / best - 1) < 3e-3


def test_expected_calibration_error_of_a_hand_counted_case():
    # Two answers 0.95 sure, one of them right: bin (14/15, 1], gap 0.45. One right at 0.62, in (9/15, 10/15]: gap
    # 0.38. One wrong at 0.68, in (10/15, 11/15]: gap 0.68 (ten bins would pool the last two: gap 0.15).
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.62, 0.38], [0.68, 0.32]])
    labels = np.array([0, 1, 0, 1])
    assert scores.expected_calibration_error(probabilities, labels) == pytest.approx((2 * 0.45 + 0.38 + 0.68) / 4)
    assert scores.calibration(np.log(probabilities), labels)["confident_share"] == 0.5


def test_export_fits_a_temperature_that_calibrates_the_test_set(exported):
    """Checked without the package's code: onnxruntime's logits, softmax and ECE written out in the test."""
    out, proc = exported
    manifest = json.loads((out / "manifest.json").read_text())
    calibration = manifest["calibration"]
    assert calibration["fit_images"] == 10_000 and "never the test set" in calibration["fitted_on"]
    images, labels = mnist.load_split("test")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": images.numpy()[:, None].astype(np.float32) / 255})[0]
    labels = labels.numpy()
    plain, scaled = calibrated_softmax(logits, 1.0), calibrated_softmax(logits, calibration["temperature"])
    before, after = ece_15_bins(plain, labels), ece_15_bins(scaled, labels)
    # Label smoothing left the model under-confident; one temperature brings it within a point of its accuracy.
    assert plain.max(1).mean() < (plain.argmax(1) == labels).mean() - 0.05
    assert after <= 0.01 < before
    right = scaled.argmax(1) == labels
    assert (scaled.max(1)[right] >= 0.9).mean() > 0.5  # most right answers are now above 0.9
    recorded = calibration["test_before"]["ece"], calibration["test_after"]["ece"]
    assert recorded == pytest.approx((before, after), abs=1e-6)
    assert f"ECE {100 * before:.2f}% -> {100 * after:.2f}%" in proc.stdout


def test_the_weight_average_is_what_is_exported(exported, trained_run):
    state = checkpoint.load(checkpoint.latest_checkpoint(trained_run))
    exported_weights = torch.load(exported[0] / "reference.pt", weights_only=True)["model"]
    assert state["train_config"]["ema"] == 0.99
    assert all(torch.equal(exported_weights[k], state["model"][k]) for k in state["model"])  # the average
    assert not all(torch.equal(exported_weights[k], state["train_model"][k]) for k in state["train_model"])
