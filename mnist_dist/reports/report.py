"""Reports: training curves for a run, and test-set pictures plus report.md for an exported model."""
import json
from pathlib import Path

import numpy as np

from .. import atomic
from ..data import mnist
from ..errors import UserError
from ..inference import manifest as manifest_lib
from ..inference import runtimes
from ..inference.models import open_model
from ..scores import before_and_after, reliability, softmax
from . import plots

CURVES = "curves.png"
CONFUSION = "confusion.png"
CALIBRATION = "calibration.png"
MISTAKES = "mistakes.png"
PICTURES = (CONFUSION, CALIBRATION, MISTAKES)
REPORT = "report.md"
BENCH_JSON = "bench.json"


def run_curves(run_dir) -> Path:
    """(Re)draw curves.png in a training run's folder from its metrics.jsonl and steps.jsonl."""
    run_dir = Path(run_dir)
    metrics, steps = run_dir / "metrics.jsonl", run_dir / "steps.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir} holds no metrics.jsonl: is it a training --output-dir?")
    try:
        rows = atomic.read_jsonl(metrics)
        step_rows = atomic.read_jsonl(steps) if steps.is_file() else []
    except json.JSONDecodeError as e:
        raise UserError(f"{run_dir}: a metrics file is corrupt ({e})") from e
    if not rows:
        raise UserError(f"{metrics} has no finished epoch yet")
    config = run_dir / "config.json"
    smoothing = json.loads(config.read_text()).get("label_smoothing", 0.0) if config.is_file() else 0.0
    plots.training_curves(rows, step_rows, run_dir / CURVES, smoothing)
    return run_dir / CURVES


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels * classes + predictions, minlength=classes * classes).reshape(classes, classes)


def per_class(cm: np.ndarray) -> list:
    hits = np.diag(cm)
    predicted, actual = cm.sum(0), cm.sum(1)
    return [{"class": c, "precision": hits[c] / predicted[c] if predicted[c] else 0.0,
             "recall": hits[c] / actual[c] if actual[c] else 0.0, "support": int(actual[c])}
            for c in range(len(cm))]


def predict_test_set(model_dir, manifest: dict, data_dir=None, download=True) -> tuple:
    """(uint8 images, labels, logits) of the folder's ONNX model on the test set."""
    images, labels = mnist.load_split("test", data_dir, download)
    runner = open_model(Path(model_dir) / manifest["artifacts"]["onnx"], "onnxruntime", manifest=manifest)
    logits = runtimes.run_batched(runner, manifest_lib.model_input(images.numpy(), manifest), 1000)
    return images.numpy(), labels.numpy(), logits


def draw_calibration(logits, labels, manifest: dict, path) -> dict:
    """calibration.png, and the test set's calibration without and with the manifest's temperature."""
    temperature = manifest_lib.temperature(manifest)
    summary = before_and_after(logits, labels, temperature)
    curves = {"softmax(logits)": {"bins": reliability(softmax(logits), labels),
                                  "ece": summary["before"]["ece"]}}
    if "calibration" in manifest:
        curves[f"softmax(logits / {temperature:.3f})"] = {
            "bins": reliability(manifest_lib.probabilities(logits, manifest), labels), "ece": summary["after"]["ece"]}
    summary["picture"] = plots.reliability(curves, path)
    return summary


