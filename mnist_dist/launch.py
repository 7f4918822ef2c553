"""Accelerate set-up shared by training and evaluation, and the progress bar."""
import os
import sys

import torch
from tqdm.auto import tqdm

from .errors import UserError


def make_accelerator(mixed_precision: str = "no", seed: int = 0, cpu: bool = False):
    """An Accelerator that works the same under python, accelerate launch, gloo and NCCL."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # Several processes without CUDA must talk over gloo on the CPU; without cpu=True
    # Accelerate would silently start unconnected copies that each train alone.
    cpu = cpu or (world_size > 1 and not torch.cuda.is_available())
    try:
        accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=mixed_precision,
            # Seedable sampler: the shuffle of epoch e depends only on (seed, e), identically on
            # every process, which keeps the shards disjoint and makes resume exact.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        )
    except ValueError as e:  # e.g. fp16 asked for on a device without fp16 support
        raise UserError(f"cannot start with mixed precision {mixed_precision}: {e}") from e
    if accelerator.num_processes != world_size:
        raise UserError(f"{world_size} processes were launched but {accelerator.num_processes} joined")
    return accelerator


def progress_bar(total: int, desc: str, enabled: bool = True):
    """tqdm on the main process; redraws rarely when the output is a log file, not a terminal."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, mininterval=0.1 if interactive else 10)
