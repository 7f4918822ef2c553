"""The HTTP API, the Open Inference Protocol, the repository API and the draw-a-digit page, over the models of
one model repository.

    POST /v1/predict                 images as multipart fields named ``file``, or JSON {"images": [28x28 arrays]}
    GET  /v1/model                   the input contract, test accuracy, hashes and runtime
    GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}], .../ready
    POST /v2/models/{name}[/versions/{v}]/infer   the Open Inference Protocol (JSON or binary tensors)
    POST /v2/repository/index, /v2/repository/models/{name}/load, .../unload   Triton's repository API
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
import contextlib
import os
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import __version__
from . import metrics, rest_repository, rest_v1, rest_v2
from .front import BusyRoutes, Fronted, add_error_handlers, document_busy_routes
from .lifecycle import Lifecycle, settle_process
from .middleware import BodyLimit, Observed
from .options import ServeOptions
from .repository import ModelRepository


def load(options: ServeOptions, log=print) -> ModelRepository:
    """Open and check every model the server starts with: missing, changed or unreadable files are one UserError,
    before the server starts."""
    repository = ModelRepository(options, log)
    repository.open_all()
    return repository


def create_app(repository: ModelRepository, process_wide: bool = False) -> FastAPI:
    """The app over the repository's models. ``process_wide``: the app is its process's server, and may tune the
    process (the garbage collector, the switch interval) once it has started."""
    options = repository.options
    lifecycle = Lifecycle(options.drain_s)

    @asynccontextmanager
    async def lifespan(app):
        await repository.start()
        if process_wide:
            settle_process()
        poller = (asyncio.create_task(repository.poll_forever(options.poll_s)) if options.control_mode == "poll"
                  else None)
        lifecycle.drain_on_signals(log=print)
        lifecycle.warmed = True
        yield
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        await repository.stop()
        metrics.process_exited(os.getpid())

    app = Fronted(title="mnist-dist", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.repository, app.state.lifecycle = repository, lifecycle
    busy = BusyRoutes(app, [*rest_v2.busy_routes(), *rest_v1.busy_routes()])
    app.front = Observed(BodyLimit(busy, max_bytes=options.max_body),
                         lifecycle=lifecycle, access_log=open_log(options.access_log))
    add_error_handlers(app)
    rest_v2.add_v2_routes(app)
    rest_repository.add_repository_routes(app)
    rest_v1.add_v1_routes(app)
    document_busy_routes(app)

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


def open_log(path: str | None):
    if path is None:
        return None
    if path == "-":
        return _Stdout()
    return open(path, "a", buffering=1, encoding="utf-8")  # one line a request, appended whole


class _Stdout:
    def write(self, line: str) -> None:
        print(line, end="", flush=True)

