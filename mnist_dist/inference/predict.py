"""Label users' images with an exported model (ONNX, INT8 ONNX or TorchScript).

A bad file costs only its own row: it gets an error and every other input
still gets its prediction, in input order.
"""
import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .. import atomic
from ..data import idx
from ..errors import UserError
from ..exporting import manifest as manifest_lib
from ..launch import progress_bar
from ..scores import softmax
from . import runtimes
from .images import BadImage, open_grayscale, to_mnist

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
COLUMNS = ("input", "prediction", "confidence", "top3", "error")
PROGRESS_FROM = 1000  # inputs; fewer finish too fast for a bar to help


@dataclass
class Item:
    name: str
    pixels: Optional[np.ndarray] = None  # float32 28x28, 0..255, white on black
    error: str = ""


def expand(inputs) -> list:
    """Files in argument order; folders searched recursively for images, .npy and IDX files."""
    files = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_candidate(p))
            if not found:
                raise UserError(f"{path} holds no images, .npy or IDX files")
            files += found
        else:
            files.append(path)
    if not files:
        raise UserError("no inputs: give image files, folders, .npy arrays or IDX files")
    return files


def is_candidate(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES | {".npy", ".idx"} or path.name.endswith("-ubyte")


def read_npy(path: Path, size: tuple) -> list:
    """Rows of a .npy array. An unreadable or truncated file costs its own error row; an array of the wrong
    shape or type is a mistake in the command, not in one input, and stops the run."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        return [Item(str(path), error=f"not a readable .npy file ({' '.join(str(e).split())[:120]})")]
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != size:
        expected = ",".join(map(str, size))
        raise UserError(f"{path}: shape {array.shape}; expected (N,{expected}) or (N,1,{expected})")
    if array.dtype == np.uint8:
        pixels = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1 or np.isnan(array).any()):
            raise UserError(f"{path}: {array.dtype} values must lie in [0, 1] (found {np.nanmin(array):g}.."
                            f"{np.nanmax(array):g})")
        pixels = array.astype(np.float32) * 255
    else:
        raise UserError(f"{path}: dtype {array.dtype}; expected uint8, or float in [0, 1]")
    return [Item(f"{path}#{i}", p) for i, p in enumerate(pixels)]


def read_idx(path: Path, size: tuple) -> list:
    try:
        pixels = idx.open_file(path)
    except (idx.IdxError, OSError) as e:
        return [Item(str(path), error=str(e))]
    if pixels.ndim != 3 or pixels.shape[1:] != size:
        return [Item(str(path), error=f"IDX images of shape {pixels.shape[1:]}, not {size}")]
    return [Item(f"{path}#{i}", p.astype(np.float32)) for i, p in enumerate(pixels)]


def read_image(path: Path, invert: str, size: tuple, box: int) -> Item:
    try:
        return Item(str(path), to_mnist(open_grayscale(path), invert, size, box))
    except BadImage as e:
        return Item(str(path), error=str(e))


def read_inputs(files: list, invert: str, contract: dict) -> list:
    size, box = manifest_lib.image_size(contract), manifest_lib.digit_box(contract)
    items = []
    for path in files:
        if not path.is_file():
            items.append(Item(str(path), error="no such file"))
        elif path.suffix.lower() == ".npy":
            items += read_npy(path, size)
        elif path.suffix.lower() == ".idx" or path.name.endswith("-ubyte"):
            items += read_idx(path, size)
        else:
            items.append(read_image(path, invert, size, box))
    return items


def load_model(model_path) -> tuple:
    """(runner, manifest) for a model file whose manifest sits beside it; checks the input contract."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"model {model_path} does not exist")
    if model_path.suffix not in (".onnx", ".ts"):
        raise UserError(f"{model_path}: --model takes model.onnx, model.int8.onnx or model.ts")
    manifest = manifest_lib.find_for_model(model_path)
    if model_path.suffix == ".onnx":
        session = runtimes.onnx_session(model_path)
        check_onnx_input(model_path, session, manifest)
        runner = runtimes.onnx_runner(session)
    else:
        runner = runtimes.load_runner(model_path)
    expected = (2, len(manifest["classes"]))
    try:  # TorchScript declares no shapes: a trial batch shows whether the contract holds
        probe = runner(np.zeros((2, *manifest["input"]["shape"][1:]), np.float32))
    except Exception as e:  # the runtime's own error for a mismatched model
        raise UserError(f"{model_path} does not accept {manifest['input']['shape']} input "
                        f"({' '.join(str(e).split())[:200]})") from e
    if probe.shape != expected:
        raise UserError(f"{model_path} returns shape {probe.shape} for 2 images; expected {expected}")
    return runner, manifest


def check_onnx_input(path: Path, session, manifest: dict) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise UserError(f"{path} takes {len(inputs)} inputs; expected one image batch")
    inp, expected = inputs[0], manifest["input"]["shape"][1:]
    fixed_batch = isinstance(inp.shape[0], int) if inp.shape else False
    if len(inp.shape) != 4 or list(inp.shape[1:]) != expected or fixed_batch:
        raise UserError(f"{path}: input shape {inp.shape}; expected [batch, {', '.join(map(str, expected))}]")


def predict(inputs, model_path, invert: str = "auto", batch_size: int = 256, show_progress=True) -> tuple:
    """Returns (rows in input order, summary)."""
    runner, manifest = load_model(model_path)
    items = read_inputs(expand(inputs), invert, manifest)
    good = [i for i, item in enumerate(items) if not item.error]
    probabilities = np.zeros((len(items), len(manifest["classes"])))
    bar = progress_bar(len(good), "predict", show_progress and len(good) >= PROGRESS_FROM)
    started = time.perf_counter()
    for start in range(0, len(good), batch_size):
        chunk = good[start : start + batch_size]
        batch = manifest_lib.model_input(np.stack([items[i].pixels for i in chunk]), manifest)
        probabilities[chunk] = softmax(runner(batch))
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - started
    rows = [make_row(item, probabilities[i], manifest["classes"]) for i, item in enumerate(items)]
    summary = {"inputs": len(items), "failed": len(items) - len(good), "seconds": seconds,
               "images_per_s": len(good) / seconds if seconds > 0 else 0.0}
    return rows, summary


def make_row(item: Item, probs: np.ndarray, classes: list) -> dict:
    if item.error:
        return {"input": item.name, "prediction": None, "confidence": None, "top3": [], "error": item.error}
    top = np.argsort(-probs)[:3]
    return {"input": item.name, "prediction": int(classes[top[0]]), "confidence": float(probs[top[0]]),
            "top3": [[int(classes[c]), float(probs[c])] for c in top], "error": ""}


def to_csv(rows: list) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "confidence": "" if row["confidence"] is None else f"{row['confidence']:.6f}",
                         "prediction": "" if row["prediction"] is None else row["prediction"],
                         "top3": " ".join(f"{d}:{p:.4f}" for d, p in row["top3"])})
    return buffer.getvalue()


def write(rows: list, out) -> None:
    out = Path(out)
    text = json.dumps(rows, indent=1) + "\n" if out.suffix.lower() == ".json" else to_csv(rows)
    atomic.write_text(out, text)
