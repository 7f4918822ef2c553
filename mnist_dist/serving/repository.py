"""The models a server holds: which versions of which models the repository has, which are loaded, and the switch
from one version to the next without a request lost.

A load runs in the background of the event loop: each new version is opened
through ``open_model`` (its manifest, its sha256, its shapes), warmed up and
given its own batcher; only then does it take traffic, in one assignment of
the model's versions. Requests already taken by a version being replaced are
answered by it, then it is closed and its memory handed back. A load that
fails changes nothing: the versions serving go on serving. (Triton's POLL
mode unloads first, triton-inference-server/server#2076; this never does.)

Where the repository lives, and how its versions reach the local disk, is
``serving.sources``.
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import time
from pathlib import Path

from ..errors import UserError, one_line
from . import metrics
from .errors import BadRequest
from .model import ServedModel
from .options import ServeOptions
from .sources import Source


class Policy:
    """Which of a model's versions to serve (Triton's version policy): ``latest:N``, ``all`` or ``specific:1,3``."""

    def __init__(self, text: str):
        kind, _, value = text.partition(":")
        self.text, self.kind = text, kind
        try:
            if kind == "latest":
                self.count = int(value or 1)
                if self.count < 1:
                    raise ValueError
            elif kind == "specific":
                self.versions = [str(int(v)) for v in value.split(",")]
            elif kind != "all" or value:
                raise ValueError
        except ValueError:
            raise UserError(f"version policy {text!r}: use latest:N (N >= 1), all, or specific:1,3") from None

    def choose(self, available: list) -> list:
        """The versions to serve, of those available (sorted oldest first)."""
        if self.kind == "latest":
            return available[-self.count:]
        if self.kind == "all":
            return list(available)
        return [v for v in available if v in self.versions]


class ModelRepository:
    """The loaded versions of every model, and their loads, unloads and switches (on the event loop, except
    ``open_all``, which runs before it)."""

    def __init__(self, options: ServeOptions, log=print):
        self.options, self.log = options, log
        self.source = Source(options.repository, options.model_name, options.cache_dir)
        self.policy = Policy(options.version_policy)
        self.loaded: dict = {}  # name -> {version: ServedModel}, replaced whole by a switch, never changed in place
        self.wanted: set = set()  # models that should be loaded: readiness waits for each
        self.failed: dict = {}  # name -> (what was tried, why it failed): poll retries only once it changes
        self.changing: asyncio.Lock | None = None  # one load or unload at a time (made on the event loop)

    # --- before the event loop: the server's start -----------------------------------------------------------------

    def open_all(self) -> None:
        """Open every model's versions (its policy's), or raise the first failure as a UserError."""
        listing = self.source.listing()
        if not listing:
            raise UserError(f"{self.options.repository} holds no model: expected <name>/<version>/ folders, each an "
                            "export (mnist-dist export --repository), or one export folder")
        for name, versions in listing.items():
            chosen = self.choose(name, list(versions))
            models = {}
            for version in chosen:
                model = ServedModel(name, version, self.model_path(name, version), self.options)
                self.timed_load(model)
                models[version] = model
            self.loaded[name] = models
            self.wanted.add(name)

    async def start(self) -> None:
        """Start the batchers of the versions opened before the loop."""
        self.changing = asyncio.Lock()
        for models in self.loaded.values():
            for model in models.values():
                await model.start()
                metrics.READY.labels(model.name, model.version).set(1)

    async def stop(self) -> None:
        for models in self.loaded.values():
            for model in models.values():
                if model.batcher is not None:
                    await model.batcher.stop()

    # --- what the routers ask -------------------------------------------------------------------------------------

    def resolve(self, name: str, version: str | None = None) -> ServedModel:
        """The version that answers a request for ``name`` (the newest loaded one, unless ``version`` says);
        BadRequest 404 when there is none."""
        models = self.loaded.get(name)
        if not models:
            loaded = ", ".join(repr(n) for n in self.loaded) or "none"
            raise BadRequest(f"no model {name!r} is loaded (loaded: {loaded})", 404)
        if version is None:
            return models[max(models, key=int)]
        model = models.get(version)
        if model is None:
            raise BadRequest(f"model {name!r} has no version {version} loaded (loaded: {', '.join(models)})", 404)
        return model

    def default(self) -> ServedModel:
        """The model of /v1 and the page: --model-name's, or the only model loaded."""
        if self.options.model_name in self.loaded or len(self.loaded) != 1:
            return self.resolve(self.options.model_name)
        return self.resolve(next(iter(self.loaded)))

    def versions(self, name: str) -> list:
        return sorted(self.loaded.get(name, {}), key=int)

    def ready(self) -> bool:
        return all(self.loaded.get(name) and all(m.running for m in self.loaded[name].values())
                   for name in self.wanted)

    def index(self) -> list:
        """Triton's repository index: every version in the repository or loaded, and its state."""
        listing = self.source.listing()
        entries = []
        for name in sorted(set(listing) | set(self.loaded)):
            loaded = self.loaded.get(name, {})
            for version in sorted(set(listing.get(name, {})) | set(loaded), key=int):
                if version in loaded:
                    entries.append({"name": name, "version": version, "state": "READY", "reason": ""})
                else:
                    failed = self.failed.get(name)
                    reason = failed[1] if failed and version in failed[0][0] else "unloaded"
                    entries.append({"name": name, "version": version, "state": "UNAVAILABLE", "reason": reason})
        return entries

    # --- loads and unloads ----------------------------------------------------------------------------------------

    async def load(self, name: str, listing: dict | None = None) -> list:
        """Load (or reload) a model: its policy's versions from the repository as it is now, the new ones opened and
        warmed up before they take traffic, then versions no longer wanted retired. BadRequest (400) with the
        reason when any fails: then nothing changes. Returns the versions now loaded. ``listing``: the repository
        as its caller has just listed it."""
        assert self.changing is not None
        async with self.changing:
            if listing is None:
                listing = await asyncio.to_thread(self.source.listing)
            if name not in listing:
                raise BadRequest(f"no model {name!r} in the repository {self.options.repository}", 400)
            try:
                chosen = self.choose(name, list(listing[name]))
            except UserError as e:
                raise BadRequest(str(e), 400) from None
            tried = (chosen, [listing[name][v] for v in chosen])
            current = self.loaded.get(name, {})
            fresh: dict = {}
            try:
                for version in (v for v in chosen if v not in current):
                    fresh[version] = await self.open_version(name, version)
            except BadRequest as e:
                self.failed[name] = (tried, str(e))
                await asyncio.gather(*(m.close() for m in fresh.values()))
                raise
            self.failed.pop(name, None)
            # The switch: one assignment, between two requests; a request holds the version it was given.
            self.loaded = {**self.loaded, name: {v: fresh.get(v) or current[v] for v in chosen}}
            self.wanted.add(name)
            for model in fresh.values():
                metrics.READY.labels(name, model.version).set(1)
                self.log(f"Loaded {name} version {model.version} ({model.runner.description}) in "
                         f"{model.load_s:.2f} s")
            await self.retire([m for v, m in current.items() if v not in chosen])
            return chosen

    async def unload(self, name: str) -> None:
        """Unload every version of a model: not ready at once, and closed once each has answered what it took."""
        assert self.changing is not None
        async with self.changing:
            if name not in self.loaded:
                if name not in await asyncio.to_thread(self.source.listing):
                    raise BadRequest(f"no model {name!r} in the repository {self.options.repository}", 400)
                return
            models = self.loaded[name]
            self.loaded = {n: m for n, m in self.loaded.items() if n != name}
            self.wanted.discard(name)
            await self.retire(list(models.values()))

    async def open_version(self, name: str, version: str) -> ServedModel:
        try:
            path = await asyncio.to_thread(self.model_path, name, version)
            model = ServedModel(name, version, path, self.options)
            await asyncio.to_thread(self.timed_load, model)
        except UserError as e:
            raise BadRequest(f"{name} version {version} failed to load: {e}", 400) from None
        await model.start()
        return model

    def timed_load(self, model: ServedModel) -> None:
        started = time.perf_counter()
        try:
            model.load()
        except Exception as e:
            metrics.LOADS.labels(model.name, model.version, "failed").inc()
            if isinstance(e, UserError):
                raise
            # a runtime's own error for a file it cannot read
            raise UserError(f"cannot load {model.path} ({one_line(e, 200)})") from e
        model.load_s = time.perf_counter() - started
        metrics.LOADS.labels(model.name, model.version, "loaded").inc()
        metrics.LOAD_SECONDS.labels(model.name).observe(model.load_s)

    async def retire(self, models: list) -> None:
        for model in models:
            metrics.READY.labels(model.name, model.version).set(0)
            await model.close()
            metrics.UNLOADS.labels(model.name, model.version).inc()
            self.log(f"Unloaded {model.name} version {model.version}")
        if models:
            await asyncio.to_thread(release_memory)  # the trim takes milliseconds: not on the event loop

    def choose(self, name: str, available: list) -> list:
        config = self.source.config(name)
        policy = Policy(config["version_policy"]) if "version_policy" in config else self.policy
        chosen = policy.choose(available)
        if not chosen:
            raise UserError(f"model {name!r}: version policy {policy.text} matches none of its versions "
                            f"({', '.join(available)})")
        return chosen

    def model_path(self, name: str, version: str) -> Path:
        filename = self.source.config(name).get("default_model_filename", self.options.model)
        if Path(filename).suffix != ".onnx" or Path(filename).name != filename:
            raise UserError(f"{name}: the server runs ONNX files of the version's folder (model.onnx or "
                            f"model.int8.onnx), not {filename!r}")
        return self.source.version_folder(name, version) / filename

    # --- poll mode ----------------------------------------------------------------------------------------------------

    async def poll_forever(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.poll_once()
            except UserError as e:  # the store cannot be listed now: try again at the next poll
                self.log(f"Repository poll failed: {e}")
            except Exception as e:  # the server's own fault: said, and polling goes on
                self.log(f"Repository poll failed: internal error ({type(e).__name__}: {one_line(e, 200)})")

    async def poll_once(self) -> None:
        """Bring the loaded models in line with the repository: new versions loaded, models gone unloaded. A
        version that failed is tried again only once the repository changes."""
        listing = await asyncio.to_thread(self.source.listing)
        for name in [n for n in self.loaded if n not in listing]:
            await self.unload(name)
        for name, versions in listing.items():
            try:
                chosen = self.choose(name, list(versions))
            except UserError:
                continue
            tried = (chosen, [versions[v] for v in chosen])
            if chosen == self.versions(name) or self.failed.get(name, (None,))[0] == tried:
                continue
            try:
                await self.load(name, listing)
            except BadRequest as e:  # the versions serving go on serving
                self.log(f"Not loaded: {e}")


def release_memory() -> None:
    """Hand the memory of closed sessions back to the system: collected now, and glibc's free lists trimmed
    (without it, freed arenas stay in the process and RSS grows with each load)."""
    gc.collect()
    trim = malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def malloc_trim():
    """glibc's malloc_trim, from the symbols the process already has (None elsewhere): looked up once, since
    ctypes.util.find_library runs a program to find a library."""
    return getattr(ctypes.CDLL(None), "malloc_trim", None)
