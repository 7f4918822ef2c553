"""Users' inputs, enumerated once in a fixed order and read a range at a time, wherever they live.

Every input gets a global index: files in argument order (folders, prefixes and
globs searched recursively, sorted by name), and array rows (.npy, IDX) one index
each, in row order. Any process can then read any contiguous range of indices
without reading the rest: array rows are read by byte ranges (a header, then the
rows a range needs; never a whole file), images fetched many at a time and decoded
only when their range is read. Local paths and URLs (s3://, gs://, ...) take the
same code path; see ``storage``.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..data import idx
from ..errors import UserError, one_line
from . import storage
from .images import MAX_PIXELS, BadImage, light_background, open_grayscale, to_mnist
from .storage import Place

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
ARRAY_SUFFIXES = (".npy", ".idx")
NPY_HEAD = 4096  # bytes read first from a .npy file: every header np.save writes for a plain array fits


@dataclass(frozen=True)
class Framing:
    """What the model expects, from its manifest: image size, the digit's box, and the polarity rule."""

    size: tuple
    box: int
    invert: str  # "auto", "yes" or "no"


@dataclass(frozen=True)
class ArrayLayout:
    """Where an array file's rows lie: the header's length, the values' type, the number of rows."""

    offset: int
    dtype: np.dtype
    rows: int
    row_values: int

    def row_range(self, first: int, last: int) -> tuple:
        row_bytes = self.row_values * self.dtype.itemsize
        return self.offset + first * row_bytes, self.offset + last * row_bytes


@dataclass(frozen=True)
class Source:
    """One input file and the indices it holds: an image (1), an array (its rows), or a file that failed (1)."""

    place: Place
    kind: str  # "image", "array" or "failed"
    count: int
    error: str = ""
    stamp: str = ""  # size and version (ETag or modification time), read once when the inputs are enumerated
    layout: ArrayLayout | None = None

    def name(self, row: int) -> str:
        return f"{self.place.name}#{row}" if self.kind == "array" else self.place.name


@dataclass
class Item:
    """One input, ready for the model or failed: its global index, name, pixels (0..255, white on black)."""

    index: int
    name: str
    pixels: np.ndarray | None = None
    error: str = ""


def is_candidate(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES + ARRAY_SUFFIXES) or is_array(name)


def is_array(name: str) -> bool:
    return name.lower().endswith(ARRAY_SUFFIXES) or name.endswith("-ubyte")


def expand(inputs, options: dict | None = None) -> list:
    """(place, info or None) of every file, in argument order; folders, prefixes and globs searched recursively
    for images, .npy and IDX files, sorted by name (byte order, as object stores list them)."""
    files: list = []
    for raw in inputs:
        place = storage.locate(raw, options)
        try:
            files += list_place(place)
        except UserError:
            raise
        except Exception as e:  # a missing bucket, refused credentials, an unreachable endpoint
            raise UserError(f"cannot list {place.name} ({storage.describe_error(e)})") from None
    if not files:
        raise UserError("no inputs: give image files, folders, .npy arrays or IDX files")
    return files


def list_place(place: Place) -> list:
    """(place, info) of the files that one argument names; info None for a file that does not exist."""
    fs = place.fs
    is_glob = any(c in place.path for c in storage.GLOB_CHARS) and not (place.is_local and fs.exists(place.path))
    if is_glob:
        found = fs.glob(place.path, detail=True)
        if not found:
            storage.check_bucket(place)
            raise UserError(f"{place.name} matches no files")
    else:
        try:
            info = fs.info(place.path)
        except FileNotFoundError:
            storage.check_bucket(place)
            return [(place, None)]  # its own row says so; every other input is still labelled
        if info["type"] != "directory":
            return [(place, info)]
        found = fs.find(place.path, detail=True)
    files = sorted((path, info) for path, info in found.items() if info["type"] == "file" and is_candidate(path))
    if not files:
        raise UserError(f"{place.name} holds no images, .npy or IDX files")
    return [(Place(fs, path, storage.found_name(place, path, is_glob)), info) for path, info in files]


def array_layout(place: Place, size_bytes: int, size: tuple) -> ArrayLayout:
    """Where the rows of a .npy or IDX file lie, from its header alone, checked against the model.

    A file that cannot be read is this input's own failure (BadImage); an array of the wrong shape or
    type is a mistake in the command, and a UserError.
    """
    kind = ".npy" if place.path.lower().endswith(".npy") else "IDX"
    try:
        if kind == ".npy":
            shape, dtype, offset = npy_header(place, size_bytes)
        else:
            _, shape, offset = idx.parse_header(storage.read_range(place, 0, min(size_bytes, 4 + 4 * 255)), size_bytes)
            dtype = np.dtype(np.uint8)
    except (OSError, ValueError, EOFError) as e:  # idx.IdxError is a ValueError
        raise BadImage(f"not a readable {kind} file ({one_line(e, 120)})") from e
    if not (len(shape) == 3 and shape[1:] == size) and not (len(shape) == 4 and shape[1:] == (1, *size)):
        expected = ",".join(map(str, size))
        raise UserError(f"{place.name}: shape {shape}; expected (N,{expected}) or (N,1,{expected})")
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise UserError(f"{place.name}: dtype {dtype}; expected uint8, or float in [0, 1]")
    return ArrayLayout(offset, dtype, shape[0], int(np.prod(size)))


