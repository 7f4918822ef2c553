"""The IDX file format of MNIST: one parser for the training data and for users' inputs.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values. MNIST uses only
unsigned bytes (type 0x08): images are 3-D (magic 2051), labels 1-D (magic 2049).
"""
from __future__ import annotations

import numpy as np

IMAGES_MAGIC = 2051  # uint8, 3 dimensions
LABELS_MAGIC = 2049  # uint8, 1 dimension
UBYTE = 0x08


class IdxError(ValueError):
    """Not a complete uint8 IDX file; the message says what is wrong."""


def parse_header(head, total_size: int) -> tuple:
    """(magic, dims, data offset) of an IDX file of ``total_size`` bytes that starts with ``head`` (bytes-like)."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise IdxError("not an IDX file (bad magic number)")
    if head[2] != UBYTE:
        raise IdxError(f"IDX value type 0x{head[2]:02x} is not unsigned bytes")
    ndim = head[3]
    offset = 4 + 4 * ndim
    if len(head) < offset:
        raise IdxError(f"truncated IDX header ({total_size} bytes)")
    dims = tuple(int.from_bytes(head[i : i + 4], "big") for i in range(4, offset, 4))
    expected = offset + int(np.prod(dims, dtype=np.int64))
    if total_size != expected:
        raise IdxError(f"IDX file of shape {'x'.join(map(str, dims))} is truncated or has extra bytes "
                       f"({total_size} bytes, expected {expected})")
    return int.from_bytes(head[:4], "big"), dims, offset


def from_bytes(raw: bytes | bytearray) -> np.ndarray:
    """The values of an IDX file held in memory, shaped by its header (a view, not a copy)."""
    _, dims, offset = parse_header(raw, len(raw))
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)
