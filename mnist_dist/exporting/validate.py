"""Check exported models against the eager PyTorch model on the whole test set."""
from pathlib import Path

import numpy as np

from ..data import mnist
from ..errors import UserError, one_line
from ..inference import manifest as manifest_lib
from ..inference.models import open_model
from ..scores import accuracy

RTOL, ATOL = 1e-3, 1e-5
BATCH_SIZES = (1, 7, 10_000)


class ValidationFailed(UserError):
    """An artifact disagrees with PyTorch; the message names the worst one."""


def test_images(contract: dict, data_dir=None, download: bool = True) -> tuple:
    """The MNIST test set as the contract says: (float32 [N,1,28,28], int64 labels)."""
    images, labels = mnist.load_split("test", data_dir, download)
    return manifest_lib.model_input(images.numpy(), contract), labels.numpy()


def check_onnx_file(path, contract: dict) -> None:
    """The ONNX checker, plus the contract's names and a symbolic batch dimension."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # onnx raises ValidationError, protobuf DecodeError, ...
        raise ValidationFailed(f"{path} fails the ONNX checker: {one_line(e)}") from e
    graph = onnx.load(str(path), load_external_data=False).graph
    (inp,), (out,) = graph.input, graph.output
    if (inp.name, out.name) != (contract["input"]["name"], contract["output"]["name"]):
        raise ValidationFailed(f"{path}: input/output are {inp.name}/{out.name}, "
                               f"expected {contract['input']['name']}/{contract['output']['name']}")
    if not inp.type.tensor_type.shape.dim[0].dim_param:
        raise ValidationFailed(f"{path}: the batch dimension is fixed, not dynamic")


def logit_error(got: np.ndarray, want: np.ndarray) -> tuple:
    """(largest |difference|, largest excess over atol + rtol*|want|; <= 0 means within tolerance)."""
    diff = np.abs(got.astype(np.float64) - want)
    return float(diff.max()), float((diff - (ATOL + RTOL * np.abs(want))).max())


def check_runner(name, runner, eager_logits: dict, images, labels) -> dict:
    """Compare one artifact with eager logits at each batch size; argmax and accuracy on all images."""
    result = {"artifact": name, "max_abs_diff": 0.0, "excess": -np.inf, "worst_batch": None}
    for batch, want in eager_logits.items():
        got = runner(images[:batch])
        if got.shape != want.shape:
            raise ValidationFailed(f"{name} returned shape {got.shape} for batch {batch}, expected {want.shape}")
        diff, excess = logit_error(got, want)
        if excess > result["excess"]:
            result.update(max_abs_diff=diff, excess=excess, worst_batch=batch)
    # The last batch size covers every image.
    result["argmax_mismatches"] = int((got.argmax(1) != want.argmax(1)).sum())
    result["accuracy"] = accuracy(got, labels)
    result["ok"] = result["excess"] <= 0 and result["argmax_mismatches"] == 0
    return result


def validate_artifacts(folder, manifest: dict, images, labels) -> list:
    """Check every artifact in ``folder`` against the eager reference, each opened as its users open it (listed
    in ``manifest``, hashes checked; ONNX through onnxruntime); raise ValidationFailed on a mismatch."""
    folder = Path(folder)
    eager = open_model(folder / manifest_lib.REFERENCE, manifest=manifest)
    sizes = [min(b, len(images)) for b in BATCH_SIZES if b < len(images)] + [len(images)]
    eager_logits = {b: eager(images[:b]).astype(np.float64) for b in sizes}
    eager_accuracy = accuracy(eager_logits[len(images)], labels)
    # The reference's logits on every test image ride along: export calibrates on them without running again.
    results = [{"artifact": "pytorch", "max_abs_diff": 0.0, "excess": None, "worst_batch": None,
                "argmax_mismatches": 0, "accuracy": eager_accuracy, "ok": True, "logits": eager_logits[len(images)]}]
    for name, filename in manifest_lib.ARTIFACTS.items():
        runner = open_model(folder / filename, runtime="onnxruntime", manifest=manifest)
        results.append(check_runner(name, runner, eager_logits, images, labels))
    failed = [r for r in results if not r["ok"]]
    if failed:
        worst = max(failed, key=lambda r: (r["argmax_mismatches"], r["excess"]))
        raise ValidationFailed(
            f"validation failed: {worst['artifact']} differs from PyTorch by up to {worst['max_abs_diff']:.3g} "
            f"(batch {worst['worst_batch']}, tolerance rtol {RTOL:g} + atol {ATOL:g}), "
            f"{worst['argmax_mismatches']} of {len(images)} predictions differ"
        )
    return results


def validate_folder(folder, data_dir=None, download: bool = True) -> list:
    """Re-check an export folder: file hashes, the ONNX checker, and parity on the whole test set."""
    folder = Path(folder)
    manifest = manifest_lib.load(folder)
    changed = manifest_lib.check_hashes(folder, manifest)
    if changed:
        raise ValidationFailed(f"{folder}: {', '.join(changed)} missing or changed since export (sha256 mismatch)")
    check_onnx_file(folder / manifest_lib.ARTIFACTS["onnx"], manifest)
    images, labels = test_images(manifest, data_dir, download)
    results = validate_artifacts(folder, manifest, images, labels)
    recorded = manifest.get("pytorch_test_accuracy")
    if recorded is not None and abs(results[0]["accuracy"] - recorded) > 1e-9:
        raise ValidationFailed(f"PyTorch accuracy {results[0]['accuracy']:.4%} differs from the manifest's "
                               f"{recorded:.4%}: the test data differ from those used at export")
    return results


def format_report(results: list) -> str:
    lines = [f"{'artifact':<12} {'max |diff|':>11} {'argmax diff':>12} {'accuracy':>9}  status"]
    for r in results:
        lines.append(f"{r['artifact']:<12} {r['max_abs_diff']:>11.2e} {r['argmax_mismatches']:>12d} "
                     f"{100 * r['accuracy']:>8.2f}%  {'ok' if r['ok'] else 'FAILED'}")
    return "\n".join(lines)