def npy_header(place: Place, size_bytes: int) -> tuple:
    """(shape, dtype, data offset) of a .npy file, read from its first bytes."""
    head = storage.read_range(place, 0, min(size_bytes, NPY_HEAD))
    version = np.lib.format.read_magic(io.BytesIO(head))
    length_at, length_format = (8, "<H") if version == (1, 0) else (8, "<I")
    if len(head) < length_at + struct.calcsize(length_format):
        raise ValueError("truncated header")
    header_end = length_at + struct.calcsize(length_format) + struct.unpack_from(length_format, head, length_at)[0]
    if header_end > len(head):  # a header longer than usual: read all of it
        head = storage.read_range(place, 0, header_end)
    f = io.BytesIO(head)
    np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(f)
    if dtype.hasobject:
        raise ValueError("it holds Python objects")
    if fortran_order and len(shape) > 1:
        raise ValueError("its values are in Fortran order; save it with numpy.ascontiguousarray")
    expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size_bytes < expected:
        raise ValueError(f"truncated: {size_bytes} bytes, its header says {expected}")
    return shape, dtype, f.tell()


class InputIndex:
    """The global index space of all inputs, and reading of any contiguous range of it."""

    def __init__(self, sources: list, framing: Framing):
        self.sources = sources
        self.framing = framing
        self.starts = np.cumsum([0] + [s.count for s in sources]).tolist()
        self.total = self.starts[-1]

    @classmethod
    def build(cls, inputs, framing: Framing, options: dict | None = None) -> InputIndex:
        return cls([source_for(place, info, framing) for place, info in expand(inputs, options)], framing)

    def fingerprint(self) -> str:
        """Names, sizes and versions of every input: a resumed run, and every process, must read the same ones."""
        digest = hashlib.sha256()
        for s in self.sources:
            digest.update(f"{s.place.name}\0{s.kind}\0{s.count}\0{s.stamp}\n".encode())
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
        """The items [start, stop), in order, read in this thread; the images among them fetched all at once."""
        pieces = list(self.pieces(start, stop))
        fetched = iter(storage.fetch_places([source.place for source, _, _, _ in pieces if source.kind == "image"]))
        items = []
        for source, first, last, index in pieces:
            if source.kind == "array":
                items += self.read_rows(source, first, last, index)
            elif source.kind == "failed":
                items.append(Item(index, source.name(0), error=source.error))
            else:
                items.append(self.decode(source, index, next(fetched)))
        return items

    def read_later(self, start: int, stop: int, pool: ThreadPoolExecutor, workers: int):
        """Start reading [start, stop) on ``pool``, in ``workers`` contiguous slices, and return a function that
        waits for the items in order. The caller labels one range while the next is fetched and decoded: the
        model, libjpeg and network waits release the GIL, so reading overlaps inference. One task per slice, not
        per image: for small PNGs a future costs as much as the decoding. Array rows are read in one piece: a
        request to an object store costs more than converting the rows."""
        if not any(source.kind == "image" for source, _, _, _ in self.pieces(start, stop)):
            workers = 1  # array rows need no decoding: one ranged read for the whole range, not one per slice
        bounds = np.linspace(start, stop, max(1, min(workers, stop - start)) + 1).astype(int)
        futures = [pool.submit(self.read, a, b) for a, b in zip(bounds, bounds[1:])]
        return lambda: [item for future in futures for item in future.result()]

    def decode(self, source: Source, index: int, data) -> Item:
        if isinstance(data, BaseException):
            reason = "no such file" if isinstance(data, FileNotFoundError) else storage.describe_error(data)
            return Item(index, source.name(0), error=f"unreadable ({reason})")
        return image_item(index, source.name(0), data, self.framing)

    def read_rows(self, source: Source, first: int, last: int, index: int) -> list:
        layout = source.layout
        assert layout is not None
        try:
            data = storage.read_range(source.place, *layout.row_range(first, last))
            rows = np.frombuffer(data, layout.dtype, count=(last - first) * layout.row_values)
            rows = rows.astype(np.float32).reshape(last - first, *self.framing.size)
        except Exception as e:  # a file that shrank or vanished after it was listed
            return [Item(index + i, source.name(first + i), error=f"unreadable ({storage.describe_error(e)})")
                    for i in range(last - first)]
        if layout.dtype != np.uint8:
            rows = rows * 255
        bad = ~np.isfinite(rows).all(axis=(1, 2)) | (rows.min(axis=(1, 2)) < 0) | (rows.max(axis=(1, 2)) > 255)
        rows = polarity(rows, self.framing.invert)
        return [Item(index + i, source.name(first + i), error="values outside [0, 1]" if bad[i] else "",
                     pixels=None if bad[i] else rows[i]) for i in range(last - first)]


def source_for(place: Place, info: dict | None, framing: Framing) -> Source:
    """The Source of one listed file: an image, an array (its header read), or a failure of its own."""
    if info is None or info.get("type") != "file":
        return Source(place, "failed", 1, "no such file")
    stamp = storage.stamp(info)
    if not is_array(place.path):
        return Source(place, "image", 1, stamp=stamp)
    try:
        layout = array_layout(place, int(info["size"]), framing.size)
    except BadImage as e:
        return Source(place, "failed", 1, str(e), stamp)
    return Source(place, "array", layout.rows, stamp=stamp, layout=layout)


def image_item(index: int, name: str, data: bytes, framing: Framing, max_pixels: int = MAX_PIXELS) -> Item:
    """One image file's bytes (read from storage, or uploaded) made MNIST-like, or its failure."""
    try:
        gray = open_grayscale(data, framing.box, max_pixels)
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
