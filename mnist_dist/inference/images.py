"""Make users' images look like MNIST: grayscale, white digit on black, fitted in a box, centred by mass.

The sizes (28x28 images, digits fitted in 20x20, for MNIST) come from the
model's manifest; see ``exporting.manifest.image_size`` and ``digit_box``.
"""
import numpy as np
from PIL import Image, ImageOps

INK = 0.2  # a pixel is ink if it is brighter than this share of the brightest (after background removal)


class BadImage(ValueError):
    """This one input cannot be used; the reason goes into its error row."""


def open_grayscale(path) -> np.ndarray:
    """Decode fully (so truncated files fail here) and flatten to 8-bit gray; transparency becomes white."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return np.asarray(ImageOps.grayscale(img), dtype=np.float32)
    except Exception as e:  # any decoder failure is this file's problem alone, never the batch's
        raise BadImage(f"not a readable image ({' '.join(str(e).split())[:120]})") from e


def light_background(gray: np.ndarray) -> bool:
    """Judge polarity by the border: MNIST backgrounds are dark, scans are usually light."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return float(np.median(border)) > 127


def to_mnist(gray: np.ndarray, invert: str, size: tuple, box: int) -> np.ndarray:
    """float32 pixels 0..255, white digit on black, ``size`` (height, width), the digit fitted in ``box``."""
    if invert == "yes" or (invert == "auto" and light_background(gray)):
        gray = 255.0 - gray
    if gray.shape == tuple(size):
        return gray.astype(np.float32)  # already the model's size: taken as it is
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
    return np.asarray(img.resize(size, Image.LANCZOS), dtype=np.float32)


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
