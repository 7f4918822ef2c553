"""Make users' images look like MNIST: grayscale, white digit on black, fitted in a box, centred by mass.

The sizes (28x28 images, digits fitted in 20x20, for MNIST) come from the
model's manifest; see ``inference.manifest.image_size`` and ``digit_box``.
"""
from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageOps

from ..errors import one_line

try:  # libspng: a plain gray PNG decoded in one C call, a tenth of the cost of Pillow's chunk reader in Python
    import pyspng
except ImportError:  # where it has no wheel, Pillow decodes PNGs too
    pyspng = None

INK = 0.2  # a pixel is ink if it is brighter than this share of the brightest (after background removal)
# A JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself while both sides stay at least this many
# times the digit's box: a 1024x768 phone scan decodes at 256x192, several times faster, and the digit
# is still far larger than the box it is shrunk into.
DRAFT_BOXES = 8
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# The most pixels an image may have, read from its header before anything is decoded: a small PNG can declare
# 12,000 x 12,000 pixels and decode to gigabytes. 4096 x 4096 covers a 12-megapixel phone photo.
MAX_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BadImage(ValueError):
    """This one input cannot be used; the reason goes into its error row."""


def open_grayscale(data: bytes, box: int = 0, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file's bytes to gray float32 pixels 0..255.

    Decoded fully, so truncated files fail here. The EXIF orientation is applied first, so a phone
    photo is read upright; 16-bit images are scaled to 8 bits, not clipped; transparency becomes
    white. With ``box``, large JPEGs are decoded at a reduced scale (see DRAFT_BOXES). Images of more than
    ``max_pixels`` (by their header) are refused undecoded.
    """
    size = plain_gray_png_size(data) if pyspng is not None else None
    if size is not None:
        check_pixels(size[0], size[1], max_pixels)
        try:
            return pyspng.load(data).astype(np.float32)
        except RuntimeError:
            pass  # a broken file: Pillow's reading of it says what is wrong
    stream = io.BytesIO(data)
    try:
        with Image.open(stream) as opened:
            check_pixels(*opened.size, max_pixels)
            if box and opened.format == "JPEG":
                opened.draft("L", (DRAFT_BOXES * box, DRAFT_BOXES * box))
            opened.load()
            img: Image.Image = opened
            if img.info.get("exif"):  # most images carry none, and reading it costs as much as decoding a PNG
                img = ImageOps.exif_transpose(img)
            return to_gray(img)
    except BadImage:
        raise
    except Exception as e:  # any decoder failure is this file's problem alone, never the batch's
        reason = str(e).replace(f" {stream!r}", "")  # Pillow names the stream: "cannot identify image file <...>"
        raise BadImage(f"not a readable image ({one_line(reason, 120)})") from e


def plain_gray_png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an 8-bit gray, non-interlaced PNG without EXIF (every MNIST-style PNG), read from its
    header; None for any other file, which Pillow decodes."""
    if len(data) < 29 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if (depth, colour, interlace) != (8, 0, 0) or b"eXIf" in data:
        return None
    return width, height


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise BadImage(f"{width}x{height} pixels is over the limit of {max_pixels:,} pixels")


def to_gray(img: Image.Image) -> np.ndarray:
    if img.mode in SIXTEEN_BIT_MODES:
        return np.clip(np.asarray(img, dtype=np.float32), 0, 65535) * np.float32(255 / 65535)
    if img.mode == "L":  # already 8-bit gray, as most scans and every MNIST-style PNG
        # The bytes themselves: a third of what np.asarray costs through Pillow's array interface on a 28x28 image.
        return np.frombuffer(img.tobytes(), np.uint8).reshape(img.height, img.width).astype(np.float32)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(ImageOps.grayscale(img), dtype=np.float32)


def light_background(gray: np.ndarray):
    """Judge polarity by the border: MNIST backgrounds are dark, scans are usually light.

    ``gray`` is one image [H, W] (returns a bool) or a stack [N, H, W] (returns one bool per image).
    """
    border = np.concatenate([gray[..., 0, :], gray[..., -1, :], gray[..., :, 0], gray[..., :, -1]], axis=-1)
    return median(border) > 127


def median(values: np.ndarray) -> np.ndarray:
    """np.median over the last axis, as np.median computes it, at a fifth of its cost on a 28x28 image's border
    (np.median's general machinery is most of what it costs there)."""
    ordered = np.sort(values, axis=-1)
    n = ordered.shape[-1]
    return (ordered[..., (n - 1) // 2] + ordered[..., n // 2]) / 2


def to_mnist(gray: np.ndarray, invert: str, size: tuple, box: int) -> np.ndarray:
    """float32 pixels 0..255, white digit on black, ``size`` (height, width), the digit fitted in ``box``."""
    if invert == "yes" or (invert == "auto" and light_background(gray)):
        gray = 255.0 - gray
    if gray.shape == tuple(size):
        return gray.astype(np.float32, copy=False)  # already the model's size: taken as it is
    return centre_by_mass(fit_box(crop_to_ink(gray), box), size)


def crop_to_ink(gray: np.ndarray) -> np.ndarray:
    gray = gray - np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]))
    gray = np.clip(gray, 0, None)
    if gray.max() <= 0:
        raise BadImage("no digit found (the image is blank)")
    rows, cols = np.nonzero(gray > INK * gray.max())
    return gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def fit_box(digit: np.ndarray, box: int) -> np.ndarray:
    """Scale so the longer side is ``box`` pixels, keeping the aspect ratio, and stretch contrast to 0..255."""
    h, w = digit.shape
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray((255 * digit / digit.max()).astype(np.uint8))
    return np.asarray(img.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)


def centre_by_mass(digit: np.ndarray, size: tuple) -> np.ndarray:
    """Place the digit on a ``size`` canvas with its centre of mass at the centre, as MNIST was made."""
    h, w = digit.shape
    total = digit.sum()
    rows, cols = np.indices(digit.shape)
    com_r, com_c = (rows * digit).sum() / total, (cols * digit).sum() / total
    top = int(np.clip(round(size[0] / 2 - com_r - 0.5), 0, size[0] - h))
    left = int(np.clip(round(size[1] / 2 - com_c - 0.5), 0, size[1] - w))
    canvas = np.zeros(size, np.float32)
    canvas[top : top + h, left : left + w] = digit
    return canvas
