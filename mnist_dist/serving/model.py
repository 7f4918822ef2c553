"""One version of one model, behind the small interface every protocol uses: load, predict, metadata, close.

``load`` opens the version's ONNX file through ``open_model`` (its manifest,
its sha256, the runtime, the input and output shapes checked) and warms it up;
it blocks, and runs off the event loop. ``start`` gives it its own batcher.
``predict`` hands a request's job to that batcher; ``close`` waits for every
request it has taken to be answered, then stops the batcher and lets the
session go. The repository (``serving.repository``) decides which versions
are loaded; the routers only ever ask it for one.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from ..inference import manifest as manifest_lib
from ..inference import predict as predict_lib
from ..inference.inputs import Framing
from ..inference.models import Runner, open_model
from ..sysinfo import physical_cores
from . import metrics
from .batching import Job, MicroBatcher, Unbatched
from .options import ServeOptions

# Triton's platform names, by what runs the ONNX file.
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "onnxruntime-cuda": "onnxruntime_onnx", "openvino": "openvino",
             "openvino-bf16": "openvino"}


class ServedModel:
    def __init__(self, name: str, version: str, path: Path, options: ServeOptions):
        self.name, self.version, self.path, self.options = name, version, Path(path), options
        self.runner: Runner | None = None
        self.batcher: MicroBatcher | None = None
        self.in_flight = 0  # requests handed to this version and not yet answered: the event loop's own
        self.idle: asyncio.Event | None = None  # made on the loop by close()
        self.load_s = 0.0

    def __repr__(self) -> str:
        return f"<{self.name} version {self.version}: {self.path}>"

    # --- off the event loop ---------------------------------------------------------------------------------------

    def load(self) -> None:
        """Open, check and warm up the model: UserError for a missing, changed or unreadable file."""
        options = self.options
        threads = options.threads or run_threads(workers=1, model_threads=options.model_threads)
        # "auto" chooses for the largest batch the server runs: under load, where the model's speed is the server's,
        # requests share runs (14 images a run at 32 clients on 2 cores). On the Zen 5 EPYC OpenVINO ran those 1.5x
        # faster than onnxruntime and answered 1.20-1.22x the requests; one request alone it answers 8% slower. The
        # event loop shares the cores with the model: no spinning threads.
        self.runner = open_model(self.path, options.runtime, threads, batch=options.max_batch, spin=False)
        self.warm_up()

    def warm_up(self) -> None:
        """Run the model once at each batch size it will mostly see before it takes requests: the first runs
        allocate, and would otherwise land on the first clients."""
        shape = self.manifest["input"]["shape"][1:]
        for size in sorted({1, self.options.max_batch}):
            self.runner.run(np.zeros((size, *shape), np.float32))  # type: ignore[union-attr]

    def scored(self, batch: np.ndarray) -> tuple:
        """(logits, probabilities) of a batch: the softmax once for every request in it, not once each."""
        assert self.runner is not None
        logits = self.runner.run(batch)
        return logits, manifest_lib.probabilities(logits, self.runner.manifest)

    # --- on the event loop ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        options, stats = self.options, metrics.BatcherStats(self.name, self.version)
        if options.batching:
            self.batcher = MicroBatcher(self.scored, options.max_batch, options.max_wait_ms / 1000,
                                        options.max_queue or None, stats=stats, threads=options.model_threads)
        else:
            self.batcher = Unbatched(self.scored, stats=stats)
        await self.batcher.start()

    @property
    def running(self) -> bool:
        return self.batcher is not None and self.batcher.running

    async def predict(self, job: Job, timeout: float | None):
        """The job's answer from this version's batcher. Counted from the call on, with no await before it: the
        version cannot close under a request it has taken."""
        assert self.batcher is not None
        self.in_flight += 1
        try:
            return await self.batcher(job, timeout=timeout)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self.idle is not None:
                self.idle.set()

    async def close(self) -> None:
        """Answer every request taken, then stop the batcher and let the session (and its memory) go."""
        if self.in_flight:
            self.idle = asyncio.Event()
            await self.idle.wait()
        if self.batcher is not None:
            await self.batcher.stop()
        self.batcher, self.runner = None, None

    # --- what it is -------------------------------------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        assert self.runner is not None
        return self.runner.manifest

    def framing(self, invert: str) -> Framing:
        return predict_lib.framing(self.manifest, invert)

    @property
    def platform(self) -> str:
        assert self.runner is not None
        return PLATFORMS.get(self.runner.engine, self.runner.engine)

    def describe(self) -> dict:
        """What /v1/model says: the input contract, classes, test accuracy, hashes, runtime and batching."""
        assert self.runner is not None and self.batcher is not None
        manifest, options = self.manifest, self.options
        accuracy = manifest.get("pytorch_test_accuracy")
        if self.path.name == manifest.get("artifacts", {}).get("int8"):
            accuracy = manifest.get("int8", {}).get("accuracy", accuracy)
        return {"name": self.name, "version": self.version, "model": self.path.name,
                "runtime": self.runner.description, "input": manifest["input"], "output": manifest["output"],
                "classes": manifest["classes"], "test_accuracy": accuracy,
                "temperature": manifest_lib.temperature(manifest),
                "sha256": {name: entry["sha256"] for name, entry in manifest["files"].items()},
                "batching": {"on": options.batching, "max_batch": options.max_batch,
                             "max_wait_ms": options.max_wait_ms, "max_queue": options.max_queue,
                             "model_threads": len(self.batcher.threads), "model_runs": self.batcher.batches},
                "max_body_bytes": options.max_body, "max_pixels": options.max_pixels}


def run_threads(workers: int, model_threads: int) -> int:
    """The threads of one model run in each server process: its share of the physical cores, less one for its
    event loop, split between its model threads. Measured on 2 cores: 1 thread per run answered more requests
    than 2, alone and at 32 clients."""
    return max(1, (physical_cores() // workers - 1) // model_threads)
