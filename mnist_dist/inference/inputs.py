"""Users' inputs, enumerated once in a fixed order and read a range at a time.

Every input gets a global index: files in argument order (folders searched
recursively, sorted), and array rows (.npy, IDX) one index each, in row order.
Any process can then read any contiguous range of indices without reading the
rest: arrays are memory-mapped, images decoded only when their range is read.
"""
import bisect
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Optional

import numpy as np

from ..data import idx
from ..errors import UserError, one_line
from .images import MAX_PIXELS, BadImage, light_background, open_grayscale, to_mnist

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


@dataclass(frozen=True)
class Framing:
    """What the model expects, from its manifest: image size, the digit's box, and the polarity rule."""

    size: tuple
    box: int
    invert: str  # "auto", "yes" or "no"


@dataclass(frozen=True)
class Source:
    """One input file and the indices it holds: an image (1), an array (its rows), or a file that failed (1)."""

    path: Path
    kind: str  # "image", "array" or "failed"
    count: int
    error: str = ""
    stamp: str = ""  # size and modification time, read once when the inputs are enumerated

    def name(self, row: int) -> str:
        return f"{self.path}#{row}" if self.kind == "array" else str(self.path)


@dataclass
class Item:
    """One input, ready for the model or failed: its global index, name, pixels (0..255, white on black)."""

    index: int
    name: str
    pixels: Optional[np.ndarray] = None
    error: str = ""


def is_candidate(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES | {".npy", ".idx"} or path.name.endswith("-ubyte")


def is_array(path: Path) -> bool:
    return path.suffix.lower() in (".npy", ".idx") or path.name.endswith("-ubyte")


def expand(inputs) -> list:
    """Files in argument order; folders searched recursively for images, .npy and IDX files, sorted."""
    files = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_candidate(p) and p.is_file())
            if not found:
                raise UserError(f"{path} holds no images, .npy or IDX files")
            files += found
        else:
            files.append(path)
    if not files:
        raise UserError("no inputs: give image files, folders, .npy arrays or IDX files")
    return files


def open_array(path: Path, size: tuple) -> np.ndarray:
    """A .npy or IDX file as a memory-mapped [N, H, W] (or [N, 1, H, W]) array, checked against the model.

    A file that cannot be read is this input's own failure (BadImage); an array of the wrong shape or
    type is a mistake in the command, and a UserError.
    """
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            array = idx.open_file(path)
    except (OSError, ValueError, EOFError) as e:  # idx.IdxError is a ValueError
        kind = ".npy" if path.suffix.lower() == ".npy" else "IDX"
        raise BadImage(f"not a readable {kind} file ({one_line(e, 120)})") from e
    shape = array.shape
    if not (len(shape) == 3 and shape[1:] == size) and not (len(shape) == 4 and shape[1:] == (1, *size)):
        expected = ",".join(map(str, size))
        raise UserError(f"{path}: shape {shape}; expected (N,{expected}) or (N,1,{expected})")
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"{path}: dtype {array.dtype}; expected uint8, or float in [0, 1]")
    return array


