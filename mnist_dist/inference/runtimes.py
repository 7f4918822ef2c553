"""Run an exported model (TorchScript, ONNX through onnxruntime, torch.export) or the eager reference.

Each loader returns a function: float32 numpy [N,1,28,28] -> float32 numpy logits [N,10].
"""
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError


@contextmanager
def quiet_torchscript():
    """torch >= 2.11 deprecates torch.jit with a FutureWarning on every call. TorchScript is still
    offered on purpose (C++ libtorch and older serving stacks load it), so the warning is silenced
    here, where we call it knowingly, and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.")
        yield


def _torch_runner(module):
    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(images)).float().numpy()

    return run


def load_torchscript(path):
    with quiet_torchscript():
        module = torch.jit.load(str(path), map_location="cpu").eval()
    return _torch_runner(module)


def load_pt2(path):
    return _torch_runner(torch.export.load(str(path)).module())


def load_reference(path):
    from ..training.checkpoint import load_model

    model, _ = load_model(path)
    return _torch_runner(model)


def onnx_session(path, threads=None, providers=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise UserError(f"cannot load ONNX model {path}: {' '.join(str(e).split())[:300]}") from e


def onnx_runner(session):
    input_name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: images})[0]

    return run


def load_onnx(path, threads=None, providers=None):
    return onnx_runner(onnx_session(path, threads, providers))


LOADERS = {".ts": load_torchscript, ".pt2": load_pt2, ".onnx": load_onnx, ".pt": load_reference}


def load_runner(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model {path} does not exist")
    loader = LOADERS.get(path.suffix)
    if loader is None:
        raise UserError(f"{path}: unknown model type (expected one of {', '.join(LOADERS)})")
    return loader(path)


def run_batched(runner, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([runner(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
