"""Where a model repository lives: a local folder, read in place, or a URL (s3://, gs://, ... through
``inference.storage``), listed remotely and copied version by version into a local cache before anything opens it.
A folder with a manifest at its top is one export: a repository of one model (``--model-name``) with one version,
1.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from ..inference import manifest as manifest_lib
from ..inference import repository as layout
from ..inference import storage

SOURCE_STAMPS = ".source.json"  # in a cached version: the remote objects it was copied from


class Source:
    """The repository's models and versions, and each version's local folder."""

    def __init__(self, location: str, single_name: str, cache_dir: str | None = None):
        self.location, self.single_name = location, single_name
        self.place = storage.locate(location)
        self.cache = None if self.place.is_local else cache_folder(location, cache_dir)
        if self.place.is_local and not Path(self.place.path).is_dir():
            raise UserError(f"model repository {location} is not a folder")
        # One export folder stays one: while `export --force` replaces it, it has no manifest for a moment, and a
        # poll then must not take the model for gone.
        self.single = self.place.is_local and layout.is_export_folder(Path(self.place.path))

    def listing(self) -> dict:
        """{name: {version: stamp}}: what the repository holds now (a remote one is listed, not copied). Versions
        are folders with a manifest; a claimed number still being renamed into place has none yet."""
        if self.single:
            root = Path(self.place.path)
            if not layout.is_export_folder(root):
                raise UserError(f"{root} has no {manifest_lib.MANIFEST} now")
            return {self.single_name: {"1": manifest_stamp(root)}}
        if self.place.is_local:
            return local_listing(Path(self.place.path))
        return remote_listing(self.place, self.single_name)

    def model_folder(self, name: str) -> Path:
        """A local repository's folder of the model (the export folder itself, for one)."""
        root = Path(self.place.path)
        return root if self.single else root / name

    def version_folder(self, name: str, version: str) -> Path:
        """The version's local folder: a remote one is copied into the cache first (again if it changed)."""
        if self.place.is_local:
            return self.model_folder(name) if self.single else self.model_folder(name) / version
        assert self.cache is not None
        return fetch_version(self.place, self.cache, name, version, self.remote_single())

    def config(self, name: str) -> dict:
        """The model's config.json, read where the repository lives (a remote one before any version is copied)."""
        if self.place.is_local:
            return layout.model_config(self.model_folder(name))
        if self.remote_single():
            return {}
        place = self.place.child(f"{name}/{layout.CONFIG}")
        try:
            text = place.fs.cat_file(place.path).decode()
        except FileNotFoundError:
            return {}
        except Exception as e:  # the store's own errors
            raise UserError(f"cannot read {place.name} ({storage.describe_error(e)})") from None
        return layout.parse_config(text, place.name)

    def remote_single(self) -> bool:
        """A remote repository that is one export folder (a manifest at its top)."""
        return self.place.fs.exists(self.place.child(manifest_lib.MANIFEST).path)


def local_listing(root: Path) -> dict:
    listing = {}
    for model in sorted(root.iterdir()):
        if model.is_dir() and layout.NAME.fullmatch(model.name):
            versions = {v: manifest_stamp(model / v) for v in layout.versions_in(model)
                        if layout.is_export_folder(model / v)}
            if versions:
                listing[model.name] = versions
    return listing


def manifest_stamp(folder: Path) -> str:
    return str((folder / manifest_lib.MANIFEST).stat().st_mtime_ns)


def remote_objects(place: storage.Place) -> dict:
    """{path relative to the repository: stamp} of every object under it."""
    try:
        found = place.fs.find(place.path, detail=True)
    except Exception as e:  # the store's own errors: no such bucket, no access, no network
        raise UserError(f"cannot list the model repository {place.name} ({storage.describe_error(e)})") from None
    root = place.path.rstrip("/") + "/"
    return {path[len(root):]: storage.stamp(info) for path, info in found.items() if path.startswith(root)}


def remote_listing(place: storage.Place, single_name: str) -> dict:
    objects = remote_objects(place)
    if manifest_lib.MANIFEST in objects:
        return {single_name: {"1": objects[manifest_lib.MANIFEST]}}
    listing: dict = {}
    for relative, stamp in objects.items():
        parts = relative.split("/")
        if (len(parts) == 3 and parts[2] == manifest_lib.MANIFEST and layout.NAME.fullmatch(parts[0])
                and layout.is_version(parts[1])):
            listing.setdefault(parts[0], {})[parts[1]] = stamp
    return {name: dict(sorted(versions.items(), key=lambda kv: int(kv[0]))) for name, versions in listing.items()}


def cache_folder(location: str, cache_dir: str | None) -> Path:
    """Where a remote repository's versions are copied: one folder per repository URL."""
    base = Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                       "mnist-dist", "repositories")
    folder = base / hashlib.sha256(location.encode()).hexdigest()[:16]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the model cache {folder} ({e.strerror or e})") from None
    return folder


def fetch_version(place: storage.Place, cache: Path, name: str, version: str, single: bool) -> Path:
    """Copy one version from the store into the cache, unless the cached copy came from the same objects; staged,
    then renamed, so that a copy cut short is never taken for a version."""
    source = place if single else place.child(f"{name}/{version}")
    wanted = {rel: stamp for rel, stamp in remote_objects(source).items() if not single or "/" not in rel}
    if not wanted:
        raise UserError(f"{name} version {version} is no longer in the repository")
    target = cache / name / version
    target.parent.mkdir(parents=True, exist_ok=True)
    stamps = target / SOURCE_STAMPS
    if stamps.is_file() and json.loads(stamps.read_text()) == wanted:
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=target.parent))
    try:
        for relative in wanted:
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            place.fs.get(source.child(relative).path, str(staging / relative))
        (staging / SOURCE_STAMPS).write_text(json.dumps(wanted))
        old = target.with_name(f".{version}.old.{os.getpid()}")
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as e:
        raise UserError(f"cannot copy {name} version {version} from {place.name} "
                        f"({storage.describe_error(e)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
