"""Exported files that run in PyTorch: TorchScript (.ts), torch.export (.pt2) and the eager reference (.pt).

Imported only when such a file is opened, so ONNX inference never loads torch. Each loader returns
(run, None, description): these files declare no input shape, so the caller checks them with a trial batch.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch

from ..model import from_state

ENGINES = {".ts": "torchscript", ".pt2": "torch.export", ".pt": "pytorch"}


@contextmanager
def quiet_torchscript():
    """torch >= 2.11 deprecates torch.jit with a FutureWarning on every call. TorchScript is still
    offered on purpose (C++ libtorch and older serving stacks load it), so the warning is silenced
    here, where we call it knowingly, and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.")
        yield


def load_module(path) -> torch.nn.Module:
    suffix = path.suffix
    if suffix == ".ts":
        with quiet_torchscript():
            return torch.jit.load(str(path), map_location="cpu").eval()
    if suffix == ".pt2":
        return torch.export.load(str(path)).module()
    # weights_only: the reference is data, so refuse pickled code.
    return from_state(torch.load(path, map_location="cpu", weights_only=True)).eval()


def load(path, threads=None, device: str = "cpu") -> tuple:
    """(run, None, description) of a .ts, .pt2 or .pt file on ``device``, with ``threads`` intra-op threads."""
    if threads:
        torch.set_num_threads(threads)
    module = load_module(path).to(device)

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(images).to(device)).float().cpu().numpy()

    return run, None, f"{ENGINES[path.suffix]} on {device}"
