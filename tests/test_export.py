"""Export: every artifact written, self-describing, and checked against PyTorch on all 10,000 test images."""
import json
import signal
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from mnist_dist.cli import main
from mnist_dist.errors import UserError
from mnist_dist.inference import manifest as manifest_lib
from mnist_dist.model import CNN

from conftest import run, sigkill_when

ARTIFACT_FILES = {"model.ts", "model.onnx", "model.pt2", "reference.pt", "manifest.json"}


def test_export_writes_every_artifact_with_a_manifest(exported, trained_run):
    out, proc = exported
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES  # no model.onnx.data, no leftovers
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["name"] == "images" and manifest["input"]["shape"] == ["batch", 1, 28, 28]
    assert manifest["input"]["dtype"] == "float32" and manifest["input"]["scale"] == 1 / 255
    assert "white digit on a black background" in manifest["input"]["polarity"]
    assert manifest["output"]["name"] == "logits" and manifest["output"]["shape"] == ["batch", 10]
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert manifest["opset"] == 18 and {"torch", "onnx", "onnxruntime"} <= manifest["versions"].keys()
    assert manifest["source_checkpoint"]["path"].endswith("epoch_0001.pt")
    trained = json.loads((trained_run / "metrics.json").read_text())["test_accuracy"]
    assert abs(manifest["pytorch_test_accuracy"] - trained) <= 2e-4  # eval batch 1000 vs 10,000: same model
    for name in ("torchscript", "onnx", "pt2"):
        assert manifest["validation"][name]["accuracy"] == manifest["pytorch_test_accuracy"]
        assert manifest["validation"][name]["argmax_mismatches"] == 0
    assert "onnx" in proc.stdout and "ok" in proc.stdout and "Warning" not in proc.stderr


def test_manifest_hashes_match_the_files(exported):
    out, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    for name, recorded in manifest["files"].items():
        assert manifest_lib.sha256(out / name) == recorded["sha256"]
        assert (out / name).stat().st_size == recorded["bytes"]
    assert set(manifest["files"]) == ARTIFACT_FILES - {"manifest.json"}


def test_onnx_batch_dimension_is_symbolic(exported):
    import onnxruntime as ort

    out, _ = exported
    model = onnx.load(str(out / "model.onnx"))
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        (logits,) = session.run(None, {"images": np.zeros((n, 1, 28, 28), np.float32)})
        assert logits.shape == (n, 10)


FRESH_PROCESS_CHECK = r"""
import json, sys, warnings
import numpy as np, onnxruntime as ort, torch
from mnist_dist.model import build_model
folder = sys.argv[1]
warnings.simplefilter("ignore", FutureWarning)
ref = torch.load(f"{folder}/reference.pt", weights_only=True)
eager = build_model(ref["model_config"]); eager.load_state_dict(ref["model"]); eager.eval()
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    want = eager(x).numpy()
    got = {
        "torchscript": torch.jit.load(f"{folder}/model.ts")(x).numpy(),
        "pt2": torch.export.load(f"{folder}/model.pt2").module()(x).numpy(),
        "onnx": ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
                .run(None, {"images": x.numpy()})[0],
    }
print(json.dumps({k: [float(np.abs(v - want).max()), int((v.argmax(1) != want.argmax(1)).sum())]
                  for k, v in got.items()}))
"""


def test_each_artifact_agrees_when_loaded_in_a_fresh_process(exported, tmp_path):
    from mnist_dist.data import batches, mnist

    out, _ = exported
    images, _ = mnist.load_split("test")
    np.save(tmp_path / "x.npy", batches.to_float(images[:500]).numpy())
    proc = run([sys.executable, "-c", FRESH_PROCESS_CHECK, out, tmp_path / "x.npy"])
    report = json.loads(proc.stdout)
    assert set(report) == {"torchscript", "pt2", "onnx"}
    for name, (max_diff, argmax_mismatches) in report.items():
        assert max_diff < 1e-3 and argmax_mismatches == 0, name


