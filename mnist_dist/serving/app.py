"""The HTTP API, the Open Inference Protocol and the draw-a-digit page, over one shared model session.

    POST /v1/predict                 images as multipart fields named ``file``, or JSON {"images": [28x28 arrays]}
    GET  /v1/model                   the input contract, test accuracy, hashes and runtime
    GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}, /v2/models/{name}/ready
    POST /v2/models/{name}/infer     the Open Inference Protocol (JSON or binary tensors)
    GET  /metrics                    Prometheus
    GET  /healthz                    liveness
    GET  /                           the page: draw a digit, see what the model reads

Preprocessing and output fields of /v1 are predict's own (``inference.inputs``,
``inference.predict``); /v2 takes the model's input tensor as it is. Bodies are
read on the event loop, but parsed and decoded on the batcher's thread. Every error
reaches the client as {"error": "one line"} with a 4xx status (503/504 when
the server is too busy, 5xx only for its own faults); no traceback ever
leaves the process.
"""
from __future__ import annotations

import asyncio
import gc
import os
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..errors import UserError
from ..inference import manifest as manifest_lib
from ..inference import predict
from ..inference.inputs import Framing
from ..inference.models import Runner, open_model
from ..sysinfo import physical_cores
from . import metrics, rest_v1, rest_v2
from .batching import MicroBatcher, Unbatched
from .front import BusyRoutes, Fronted, add_error_handlers, document_busy_routes
from .lifecycle import Lifecycle
from .middleware import BodyLimit, Observed
from .options import ServeOptions

# Measured at 32 clients, alternated side by side: on the AVX2 EPYC 1 ms answered 15% more requests than 5 ms and
# 0.2-3 ms about the same; on the Zen 5 EPYC (OIP binary, two model threads) 0.2 ms answered 1.21x the requests of
# 1 ms, and 0.1 ms 1.03x those of 0.2 ms in a second run (0.05 ms 1.06x: within noise).
SWITCH_INTERVAL_S = 0.0001


@dataclass
class Served:
    """What every request shares: the model (one onnxruntime session), its manifest and how it runs."""

    options: ServeOptions
    model: Runner

    def framing(self, invert: str) -> Framing:
        return predict.framing(self.model.manifest, invert)

    def scored(self, batch: np.ndarray) -> tuple:
        """(logits, probabilities) of a batch: the softmax once for every request in it, not once each."""
        logits = self.model.run(batch)
        return logits, manifest_lib.probabilities(logits, self.model.manifest)


def load(options: ServeOptions) -> Served:
    """Load and check the model before the server starts: missing, changed or unreadable files are one UserError."""
    path = Path(options.model_dir) / options.model
    if path.suffix != ".onnx":
        raise UserError(f"--model {options.model}: the server runs ONNX models (model.onnx or model.int8.onnx)")
    # "auto" chooses for the largest batch the server runs: under load, where the model's speed is the server's,
    # requests share runs (14 images a run at 32 clients on 2 cores). On the Zen 5 EPYC OpenVINO ran those 1.5x
    # faster than onnxruntime and answered 1.20-1.22x the requests; one request alone it answers 8% slower. The
    # event loop shares the cores with the model: no spinning threads.
    threads = options.threads or run_threads(workers=1, model_threads=options.model_threads)
    model = open_model(path, options.runtime, threads, batch=options.max_batch, spin=False)
    return Served(options, model)


def run_threads(workers: int, model_threads: int) -> int:
    """The threads of one model run in each server process: its share of the physical cores, less one for its
    event loop, split between its model threads. Measured on 2 cores: 1 thread per run answered more requests
    than 2, alone and at 32 clients."""
    return max(1, (physical_cores() // workers - 1) // model_threads)


def create_app(served: Served) -> FastAPI:
    options = served.options
    lifecycle = Lifecycle(options.drain_s)

    @asynccontextmanager
    async def lifespan(app):
        app.state.batcher = make_batcher(served)
        await app.state.batcher.start()
        await warm_up(served)
        # Everything loaded so far (onnxruntime, the model) lives until exit: keep it out of the garbage collector's
        # full passes, which otherwise walk all of it and stall every request in flight.
        gc.collect()
        gc.freeze()
        # The model thread, back from a run, waits for the GIL until the event loop lets go of it, at most a switch
        # interval (5 ms by default) while the loop is busy with a burst of requests; the model waits with it.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        lifecycle.drain_on_signals(log=print)
        lifecycle.warmed = True
        yield
        await app.state.batcher.stop()
        metrics.process_exited(os.getpid())

    app = Fronted(title="mnist-dist", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.served, app.state.lifecycle = served, lifecycle
    busy = BusyRoutes(app, [*rest_v2.busy_routes(options.model_name), *rest_v1.busy_routes()])
    app.front = Observed(BodyLimit(busy, max_bytes=options.max_body),
                         lifecycle=lifecycle, access_log=open_log(options.access_log))
    add_error_handlers(app)
    rest_v2.add_v2_routes(app, options.model_name)
    rest_v1.add_v1_routes(app)
    document_busy_routes(app, options.model_name)

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics (text format)")
    async def metrics_endpoint():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    static = resources.files(__package__) / "static"

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app



def make_batcher(served: Served) -> MicroBatcher:
    options = served.options
    if not options.batching:
        return Unbatched(served.scored, stats=metrics.BatcherStats())
    return MicroBatcher(served.scored, options.max_batch, options.max_wait_ms / 1000, options.max_queue or None,
                        stats=metrics.BatcherStats(), threads=options.model_threads)


async def warm_up(served: Served) -> None:
    """Run the model once at each batch size it will mostly see, before the server says it is ready: the first runs
    allocate, and would otherwise land on the first clients."""
    manifest = served.model.manifest
    for size in sorted({1, served.options.max_batch}):
        blank = np.zeros((size, *manifest["input"]["shape"][1:]), np.float32)
        await asyncio.to_thread(served.model.run, blank)


def open_log(path: str | None):
    if path is None:
        return None
    if path == "-":
        return _Stdout()
    return open(path, "a", buffering=1, encoding="utf-8")  # one line a request, appended whole


class _Stdout:
    def write(self, line: str) -> None:
        print(line, end="", flush=True)

