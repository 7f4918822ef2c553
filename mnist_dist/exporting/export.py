"""Export a checkpoint to TorchScript, ONNX and torch.export, validated before it is published.

Everything is written into a hidden staging folder beside ``out_dir`` and
renamed to ``out_dir`` only after every artifact has matched PyTorch on the
whole test set: a folder named ``out_dir`` is always complete and valid, and
a failed or killed export leaves nothing under that name.
"""
import shutil
import tempfile
from pathlib import Path

import torch

from .. import atomic
from ..errors import UserError
from ..inference import manifest as manifest_lib
from ..inference import repository
from ..inference.models import open_model
from ..inference.torch_runtime import quiet_torchscript
from ..model import IMAGE_SIZE
from ..training import checkpoint
from .calibrate import calibrate
from .validate import ATOL, BATCH_SIZES, RTOL, check_onnx_file, test_images, validate_artifacts


def example_input(batch: int = 2) -> torch.Tensor:
    # Batch 2, not 1: torch.export specialises a dimension it sees as 0 or 1.
    return torch.rand(batch, 1, IMAGE_SIZE, IMAGE_SIZE)


def write_torchscript(model, path) -> None:
    with quiet_torchscript():
        traced = torch.jit.trace(model, example_input())  # no data-dependent control flow: tracing is exact
        traced.save(str(path))


def batch_dim():
    return torch.export.Dim("batch", min=1, max=1 << 20)


def write_onnx(model, path, contract: dict) -> None:
    torch.onnx.export(
        model, (example_input(),), str(path),
        input_names=[contract["input"]["name"]], output_names=[contract["output"]["name"]],
        dynamic_shapes={"x": {0: batch_dim()}}, opset_version=manifest_lib.OPSET,
        external_data=False,  # one self-contained file, no model.onnx.data beside it
        dynamo=True, verbose=False,
    )


def write_pt2(model, path) -> None:
    program = torch.export.export(model, (example_input(),), dynamic_shapes={"x": {0: batch_dim()}})
    torch.export.save(program, str(path))


def write_reference(model, path) -> None:
    torch.save({"model": model.state_dict(), "model_config": model.config}, str(path))


def check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder")
    atomic.check_folder_writable(out_dir.absolute().parent, "--out-dir")


def publish(staging: Path, out_dir: Path) -> Path:
    """Swap the finished staging folder in under its final name."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        out_dir.rename(old / out_dir.name)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)
    return out_dir


def versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__}


def export_model(source, out_dir, data_dir=None, force: bool = False, download: bool = True, log=print,
                 as_version: bool = False) -> tuple:
    """Export, validate, then publish ``out_dir``; with ``as_version``, ``out_dir`` is a model's folder in a model
    repository and the export becomes its next version. Returns (manifest, validation results, the folder)."""
    ckpt_path = checkpoint.resolve_checkpoint(source)
    model, state = checkpoint.load_model(ckpt_path)
    out_dir = Path(out_dir)
    if as_version:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic.check_folder_writable(out_dir, "--repository")
    else:
        check_out_dir(out_dir, force)
    contract = manifest_lib.contract(model.config, IMAGE_SIZE)
    images, labels = test_images(contract, data_dir, download)
    # A hidden staging folder beside the result (in the model's folder for a version: a server scanning the
    # repository takes only numbered folders, and only once they have a manifest).
    stage_in = out_dir.absolute() if as_version else out_dir.absolute().parent
    stage_in.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=stage_in))
    try:
        log(f"Exporting {ckpt_path} (epoch {state.get('epoch', '?')})")
        write_reference(model, staging / manifest_lib.REFERENCE)
        write_torchscript(model, staging / manifest_lib.ARTIFACTS["torchscript"])
        write_onnx(model, staging / manifest_lib.ARTIFACTS["onnx"], contract)
        check_onnx_file(staging / manifest_lib.ARTIFACTS["onnx"], contract)
        write_pt2(model, staging / manifest_lib.ARTIFACTS["pt2"])
        log(f"Validating against PyTorch on {len(images):,} test images")
        draft = build_manifest(staging, ckpt_path, state, model, contract)
        results = validate_artifacts(staging, draft, images, labels)
        log("Fitting the temperature that calibrates the probabilities")
        eager = open_model(staging / manifest_lib.REFERENCE, manifest=draft)
        calibration = calibrate(eager, contract, results[0]["logits"], labels, data_dir, download)
        manifest = {**with_validation(draft, results), "calibration": calibration}
        atomic.write_json(staging / manifest_lib.MANIFEST, manifest)
        staging.chmod(0o777 & ~atomic.umask())  # mkdtemp makes it private; publish it with the usual mode
        published = repository.publish_version(staging, out_dir) if as_version else publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest, results, published


def build_manifest(folder: Path, ckpt_path: Path, state: dict, model, contract: dict) -> dict:
    """The folder's manifest before validation: what each file is, and its hash."""
    files = [manifest_lib.REFERENCE, *manifest_lib.ARTIFACTS.values()]
    return {
        "format_version": manifest_lib.FORMAT_VERSION,
        "status": "unvalidated",
        "source_checkpoint": {"path": str(ckpt_path.absolute()), "sha256": manifest_lib.sha256(ckpt_path),
                              "epoch": state.get("epoch"), "recipe": recipe(state)},
        "model_config": model.config,
        **contract,
        "artifacts": dict(manifest_lib.ARTIFACTS, reference=manifest_lib.REFERENCE),
        "files": {name: manifest_lib.describe_file(folder / name) for name in files},
        "opset": manifest_lib.OPSET,
        "versions": versions(),
    }


def recipe(state: dict) -> dict:
    """How the checkpoint was trained, as far as it says (checkpoints from other tools may say nothing)."""
    trained = state.get("train_config") or {}
    return {k: trained[k] for k in ("preset", "epochs", "batch_size", "lr", "label_smoothing", "augment", "ema",
                                    "seed", "mixed_precision") if k in trained}


def with_validation(manifest: dict, results: list) -> dict:
    return {
        **manifest,
        "status": "validated",
        "pytorch_test_accuracy": results[0]["accuracy"],
        "validation": {r["artifact"]: {k: r[k] for k in ("max_abs_diff", "argmax_mismatches", "accuracy")}
                       for r in results[1:]},
        "validation_tolerance": {"rtol": RTOL, "atol": ATOL, "batch_sizes": list(BATCH_SIZES)},
    }
