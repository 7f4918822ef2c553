"""Which optional packages each part of mnist-dist needs, and the one-line error when they are missing.

The base install is the inference runtime (onnxruntime, numpy, Pillow, click, tqdm). Everything else
comes with an extra of ``pip install "mnist-dist[EXTRA]"``; a command checks for its extra before it
imports anything from it, so a missing package is an ``Error:`` line naming the extra, never an
ImportError.
"""
import importlib
from importlib.util import find_spec

from .errors import UserError

# extra -> the modules it installs that mnist-dist imports (import names, not distribution names)
EXTRAS = {
    "train": ("torch", "torchvision", "accelerate", "onnx", "onnxscript", "matplotlib"),
    "serve": ("fastapi", "uvicorn", "multipart", "prometheus_client", "orjson"),
    "openvino": ("openvino",),
    "parquet": ("pyarrow",),
    # Storage: predict's inputs and --out as URLs (fsspec, in the base install, names these packages itself).
    "s3": ("s3fs",),
    "gcs": ("gcsfs",),
    "azure": ("adlfs",),
    "http": ("aiohttp",),
}


def missing(extra: str) -> list:
    """The modules of ``extra`` that cannot be imported here (found without importing them)."""
    absent = []
    for module in EXTRAS[extra]:
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):  # a blocked import, or a module left half-imported
            found = False
        if not found:
            absent.append(module)
    return absent


def require(extra: str, what: str) -> None:
    """Raise a UserError naming the extra to install when any of its modules is missing."""
    absent = missing(extra)
    if absent:
        raise UserError(needed(extra, what, absent))


def load(extra: str, module: str, what: str):
    """Import ``module`` of ``extra``; a failed import (absent or broken) is the one-line error."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(needed(extra, what, [e.name or module])) from e


def needed(extra: str, what: str, absent: list) -> str:
    return f'{what} needs the {extra} extra ({", ".join(absent)} not installed): pip install "mnist-dist[{extra}]"'
