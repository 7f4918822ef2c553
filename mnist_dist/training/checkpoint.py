"""Checkpoints: one self-describing file per finished epoch.

A checkpoint carries the model's own config, so export and inference rebuild
the network with ``load_model`` alone, never needing the training config.
"""
import random
import re
from pathlib import Path

import torch

from .. import atomic
from ..errors import UserError
from ..model import from_state

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^epoch_(\d+)\.pt$")
REQUIRED_KEYS = ("model", "model_config")


def checkpoint_path(output_dir, epoch: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"epoch_{epoch:04d}.pt"


def list_checkpoints(output_dir) -> list:
    """Finished checkpoints of a run, oldest first (temp files of a killed write are skipped)."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path:
    found = list_checkpoints(output_dir)
    if not found:
        raise UserError(f"no checkpoint found in {Path(output_dir) / CHECKPOINT_DIR}")
    return found[-1]


def resolve_checkpoint(path_or_dir) -> Path:
    """A checkpoint file, or a training output dir (its latest checkpoint)."""
    path = Path(path_or_dir)
    if path.is_dir():
        return latest_checkpoint(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return path


def save(path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path) -> dict:
    """Load a checkpoint onto the CPU, or raise a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        # weights_only: a checkpoint is data, so refuse pickled code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {path} is corrupt or not a mnist-dist checkpoint ({_first_line(e)})") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise UserError(f"checkpoint {path} is not a mnist-dist checkpoint (needs keys {', '.join(REQUIRED_KEYS)})")
    return state


def load_model(path) -> tuple:
    """Rebuild the CNN from a checkpoint: returns (model in eval mode, checkpoint dict)."""
    state = load(path)
    try:
        model = from_state(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not hold this project's CNN ({_first_line(e)})") from e
    return model.eval(), state


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x

