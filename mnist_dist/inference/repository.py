"""The model repository's layout, Triton's: ``<repository>/<name>/<version>/``, each version an export folder.

Versions are whole positive numbers; anything else in a model's folder (a
hidden staging folder, a ``config.json``) is not a version. A version appears
by one rename of a finished folder (``publish_version``), so that a server
scanning the repository never sees half of one. Torch-free: the exporter
writes versions, the server reads them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UserError
from . import manifest as manifest_lib

VERSION = re.compile(r"[1-9][0-9]{0,17}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
CONFIG = "config.json"  # per model, optional: {"default_model_filename": ..., "version_policy": ...}


def is_version(name: str) -> bool:
    return bool(VERSION.fullmatch(name))


def check_name(name: str, option: str = "--name") -> str:
    if not NAME.fullmatch(name):
        raise UserError(f"{option} {name!r}: use letters, digits, '.', '_' and '-' (128 at most), starting with a "
                        "letter or digit")
    return name


def versions_in(model_folder: Path) -> list:
    """The version numbers in a model's folder, as strings, oldest first."""
    if not model_folder.is_dir():
        return []
    return sorted((p.name for p in model_folder.iterdir() if is_version(p.name) and p.is_dir()), key=int)


def is_export_folder(folder: Path) -> bool:
    """An export folder (a manifest at its top) rather than a repository of them."""
    return (folder / manifest_lib.MANIFEST).is_file()


def model_config(model_folder: Path) -> dict:
    """The model's own settings (config.json beside its versions), or {}."""
    path = model_folder / CONFIG
    return parse_config(path.read_text(), path) if path.is_file() else {}


def parse_config(text: str, where) -> dict:
    try:
        config = json.loads(text)
    except ValueError as e:
        raise UserError(f"{where} is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{where} must hold a JSON object")
    return config


def publish_version(staging: Path, model_folder: Path) -> Path:
    """Rename the finished ``staging`` folder to the model's next version; returns the version's folder. Two
    exporters publishing at once each get a number of their own: each claims its number by creating the empty
    folder, which only one can, then renames onto it."""
    model_folder.mkdir(parents=True, exist_ok=True)
    while True:
        existing = versions_in(model_folder)
        target = model_folder / str(int(existing[-1]) + 1 if existing else 1)
        try:
            target.mkdir()  # claims the number: rename() alone would replace an empty folder of that name
        except FileExistsError:
            continue
        staging.rename(target)  # onto the empty folder just claimed: one atomic step for readers
        return target
