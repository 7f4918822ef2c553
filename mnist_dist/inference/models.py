"""The one way to open an exported model: manifest, hash, runtime, threads, and the contract checked.

Everything that runs a model (predict, the server, bench, report, quantize and export's own validation)
calls ``open_model``. It is torch-free for ONNX files; TorchScript, torch.export and the eager reference
load torch (the train extra) only when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import extras
from ..errors import UserError, one_line
from ..launch import choose_threads
from . import manifest as manifest_lib
from . import runtimes

TORCH_SUFFIXES = (".ts", ".pt2", ".pt")
SUFFIXES = (".onnx", *TORCH_SUFFIXES)


@dataclass
class Runner:
    """An exported model ready to run: float32 [N,1,H,W] -> float32 logits [N,classes]."""

    run: Callable[[np.ndarray], np.ndarray]
    manifest: dict
    path: Path
    sha256: str
    engine: str  # what decides the numbers (onnxruntime, openvino, torchscript, ...): a resumed job keeps it
    description: str  # how it runs, for people: engine, provider or device, threads, why it was chosen

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run(images)


def needs_torch(path) -> bool:
    return Path(path).suffix in TORCH_SUFFIXES


def open_model(path, runtime: str = "auto", threads: int | None = None, device: str = "cpu", batch: int = 256,
               spin: bool = True, manifest: dict | None = None) -> Runner:
    """Open ``path`` (model.onnx, model.int8.onnx, model.ts, model.pt2 or reference.pt) with the manifest beside it.

    The file must be listed in the manifest with the same sha256. ONNX files run in ``runtime`` ("auto": see
    ``runtimes.choose_runtime``, for batches of ``batch``); the others in PyTorch on ``device``. ``threads``
    defaults to launch.choose_threads. ``manifest`` is given by the writer of a folder that has none yet.
    """
    path = Path(path)
    if not path.is_file():
        lost = manifest is None and not (path.parent / manifest_lib.MANIFEST).is_file()
        raise UserError(f"model {path} does not exist" + (f" and {path.parent} has no {manifest_lib.MANIFEST}: export "
                                                          "a model first (mnist-dist export)" if lost else ""))
    if path.suffix not in SUFFIXES:
        raise UserError(f"{path}: expected model.onnx, model.int8.onnx, model.ts or model.pt2")
    manifest = manifest if manifest is not None else manifest_lib.find_for_model(path)
    digest = manifest_lib.check_recorded(path, manifest)
    threads = threads or choose_threads()[0]
    if path.suffix == ".onnx":
        engine, why = runtimes.choose_runtime(path, runtime, batch, device)
        run, shape, description = runtimes.load_engine(path, engine, threads, device, spin)
        description += f" ({why})" if why else ""
    else:
        extras.require("train", f"running {path.name}")
        from . import torch_runtime

        try:
            run, shape, description = torch_runtime.load(path, threads, device)
        except Exception as e:  # torch raises many types for a corrupt or foreign file
            raise UserError(f"cannot load {path}: {one_line(e, 200)}") from e
        engine = torch_runtime.ENGINES[path.suffix]
    if engine == "onnxruntime" and "CUDA" in description:
        engine = "onnxruntime-cuda"
    if "cuda" not in description.lower():  # threads are the CPU's
        description += f", {threads} thread{'s' if threads > 1 else ''}"
    check_input_shape(path, shape, manifest)
    check_output_shape(path, run, manifest)
    return Runner(run, manifest, path, digest, engine, description)


def check_input_shape(path: Path, shape, manifest: dict) -> None:
    """The engine's declared input is [batch, 1, 28, 28] with a free batch dimension (files that declare one)."""
    if shape is None:
        return
    expected = manifest["input"]["shape"][1:]
    if len(shape) != 4 or list(shape[1:]) != expected or isinstance(shape[0], int):
        raise UserError(f"{path}: input shape {shape}; expected [batch, {', '.join(map(str, expected))}]")


def check_output_shape(path: Path, run, manifest: dict) -> None:
    """A trial batch of two: TorchScript declares no shapes, and every engine must answer one row per image."""
    expected = (2, len(manifest["classes"]))
    try:
        probe = run(np.zeros((2, *manifest["input"]["shape"][1:]), np.float32))
    except Exception as e:  # the runtime's own error for a mismatched model
        raise UserError(f"{path} does not accept {manifest['input']['shape']} input ({one_line(e, 200)})") from e
    if probe.shape != expected:
        raise UserError(f"{path} returns shape {probe.shape} for 2 images; expected {expected}")