def model_report(model_dir, data_dir=None, download=True, out_dir=None, limit=100, bench=None) -> dict:
    """confusion.png, mistakes.png and report.md for an exported model; ``bench`` adds the throughput table."""
    model_dir = Path(model_dir)
    out_dir = Path(out_dir or model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = manifest_lib.load(model_dir)
    if bench is None and (model_dir / BENCH_JSON).is_file():
        bench = json.loads((model_dir / BENCH_JSON).read_text())
    images, labels, logits = predict_test_set(model_dir, manifest, data_dir, download)
    probabilities = manifest_lib.probabilities(logits, manifest)
    predictions, confidences = probabilities.argmax(1), probabilities.max(1)
    cm = confusion_matrix(labels, predictions, len(manifest["classes"]))
    drawn_confusion = plots.confusion(cm, out_dir / CONFUSION, manifest["classes"])
    drawn_mistakes = plots.mistakes(images, labels, predictions, confidences, out_dir / MISTAKES, limit)
    shown = drawn_mistakes.pop("shown")
    summary = {"accuracy": float(np.trace(cm) / cm.sum()), "test_samples": int(cm.sum()),
               "mistakes": int(cm.sum() - np.trace(cm)), "mistakes_shown": shown,
               "pictures": {"confusion": drawn_confusion, "mistakes": drawn_mistakes},
               "confusion": cm.tolist(), "per_class": per_class(cm),
               "calibration": draw_calibration(logits, labels, manifest, out_dir / CALIBRATION)}
    atomic.write_text(out_dir / REPORT, render_markdown(summary, manifest, bench))
    return summary


def calibration_section(calibration: dict, manifest: dict) -> str:
    if "calibration" not in manifest:
        return ("This model was exported before calibration existed: its probabilities are the plain softmax of "
                "the logits. Export it again to fit a temperature.")
    before, after = calibration["before"], calibration["after"]
    rows = [("expected calibration error (15 bins)", f"{100 * before['ece']:.2f}%", f"{100 * after['ece']:.2f}%"),
            ("negative log-likelihood", f"{before['nll']:.4f}", f"{after['nll']:.4f}"),
            ("mean confidence", f"{100 * before['mean_confidence']:.2f}%", f"{100 * after['mean_confidence']:.2f}%"),
            ("answers at least 90% sure", f"{100 * before['confident_share']:.1f}%",
             f"{100 * after['confident_share']:.1f}%"),
            ("accuracy of those answers", *(f"{100 * c['confident_accuracy']:.2f}%"
                                            if c["confident_accuracy"] is not None else "-" for c in (before, after)))]
    return "\n".join([
        f"Probabilities are `softmax(logits / {after['temperature']:.4f})`, the temperature fitted at export on "
        f"{manifest['calibration']['fitted_on']}. Predictions and accuracy are the same either way.",
        "", "| on the 10,000 test images | plain softmax | calibrated |", "|---|---|---|",
        *(f"| {name} | {a} | {b} |" for name, a, b in rows)])


def render_markdown(summary: dict, manifest: dict, bench) -> str:
    lines = [
        "# MNIST test-set report",
        "",
        f"Model: `{manifest['artifacts']['onnx']}` through onnxruntime "
        f"(source checkpoint `{manifest['source_checkpoint']['path']}`).",
        "",
        f"**Accuracy: {100 * summary['accuracy']:.2f}%** ({summary['test_samples'] - summary['mistakes']:,} of "
        f"{summary['test_samples']:,} test images; {summary['mistakes']} misclassified).",
        "",
        f"![confusion matrix]({CONFUSION})",
        "",
        "| class | precision | recall | support |",
        "|---|---|---|---|",
        *(f"| {row['class']} | {100 * row['precision']:.2f}% | {100 * row['recall']:.2f}% | {row['support']} |"
          for row in summary["per_class"]),
        "",
        "## Calibration",
        "",
        calibration_section(summary["calibration"], manifest),
        "",
        f"![reliability diagram]({CALIBRATION})",
        "",
        f"## Misclassified images ({len(summary['mistakes_shown'])} of {summary['mistakes']} shown)",
        "",
        f"![mistakes]({MISTAKES})",
        "",
        "## Throughput",
        "",
    ]
    if bench:
        lines += ["| runtime | batch | images/s | p50 ms | p90 ms | p99 ms | accuracy |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['runtime']} | {r['batch']} | {r['images_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} "
                  f"| {r['p99_ms']:.2f} | {100 * r['accuracy']:.2f}% |" for r in bench["results"]]
    else:
        lines.append("No benchmark yet: run `mnist-dist bench --model-dir DIR` to add throughput figures.")
    return "\n".join(lines) + "\n"
