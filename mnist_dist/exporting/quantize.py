"""Static INT8 quantization (QDQ) of the exported ONNX model, calibrated on training images.

Static QDQ keeps convolutions in integer kernels; quantize_dynamic would only
quantize weights and run convs slower than fp32, so it is not offered.
"""
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import atomic
from ..data import mnist
from ..errors import UserError
from ..inference import manifest as manifest_lib
from ..inference import runtimes
from ..inference.models import open_model
from ..scores import accuracy
from .validate import test_images

INT8_FILE = "model.int8.onnx"


class TrainingImages:
    """onnxruntime CalibrationDataReader over a seeded random sample of TRAINING images (never test)."""

    def __init__(self, contract: dict, data_dir, count: int, batch: int = 100, seed: int = 0, download=True):
        images, _ = mnist.load_split("train", data_dir, download)
        pick = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
        scaled = manifest_lib.model_input(images.numpy()[np.sort(pick)], contract)
        self.name = contract["input"]["name"]
        self.batches = iter([scaled[i : i + batch] for i in range(0, len(scaled), batch)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch}

    def rewind(self):  # part of onnxruntime's reader interface; one calibration pass needs no rewind
        pass


def quantize(model_dir, data_dir=None, calibration_images: int = 2000, download=True, log=print) -> dict:
    """Write model.int8.onnx beside model.onnx and record its hash and test accuracy in the manifest."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model_dir = Path(model_dir)
    manifest = manifest_lib.load(model_dir)
    fp32 = model_dir / manifest["artifacts"]["onnx"]
    if not fp32.is_file():
        raise UserError(f"{fp32} is missing: export the model again")
    log(f"Calibrating INT8 on {calibration_images} training images")
    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / INT8_FILE
        quant_pre_process(str(fp32), str(prepared))  # shape inference + graph clean-up, as onnxruntime advises
        quantize_static(
            str(prepared), str(quantized), TrainingImages(manifest, data_dir, calibration_images, download=download),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            per_channel=True, calibrate_method=CalibrationMethod.MinMax,
        )
        manifest["artifacts"]["int8"] = INT8_FILE
        manifest["files"][INT8_FILE] = manifest_lib.describe_file(quantized)
        images, labels = test_images(manifest, data_dir, download)
        int8_accuracy = runner_accuracy(open_model(quantized, "onnxruntime", manifest=manifest), images, labels)
        fp32_accuracy = runner_accuracy(open_model(fp32, "onnxruntime", manifest=manifest), images, labels)
        shutil.move(str(quantized), model_dir / INT8_FILE)  # same file system: an atomic rename
    manifest["int8"] = {"accuracy": int8_accuracy, "onnx_fp32_accuracy": fp32_accuracy,
                        "accuracy_drop_points": 100 * (fp32_accuracy - int8_accuracy),
                        "method": "onnxruntime static QDQ, per-channel int8 weights, uint8 activations, MinMax",
                        "calibration": {"split": "train", "images": calibration_images, "seed": 0}}
    atomic.write_json(model_dir / manifest_lib.MANIFEST, manifest)
    return manifest["int8"]


def runner_accuracy(runner, images, labels, batch: int = 1000) -> float:
    return accuracy(runtimes.run_batched(runner, images, batch), labels)