class InputIndex:
    """The global index space of all inputs, and reading of any contiguous range of it."""

    def __init__(self, sources: list, framing: Framing):
        self.sources = sources
        self.framing = framing
        self.starts = np.cumsum([0] + [s.count for s in sources]).tolist()
        self.total = self.starts[-1]

    @classmethod
    def build(cls, inputs, framing: Framing) -> "InputIndex":
        sources = []
        for path in expand(inputs):
            try:
                stat = path.stat()
            except OSError:
                stat = None
            if stat is None or not S_ISREG(stat.st_mode):
                sources.append(Source(path, "failed", 1, "no such file"))
                continue
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
            if is_array(path):
                try:
                    sources.append(Source(path, "array", len(open_array(path, framing.size)), stamp=stamp))
                except BadImage as e:
                    sources.append(Source(path, "failed", 1, str(e), stamp))
            else:
                sources.append(Source(path, "image", 1, stamp=stamp))
        return cls(sources, framing)

    def fingerprint(self) -> str:
        """Names, sizes and modification times of every input: a resumed run must read the same inputs."""
        digest = hashlib.sha256()
        for s in self.sources:
            digest.update(f"{s.path}\0{s.kind}\0{s.count}\0{s.stamp}\n".encode())
        return digest.hexdigest()

    def pieces(self, start: int, stop: int):
        """(source, first row, last row + 1, global index of the first row) for each source in [start, stop)."""
        s = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            source, base = self.sources[s], self.starts[s]
            end = min(stop, base + source.count)
            yield source, start - base, end - base, start
            start, s = end, s + 1

    def read(self, start: int, stop: int) -> list:
        """The items [start, stop), in order, read in this thread."""
        items = []
        for source, first, last, index in self.pieces(start, stop):
            if source.kind == "array":
                items += self.read_rows(source, first, last, index)
            elif source.kind == "failed":
                items.append(Item(index, source.name(0), error=source.error))
            else:
                items.append(self.read_image(source, index))
        return items

    def read_later(self, start: int, stop: int, pool: ThreadPoolExecutor, workers: int):
        """Start reading [start, stop) on ``pool``, in ``workers`` contiguous slices, and return a function that
        waits for the items in order. The caller labels one range while the next decodes: the model and
        libjpeg release the GIL, so decoding overlaps inference, and large JPEGs decode in parallel. One task
        per slice, not per image: for small PNGs a future costs as much as the decoding."""
        bounds = np.linspace(start, stop, max(1, min(workers, stop - start)) + 1).astype(int)
        futures = [pool.submit(self.read, a, b) for a, b in zip(bounds, bounds[1:])]
        return lambda: [item for future in futures for item in future.result()]

    def read_image(self, source: Source, index: int) -> Item:
        return image_item(index, source.name(0), source.path, self.framing)

    def read_rows(self, source: Source, first: int, last: int, index: int) -> list:
        array = open_array(source.path, self.framing.size)
        try:
            rows = np.asarray(array[first:last], dtype=np.float32).reshape(last - first, *self.framing.size)
        except (OSError, ValueError) as e:  # a file that shrank after it was opened
            return [Item(index + i, source.name(first + i), error=f"unreadable ({e})") for i in range(last - first)]
        if array.dtype != np.uint8:
            rows = rows * 255
        bad = ~np.isfinite(rows).all(axis=(1, 2)) | (rows.min(axis=(1, 2)) < 0) | (rows.max(axis=(1, 2)) > 255)
        rows = polarity(rows, self.framing.invert)
        return [Item(index + i, source.name(first + i), error="values outside [0, 1]" if bad[i] else "",
                     pixels=None if bad[i] else rows[i]) for i in range(last - first)]


def image_item(index: int, name: str, image, framing: Framing, max_pixels: int = MAX_PIXELS) -> Item:
    """One image file (a path, or a binary file object such as an upload) made MNIST-like, or its failure."""
    try:
        gray = open_grayscale(image, framing.box, max_pixels)
        return Item(index, name, to_mnist(gray, framing.invert, framing.size, framing.box))
    except BadImage as e:
        return Item(index, name, error=str(e))


def array_item(index: int, name: str, values, framing: Framing) -> Item:
    """One image given as numbers (nested lists from JSON, say): integers 0-255, or floats 0-1 when any value is
    not a whole number. The polarity rule applies as to array rows."""
    try:
        pixels = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        return Item(index, name, error=f"not a {'x'.join(map(str, framing.size))} array of numbers")
    if pixels.shape == (1, *framing.size):
        pixels = pixels[0]
    if pixels.shape != framing.size:
        return Item(index, name, error=f"shape {list(pixels.shape)}; expected {list(framing.size)}")
    if not np.isfinite(pixels).all():
        return Item(index, name, error="values must be finite numbers")
    whole = bool((pixels == np.round(pixels)).all())
    top = 255 if whole else 1
    if pixels.min() < 0 or pixels.max() > top:
        return Item(index, name, error=f"values must lie in 0..{top} ({'integers' if whole else 'floats'})")
    scaled = pixels.astype(np.float32) * (1 if whole else 255)
    return Item(index, name, polarity(scaled[None], framing.invert)[0])


def polarity(rows: np.ndarray, invert: str) -> np.ndarray:
    """White digits on black, row by row: "yes" inverts every row, "auto" those with a light border."""
    if invert == "yes":
        return 255 - rows
    if invert == "auto":
        light = light_background(rows)
        if light.any():
            rows = rows.copy()
            rows[light] = 255 - rows[light]
    return rows