def test_validate_passes_then_catches_a_tampered_model(exported, tmp_path):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(exported[0], out)
    ok = run([sys.executable, "export/validate.py", out])
    assert "all artifacts match PyTorch" in ok.stdout
    model = onnx.load(str(out / "model.onnx"))
    weights = model.graph.initializer[0]
    array = onnx.numpy_helper.to_array(weights) * 1.5
    weights.CopyFrom(onnx.numpy_helper.from_array(array, weights.name))
    onnx.save(model, str(out / "model.onnx"))
    bad = run([sys.executable, "-m", "mnist_dist.cli", "validate", out], check=False)
    assert bad.returncode != 0 and "model.onnx" in bad.stderr and "Traceback" not in bad.stderr


def test_a_mismatch_names_the_worst_artifact_and_publishes_nothing(trained_run, mnist_root, tmp_path, monkeypatch):
    from mnist_dist.exporting import export

    real_write_onnx = export.write_onnx

    def write_skewed_onnx(model, path, contract):
        skewed = CNN()
        skewed.load_state_dict(model.state_dict())
        with torch.no_grad():
            skewed.out.bias += 0.5  # every logit off by 0.5: far outside tolerance
        real_write_onnx(skewed.eval(), path, contract)

    monkeypatch.setattr(export, "write_onnx", write_skewed_onnx)
    previous = tmp_path / "model"
    previous.mkdir()
    (previous / "manifest.json").write_text("{}")  # an older export that --force must not destroy
    with pytest.raises(UserError, match=r"validation failed: onnx differs from PyTorch by up to 0\.5"):
        export.export_model(trained_run, previous, data_dir=mnist_root, force=True, log=lambda *_: None)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind
    assert [p.name for p in previous.iterdir()] == ["manifest.json"]


def test_a_killed_export_leaves_nothing_under_the_final_name(trained_run, tmp_path):
    out = tmp_path / "model"
    # Killed once every file is written and none is yet published.
    code = sigkill_when([sys.executable, "export/export.py", "--checkpoint", trained_run, "--out-dir", out],
                        lambda line: line.startswith("Validating"))
    assert code == -signal.SIGKILL
    assert not out.exists()


def bad_checkpoints(tmp_path, trained_run):
    from mnist_dist.training import checkpoint

    state = checkpoint.load(checkpoint.latest_checkpoint(trained_run))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    other = tmp_path / "other_arch.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "model_config": {"arch": "resnet18"}}, other)
    renamed = tmp_path / "renamed_keys.pt"
    weights = {k.replace("conv1", "features"): v for k, v in state["model"].items()}
    torch.save({"model": weights, "model_config": state["model_config"]}, renamed)
    return {"missing": (tmp_path / "absent.pt", "does not exist"),
            "corrupt": (corrupt, "is corrupt or not a mnist-dist checkpoint"),
            "other architecture": (other, "unknown architecture 'resnet18'"),
            "mismatched keys": (renamed, "does not hold this project's CNN")}


@pytest.mark.parametrize("case", ["missing", "corrupt", "other architecture", "mismatched keys"])
def test_bad_checkpoints_give_one_line(case, trained_run, tmp_path):
    path, message = bad_checkpoints(tmp_path, trained_run)[case]
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(path), "--out-dir", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert result.output.startswith("Error:") and message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_bad_out_dirs_give_one_line(trained_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    existing = tmp_path / "existing"
    existing.mkdir()
    for out, message in [(blocker / "model", "is not writable"), (existing, "already exists; pass --force")]:
        result = CliRunner().invoke(main, ["export", "--checkpoint", str(trained_run), "--out-dir", str(out)])
        assert result.exit_code != 0 and message in result.output and result.output.count("\n") == 1
    assert list(existing.iterdir()) == []


def test_export_force_replaces_an_export_with_a_valid_one(exported, trained_run, tmp_path):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(exported[0], out)
    (out / "stale.txt").write_text("left by the previous export")
    source = tmp_path / "other.pt"
    shutil.copyfile(trained_run / "checkpoints" / "epoch_0001.pt", source)
    run([sys.executable, "export/export.py", "--checkpoint", source, "--out-dir", out, "--force"])
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES  # the old folder is gone, not merged
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_checkpoint"]["path"] == str(source)
    assert all(manifest_lib.sha256(out / name) == entry["sha256"] for name, entry in manifest["files"].items())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging or old folder left
