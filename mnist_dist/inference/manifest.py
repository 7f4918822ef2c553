"""The exported model's contract and manifest.

Every consumer (validate, bench, predict, serve) reads the input contract from
``manifest.json`` beside the model files instead of assuming it: only the model
and the exporter, which writes it, know MNIST's 28x28.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..scores import softmax

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
OPSET = 18  # supported by every onnxruntime since 1.14
ARTIFACTS = {"torchscript": "model.ts", "onnx": "model.onnx", "pt2": "model.pt2"}
REFERENCE = "reference.pt"  # the eager weights every artifact is checked against
DIGIT_BOX = 20  # MNIST fits each digit into 20x20 pixels, then centres it in 28x28


def contract(model_config: dict, image_size: int) -> dict:
    """What a model expects and returns; the same for every artifact in the folder."""
    return {
        "input": {
            "name": "images",
            "shape": ["batch", model_config["in_channels"], image_size, image_size],
            "dtype": "float32",
            "layout": "NCHW",
            "scale": 1 / 255,
            "scaling": "pixel / 255: uint8 0..255 to float 0..1, as torchvision's ToTensor",
            "polarity": "white digit on a black background",
            "framing": f"digit fitted in the central {DIGIT_BOX}x{DIGIT_BOX} box and centred by centre of mass, "
                       "as MNIST",
            "digit_box": DIGIT_BOX,
        },
        "output": {"name": "logits", "shape": ["batch", model_config["num_classes"]], "dtype": "float32",
                   "note": "unnormalised scores: probabilities are softmax(logits / calibration.temperature)"},
        "classes": [str(i) for i in range(model_config["num_classes"])],
    }


def model_input(pixels, contract: dict) -> np.ndarray:
    """Pixels 0..255 ([N,28,28] or [N,1,28,28], any numeric type) -> the model's float32 input, scaled as the
    contract says."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 3:
        pixels = pixels[:, None]
    # One pass over float32 pixels (no copy first): each pass over an image also hands the GIL over in a server.
    return np.multiply(pixels, np.float32(contract["input"]["scale"]), dtype=np.float32, order="C")


def temperature(manifest: dict) -> float:
    """The temperature fitted at export (1 for models exported before calibration existed)."""
    return float(manifest.get("calibration", {}).get("temperature", 1.0))


def probabilities(logits, manifest: dict) -> np.ndarray:
    """The model's calibrated probabilities: what every consumer reports as confidence."""
    return softmax(logits, temperature(manifest))


def image_size(contract: dict) -> tuple:
    """(height, width) of one input image."""
    return tuple(contract["input"]["shape"][-2:])


def digit_box(contract: dict) -> int:
    """The box a digit is fitted into before centring (manifests written before this field: MNIST's 20)."""
    return contract["input"].get("digit_box", DIGIT_BOX)


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path) -> dict:
    path = Path(path)
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


def load(model_dir) -> dict:
    """Read ``manifest.json`` from an export folder, or raise a one-line UserError."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{model_dir} has no {MANIFEST}: export a model first (mnist-dist export)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e})") from e
    for key in ("input", "output", "classes", "files"):
        if key not in manifest:
            raise UserError(f"{path} is not a mnist-dist manifest (no '{key}')")
    return manifest


def find_for_model(model_path) -> dict:
    """The manifest beside a model file."""
    return load(Path(model_path).parent)


def check_recorded(path, manifest: dict) -> str:
    """The sha256 of a model file, which must be the one its manifest records; a UserError otherwise."""
    path = Path(path)
    recorded = manifest["files"].get(path.name)
    if recorded is None:
        raise UserError(f"{path} is not listed in its folder's {MANIFEST}: export or quantize it again")
    digest = sha256(path)
    if digest != recorded["sha256"]:
        raise UserError(f"{path} differs from the file recorded in its manifest (sha256 mismatch)")
    return digest


def check_hashes(model_dir, manifest: dict) -> list:
    """Names of listed files that are missing or differ from their recorded sha256."""
    bad = []
    for name, recorded in manifest["files"].items():
        path = Path(model_dir) / name
        if not path.is_file() or sha256(path) != recorded["sha256"]:
            bad.append(name)
    return bad
