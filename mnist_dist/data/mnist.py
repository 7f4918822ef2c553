"""MNIST as uint8 tensors: found, checked, and read straight into memory.

Where the data come from, in this order:
  1. ``--data-dir`` (a torchvision root holding ``MNIST/raw``; torchvision downloads into it if empty);
  2. ``$MNIST_DATA_DIR`` (the same);
  3. ``./data``, as in the tutorial, but only if it already holds MNIST;
  4. the copy bundled inside this package, checked against its SHA-256 sums and
     decompressed in memory: nothing is written to disk.
"""
import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError, one_line
from . import idx

DATA_DIR_ENV = "MNIST_DATA_DIR"
LOCAL_DIR = Path("data")
IMAGE_SHAPE = (28, 28)
# (images file, labels file, count) per split, as published.
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
BUNDLED_SUMS = "SHA256SUMS"
HOW_TO_SUPPLY = (
    "put the four MNIST IDX files in {raw}, point --data-dir / $" + DATA_DIR_ENV + " at a torchvision root "
    "that holds them (torchvision downloads them there when online), or give neither to use the copy "
    "bundled with mnist-dist"
)


@dataclass(frozen=True)
class Source:
    """Where MNIST is read from: a torchvision root, or (root None) the bundled copy."""

    root: Optional[Path]
    chosen_by: str  # "--data-dir", "$MNIST_DATA_DIR", "./data" or "bundled"

    def describe(self) -> str:
        if self.root is None:
            return "the copy bundled with mnist-dist (sha256 verified, read in memory)"
        return f"{self.root} ({self.chosen_by})"

    def record(self) -> dict:
        return {"chosen_by": self.chosen_by, "path": str(self.root.absolute()) if self.root else None}


def find_source(data_dir=None) -> Source:
    if data_dir:
        return Source(Path(data_dir).expanduser(), "--data-dir")
    if os.environ.get(DATA_DIR_ENV):
        return Source(Path(os.environ[DATA_DIR_ENV]).expanduser(), "$" + DATA_DIR_ENV)
    if holds_mnist(LOCAL_DIR):
        return Source(LOCAL_DIR, "./data")
    return Source(None, "bundled")


def raw_folder(root) -> Path:
    return Path(root) / "MNIST" / "raw"


def holds_mnist(root: Path) -> bool:
    names = [name for images, labels, _ in SPLITS.values() for name in (images, labels)]
    return all((raw_folder(root) / name).is_file() for name in names)


def load_split(split: str, data_dir=None, download: bool = True, source: Optional[Source] = None) -> tuple:
    """(images uint8 [N,28,28], labels int64 [N]) of 'train' or 'test', from ``source`` or the one found."""
    source = source or find_source(data_dir)
    images_name, labels_name, count = SPLITS[split]
    names = (images_name, labels_name)
    if source.root is None:
        where = "the bundled MNIST copy"
        files = {name: (read_bundled(name), f"{name} in {where}") for name in names}  # (bytes, name in messages)
    else:
        ensure_files(source.root, split, download)
        where = str(raw_folder(source.root))
        files = {name: (read_file(raw_folder(source.root) / name), str(raw_folder(source.root) / name))
                 for name in names}
    images = checked(*files[images_name], idx.IMAGES_MAGIC, (count, *IMAGE_SHAPE), where)
    labels = checked(*files[labels_name], idx.LABELS_MAGIC, (count,), where)
    if labels.size and labels.max() > 9:
        raise UserError(f"MNIST {split} labels in {where} are corrupt (values outside 0-9)")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def read_file(path: Path) -> bytearray:
    """A raw IDX file's bytes; a bytearray, which is writable, so the tensors made from it share its memory."""
    try:
        return bytearray(path.read_bytes())
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e})") from e


def checked(raw: bytearray, label: str, magic: int, shape: tuple, where: str) -> np.ndarray:
    """Parse one IDX file held in memory and insist on MNIST's layout; ``label`` names it in messages."""
    try:
        got_magic, dims, _ = idx.parse_header(raw, len(raw))
        if (got_magic, dims) != (magic, shape):
            raise idx.IdxError(f"magic {got_magic}, shape {dims}; expected magic {magic}, shape {shape}")
        return idx.from_bytes(raw)
    except idx.IdxError as e:
        raise UserError(f"{label} is corrupt or truncated ({e}): " + HOW_TO_SUPPLY.format(raw=where)) from e


@cache
def bundled_sums() -> dict:
    text = (resources.files(__package__) / "bundled" / BUNDLED_SUMS).read_text()
    return {name.strip(): digest for digest, name in (line.split(None, 1) for line in text.splitlines() if line)}


def read_bundled(name: str) -> bytearray:
    """One bundled file, checked against SHA256SUMS and decompressed in memory."""
    gz_name = f"{name}.gz"
    try:
        blob = (resources.files(__package__) / "bundled" / gz_name).read_bytes()
    except OSError as e:
        raise UserError(f"the bundled MNIST copy lacks {gz_name} ({e.strerror or e}): reinstall mnist-dist, "
                        "or point --data-dir at MNIST") from e
    if hashlib.sha256(blob).hexdigest() != bundled_sums().get(gz_name):
        raise UserError(f"the bundled MNIST file {gz_name} fails its sha256 check: reinstall mnist-dist, "
                        "or point --data-dir at MNIST")
    return bytearray(gzip.decompress(blob))


def ensure_files(root: Path, split: str, download: bool) -> None:
    """Make sure the split's raw files are in ``root``, downloading them through torchvision if allowed."""
    images_name, labels_name, _ = SPLITS[split]
    if all((raw_folder(root) / name).is_file() for name in (images_name, labels_name)):
        return
    if not download:
        raise UserError(f"MNIST not found under {root}: " + HOW_TO_SUPPLY.format(raw=raw_folder(root)))
    existed = root.exists()
    try:
        torchvision_download(root, split)
    except UserError:
        if not existed:  # leave no empty folders behind from a failed download
            shutil.rmtree(root, ignore_errors=True)
        raise


def torchvision_download(root: Path, split: str) -> None:
    from torchvision import datasets  # deferred: slow to import, and only a download needs it

    try:
        datasets.MNIST(root=str(root), train=split == "train", download=True)
    except RuntimeError as e:  # torchvision: "Error downloading ..." or "Dataset not found ..."
        raise UserError(f"MNIST not found under {root} and not downloadable ({one_line(e) or type(e).__name__}): "
                        + HOW_TO_SUPPLY.format(raw=raw_folder(root))) from e
    except OSError as e:  # no network, or an unwritable folder
        raise UserError(f"MNIST could not be downloaded into {root} ({one_line(e) or type(e).__name__}): "
                        + HOW_TO_SUPPLY.format(raw=raw_folder(root))) from e


def write_raw_files(root, source: Optional[Source] = None) -> Path:
    """Write the four IDX files, uncompressed, into ``root``/MNIST/raw (a torchvision root); returns ``root``.

    For tools that insist on files, such as torchvision's MNIST class; training itself never needs this.
    """
    source = source or find_source()
    raw = raw_folder(root)
    raw.mkdir(parents=True, exist_ok=True)
    for images_name, labels_name, _ in SPLITS.values():
        for name in (images_name, labels_name):
            if source.root is None:
                (raw / name).write_bytes(read_bundled(name))
            else:
                shutil.copyfile(raw_folder(source.root) / name, raw / name)
    return Path(root)
