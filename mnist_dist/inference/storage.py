"""Where a job's inputs and outputs live: local paths, or URLs of any file system fsspec knows.

``s3://`` (and S3-compatible stores), ``gs://``, ``az://``, ``https://`` and ``file://`` all go through
fsspec; local paths through its local file system, so that reading whole files, byte ranges and many
objects at once is one code path whatever holds them. Credentials and endpoints come from where each
storage library reads them (for S3: the ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` included, and
``~/.aws``); ``--storage-options`` passes anything else.

Object stores have no rename and no locks: an object written with ``write_whole`` appears whole or not at
all, and a streamed output (``open_output``) is discarded, never committed, when its writer fails.
"""
from __future__ import annotations

import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.local import LocalFileSystem

from .. import atomic, extras
from ..errors import UserError, one_line

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The mnist-dist extra that brings each protocol's package.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
          "adl": "azure", "http": "http", "https": "http"}
# Objects in flight at once for each reading thread: enough to hide a store's latency (tens of ms a request),
# few enough to stay well inside its request-rate limits and connection pool.
IN_FLIGHT = 32
GLOB_CHARS = "*?["


def is_url(text) -> bool:
    return bool(URL.match(str(text)))


@dataclass(frozen=True)
class Place:
    """A file, folder or prefix: the file system that holds it, its path there, and its name for people (the path
    or URL as given, so that output rows name inputs as the user wrote them)."""

    fs: Any
    path: str
    name: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def child(self, relative: str) -> Place:
        return Place(self.fs, f"{self.path.rstrip('/')}/{relative}", f"{self.name.rstrip('/')}/{relative}")

    def sibling(self, name: str) -> Place:
        """``name`` in the folder (or under the prefix) that holds this place."""
        return Place(self.fs, f"{parent(self.path)}/{name}", f"{parent(self.name)}/{name}")

    @property
    def basename(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def parent(path: str) -> str:
    head = path.rstrip("/").rsplit("/", 1)
    return head[0] if len(head) == 2 else "."


def locate(text, options: dict | None = None) -> Place:
    """The place named by ``text``: a local path, a file:// URL, or a URL whose file system fsspec knows."""
    text = str(text)
    if not is_url(text) or text.startswith("file://"):
        local = text[len("file://"):] if text.startswith("file://") else text
        return Place(LocalFileSystem(), os.path.abspath(local), local)
    protocol = text.split("://", 1)[0].lower()
    if protocol in EXTRAS:
        extras.require(EXTRAS[protocol], text)
    try:
        fs, path = fsspec.core.url_to_fs(text, **(options or {}))
    except ImportError as e:  # a protocol fsspec knows, from a package no extra brings
        raise UserError(f"{text}: {protocol}:// needs a package that is not installed ({one_line(e, 150)})") from None
    except (ValueError, TypeError) as e:  # an unknown protocol, or options its file system does not take
        raise UserError(f"{text}: {one_line(e, 200)}") from None
    return Place(fs, path, text)


def found_name(place: Place, path: str, by_glob: bool = False) -> str:
    """The name of ``path``, found under ``place`` by a listing: under the folder as the user wrote it, or the
    full URL in a store."""
    if not place.is_local:
        return place.fs.unstrip_protocol(path)
    return path if by_glob else os.path.join(place.name, os.path.relpath(path, place.path))


def stamp(info: dict) -> str:
    """What tells one version of a file from another: its size and its ETag, or modification time."""
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{version}"


def describe_error(e: BaseException) -> str:
    """A storage library's exception in a line: its message, or its type where it has none. A refusal (HTTP 403)
    often comes with no message at all: say what to check."""
    text = one_line(e, 200) or type(e).__name__
    return f"{text}: check the credentials and the access granted to them" if isinstance(e, PermissionError) else text


def fetch(fs, paths: list) -> list:
    """The bytes of each path, in order, or the exception that reading it raised: many requests in flight at once
    on a remote store, one file after another on a local disk (where a read costs microseconds)."""
    if not paths:
        return []
    if isinstance(fs, AsyncFileSystem):
        got = fs.cat(list(paths), batch_size=IN_FLIGHT, on_error="return")
        return [got.get(p, FileNotFoundError(p)) for p in paths]
    out: list = []
    for path in paths:
        try:
            out.append(fs.cat_file(path))
        except Exception as e:  # any failure is this file's own
            out.append(e)
    return out


def fetch_places(places: list) -> list:
    """``fetch`` for places that may live in several file systems (a local folder and a bucket in one job): each
    is read through its own, and the results come back in the places' order."""
    by_fs: dict = {}
    for position, place in enumerate(places):
        by_fs.setdefault(id(place.fs), (place.fs, []))[1].append(position)
    results: list = [None] * len(places)
    for fs, positions in by_fs.values():
        for position, data in zip(positions, fetch(fs, [places[p].path for p in positions])):
            results[position] = data
    return results


def read_range(place: Place, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file: one ranged request to an object store, a seek and a read on disk."""
    return place.fs.cat_file(place.path, start=start, end=end)


def write_whole(place: Place, data: bytes) -> None:
    """Write a small object whole: atomically renamed on disk, one PUT (which appears whole or not at all) in an
    object store."""
    if place.is_local:
        atomic.write_bytes(place.path, data)
    else:
        place.fs.pipe_file(place.path, data)


@contextmanager
def open_output(place: Place):
    """A binary file to stream ``place`` into: it appears only if the block succeeds (a temporary file renamed
    on disk; an upload completed on close in an object store, and aborted on failure)."""
    if place.is_local:
        with atomic.atomic_path(place.path) as tmp, open(tmp, "wb") as f:
            yield f
        return
    f = place.fs.open(place.path, "wb")
    try:
        yield f
    except BaseException:
        f.discard()  # aborts a multipart upload; nothing is committed
        raise
    f.close()


def check_writable(place: Place, option: str) -> None:
    """Prove that new objects can be written beside ``place`` before any work starts: a probe object is written and
    deleted. Local files are checked by ``atomic.check_output_file``."""
    probe = place.sibling(f".{place.basename}.probe-{uuid.uuid4().hex}")
    try:
        place.fs.pipe_file(probe.path, b"")
        place.fs.rm_file(probe.path)
    except Exception as e:  # a missing bucket, refused credentials, an unreachable endpoint
        raise UserError(f"{option} {place.name} is not writable ({describe_error(e)})") from None


def check_bucket(place: Place) -> None:
    """A missing object is that input's own failure, but a missing bucket (or container) is the command's: one
    line. The bucket is the first part of the path in object stores; local and http(s) paths have none."""
    protocols = place.fs.protocol if isinstance(place.fs.protocol, tuple) else (place.fs.protocol,)
    if place.is_local or any(p.startswith("http") for p in protocols):
        return
    bucket = place.path.split("/", 1)[0]
    if not place.fs.exists(bucket):
        raise UserError(f"{place.name}: the bucket {bucket} does not exist")


def remove_tree(place: Place) -> None:
    if place.fs.exists(place.path):
        place.fs.rm(place.path, recursive=True)
