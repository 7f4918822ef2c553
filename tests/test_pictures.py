"""Pictures: valid PNGs of the promised size, a confusion matrix that adds up, an honest mistakes gallery."""
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mnist_dist.atomic import read_jsonl
from mnist_dist.cli import main
from mnist_dist.reports import plots, report

from conftest import calibrated_softmax, ece_15_bins, run


def test_preview_writes_the_tutorials_grid(mnist_root, tmp_path):
    from torchvision import datasets

    out = tmp_path / "grid.png"
    proc = run([sys.executable, "-m", "mnist_dist.cli", "preview", "--out", out])
    assert "Training images: 60000, test images: 10000" in proc.stdout
    assert plots.png_size(out) == (600, 600)  # the one picture whose size is checked: the tutorial's 6x6 inches
    labels = datasets.MNIST(str(mnist_root), train=True).targets[59000:59009]  # torchvision's own reading
    assert f"train images 59000..59008, titled {' '.join(str(int(v)) for v in labels)}" in proc.stdout


def test_preview_rejects_a_range_outside_the_split(mnist_root, tmp_path):
    result = CliRunner().invoke(main, ["preview", "--data-dir", str(mnist_root), "--split", "test",
                                       "--start", "9995", "--count", "9", "--out", str(tmp_path / "g.png")])
    assert result.exit_code != 0 and "outside the 10000 test images" in result.output
    assert not (tmp_path / "g.png").exists()


def test_training_writes_curves_and_report_redraws_them(trained_run, tmp_path):
    import shutil

    plots.png_size(trained_run / "curves.png")  # training drew it: a PNG
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "curves.png").unlink()
    rows, steps = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "steps.jsonl")
    assert len(steps) == 400 // 20  # 400 batches, a row every 20 steps
    rows.append({**rows[0], "epoch": 2, "run": 2})  # as if resumed for a second epoch
    steps += [{**s, "step": s["step"] + 400, "epoch": s["epoch"] + 1} for s in steps]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    result = CliRunner().invoke(main, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    plots.png_size(run_dir / "curves.png")
    drawn = plots.training_curves(rows, steps, tmp_path / "again.png")
    assert drawn["step_points"] == 40 and drawn["epoch_points"] == 2
    assert drawn["resumed_at"] == [1.0]  # the second run starts after epoch 1
    assert drawn["accuracy_axis"][1] == 100 and drawn["accuracy_axis"][0] < 100 * rows[0]["test_accuracy"]


def test_report_needs_something_to_report_on():
    result = CliRunner().invoke(main, ["report"])
    assert result.exit_code != 0 and "RUN_DIR" in result.output


def test_png_size_rejects_non_png(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    with pytest.raises(ValueError):
        plots.png_size(fake)


def test_confusion_matrix_and_per_class_figures():
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 1, 1, 1, 2, 0])
    cm = report.confusion_matrix(labels, predictions, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    stats = report.per_class(cm)
    assert stats[1]["precision"] == pytest.approx(2 / 3) and stats[1]["recall"] == 1.0
    assert stats[2]["precision"] == 1.0 and stats[2]["recall"] == 0.5


@pytest.fixture(scope="session")
def model_report(exported_model, mnist_root, tmp_path_factory):
    """The report of a model folder that has not been benchmarked (the bench test writes bench.json)."""
    import shutil

    model = tmp_path_factory.mktemp("unbenched") / "model"
    shutil.copytree(exported_model, model, ignore=shutil.ignore_patterns(report.BENCH_JSON))
    out = tmp_path_factory.mktemp("report")
    summary = report.model_report(model, mnist_root, download=False, out_dir=out, limit=25)
    return out, summary


@pytest.fixture(scope="module")
def onnx_logits(exported_model):
    """Test-set labels and the ONNX model's logits, computed here without the report code."""
    import onnxruntime as ort
    from torchvision.transforms.functional import to_tensor

    from mnist_dist.data import mnist

    images, labels = mnist.load_split("test")
    x = np.stack([to_tensor(image.numpy()).numpy() for image in images])  # the tutorial's own scaling
    session = ort.InferenceSession(str(exported_model / "model.onnx"), providers=["CPUExecutionProvider"])
    return labels.numpy(), session.run(None, {"images": x})[0]


@pytest.fixture(scope="module")
def onnx_predictions(onnx_logits):
    labels, logits = onnx_logits
    return labels, logits.argmax(1)


def test_model_report_confusion_adds_up_on_the_full_test_set(model_report, onnx_predictions):
    _out, summary = model_report
    labels, predictions = onnx_predictions
    cm = np.array(summary["confusion"])
    assert cm.shape == (10, 10) and cm.sum() == 10_000
    assert np.trace(cm) == int((predictions == labels).sum())  # the diagonal = the number correct
    drawn = summary["pictures"]["confusion"]  # read back from the figure's own annotations
    assert (drawn["cells"], drawn["annotated_total"], drawn["annotated_diagonal"]) == (100, 10_000, np.trace(cm))


def test_mistakes_gallery_shows_exactly_the_misclassified(model_report, onnx_predictions):
    _out, summary = model_report
    labels, predictions = onnx_predictions
    wrong = np.flatnonzero(predictions != labels)
    assert summary["mistakes"] == len(wrong) > 25
    assert summary["mistakes_shown"] == wrong[:25].tolist()
    drawn = summary["pictures"]["mistakes"]  # one panel per mistake shown, titled true / predicted
    assert drawn["panels"] == 25
    expected = [f"true {labels[i]} / pred {predictions[i]}" for i in wrong[:25]]
    assert [t.split("\n")[0] for t in drawn["titles"]] == expected


def test_report_markdown_states_accuracy_and_per_class_figures(model_report):
    out, summary = model_report
    text = (out / "report.md").read_text()
    assert f"**Accuracy: {100 * summary['accuracy']:.2f}%**" in text
    assert "(confusion.png)" in text and "(mistakes.png)" in text
    assert text.count("\n| ") >= 11  # header + 10 classes
    assert "mnist-dist bench" in text  # no benchmark yet: says how to add one


def test_reliability_diagram_and_calibration_table(model_report, onnx_logits, exported_model):
    out, summary = model_report
    labels, logits = onnx_logits
    temperature = json.loads((exported_model / "manifest.json").read_text())["calibration"]["temperature"]
    before = ece_15_bins(calibrated_softmax(logits, 1.0), labels)
    after = ece_15_bins(calibrated_softmax(logits, temperature), labels)
    calibration = summary["calibration"]
    assert (calibration["before"]["ece"], calibration["after"]["ece"]) == pytest.approx((before, after), abs=1e-6)
    drawn = calibration["picture"]  # the legend of the figure itself
    assert drawn["curves"] == [f"softmax(logits): ECE {100 * before:.2f}%",
                               f"softmax(logits / {temperature:.3f}): ECE {100 * after:.2f}%"]
    assert plots.png_size(out / "calibration.png") == (700, 800)
    text = (out / "report.md").read_text()
    assert f"| expected calibration error (15 bins) | {100 * before:.2f}% | {100 * after:.2f}% |" in text
    assert "(calibration.png)" in text


def test_readme_performance_table_matches_the_benchmark_files():
    proc = run([sys.executable, "jobs/perf_table.py", "--check"], check=False)
    assert proc.returncode == 0, proc.stderr
