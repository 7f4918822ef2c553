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
import re
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..errors import UserError, one_line
from ..inference import manifest as manifest_lib
from ..inference import outputs, predict
from ..inference.images import MAX_PIXELS
from ..inference.inputs import Framing, Item, array_item, image_item
from ..inference.models import Runner, open_model
from ..sysinfo import physical_cores
from . import metrics, oip, openapi
from .batching import Job, MicroBatcher, Overloaded, Unavailable, Unbatched
from .errors import BadRequest
from .forms import parse_form
from .lifecycle import Lifecycle
from .middleware import BodyLimit, Observed

MAX_BODY = 5 * 2**20
MAX_IMAGES = 256  # per request
INVERT = ("auto", "yes", "no")
TRUE = ("1", "true", "yes", "on")
RETRY_AFTER_S = 1
# Measured at 32 clients, alternated side by side: on the AVX2 EPYC 1 ms answered 15% more requests than 5 ms and
# 0.2-3 ms about the same; on the Zen 5 EPYC (OIP binary, two model threads) 0.2 ms answered 1.21x the requests of
# 1 ms, and 0.1 ms 1.03x those of 0.2 ms in a second run (0.05 ms 1.06x: within noise).
SWITCH_INTERVAL_S = 0.0001


@dataclass
class ServeOptions:
    model_dir: str
    model: str = "model.onnx"
    threads: int | None = None
    batching: bool = True
    max_batch: int = 64
    max_wait_ms: float = 0.0  # measured: waiting 2 ms more cost single clients 3 ms and won nothing under load
    max_body: int = MAX_BODY
    runtime: str = "auto"
    model_name: str = "mnist"
    max_queue: int = 1024  # images waiting for the model; 0: no bound
    timeout_s: float = 10.0
    max_pixels: int = MAX_PIXELS
    drain_s: float = 20.0
    access_log: str | None = None  # a file, or "-" for standard output
    # Threads taking batches to the model in each process. With two, one prepares and answers while the other is
    # in the model; on 2 cores they also run the model side by side and starve the event loop: measured there
    # (alternated side by side, 0.1 ms switch interval), one answered more requests at 1 and at 32 clients.
    model_threads: int = 1


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
    app.front = Observed(BodyLimit(BusyRoutes(app, options.model_name), max_bytes=options.max_body),
                         lifecycle=lifecycle, access_log=open_log(options.access_log))
    add_error_handlers(app)
    add_v2_routes(app, options.model_name)
    add_v1_routes(app)
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


class Fronted(FastAPI):
    """FastAPI behind a front of plain ASGI layers (``front``): every request is observed (metrics, request ID,
    access log, drain) and its body bounded there, and the image routes are answered there too (BusyRoutes),
    before FastAPI's own layers; every other request then reaches FastAPI as usual."""

    front: Callable

    async def __call__(self, scope, receive, send) -> None:
        await self.front(scope, receive, send)

    async def behind(self, scope, receive, send) -> None:
        """FastAPI itself: where the front sends every request it does not answer."""
        await super().__call__(scope, receive, send)


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


def add_error_handlers(app: FastAPI) -> None:
    async def handler(request, exc):
        return error_response(exc)

    for kind in (BadRequest, HTTPException, RequestValidationError, Exception):
        app.add_exception_handler(kind, handler)


def error_response(exc: Exception) -> JSONResponse:
    """How any error reaches a client: {"error": one line} and its status; the server's own faults say only their
    kind (the traceback stays in the server's log)."""
    if isinstance(exc, BadRequest):
        return JSONResponse({"error": one_line(exc)}, status_code=exc.status)
    if isinstance(exc, HTTPException):
        return JSONResponse({"error": one_line(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
    if isinstance(exc, RequestValidationError):
        return JSONResponse({"error": one_line(exc.errors())}, status_code=422)
    return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


async def answer_of(request: Request, job: Job):
    """The job's answer from the batcher, or 503 (too busy: try again) or 504 (waited too long). The job's own
    errors (BadRequest) reach the error handlers as they are."""
    options = request.app.state.served.options
    try:
        return await request.app.state.batcher(job, timeout=options.timeout_s or None)
    except Overloaded as e:
        metrics.REJECTED.labels("queue_full").inc()
        raise HTTPException(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except asyncio.TimeoutError:
        metrics.REJECTED.labels("timeout").inc()
        raise HTTPException(504, f"no answer from the model within {options.timeout_s:g} s") from None
    except Unavailable as e:
        raise HTTPException(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from None


class Template(NamedTuple):
    """What the metrics label a request with: its route's template, not its path."""

    path: str


class Answer(NamedTuple):
    """A busy route's answer, sent as two plain ASGI messages."""

    payload: bytes
    content_type: bytes = b"application/json"
    status: int = 200
    headers: tuple = ()


class BusyRoutes:
    """The routes that carry images, answered as plain ASGI ahead of FastAPI (its telemetry hooks, router,
    exception and dependency layers), which cost the event loop more than the rest of a request together (measured
    under load); every other request passes through to FastAPI (``app.behind``). Their requests see ``app`` as
    ``request.app``, as routes do. ``openapi.busy_paths`` documents them."""

    def __init__(self, app: Fronted, model_name: str) -> None:
        self.app = app

        async def infer(request: Request, body: bytes) -> Answer:
            known_model(request, model_name)
            job = InferJob(body, request.headers.get("inference-header-content-length"),
                           request.app.state.served.model.manifest, model_name)
            payload, header_size = await answer_of(request, job)
            assert job.request is not None  # prepared, since it was answered
            metrics.images("labelled").inc(len(job.request.images))
            if header_size is None:
                return Answer(payload)
            return Answer(payload, b"application/octet-stream",
                          headers=((b"inference-header-content-length", str(header_size).encode()),))

        async def predict_endpoint(request: Request, body: bytes) -> Answer:
            # Most requests have no query string: not parsing an empty one saves the event loop a few microseconds.
            query = request.query_params if request.scope["query_string"] else {}
            return await answer(request, body, query.get("invert", "auto"),
                                query.get("return_image", "").lower() in TRUE)

        self.routes = [(re.compile(r"/v2/models/(?P<name>[^/]+)/infer"), Template("/v2/models/{name}/infer"), infer),
                       (re.compile(r"/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/infer"),
                        Template("/v2/models/{name}/versions/{version}/infer"), infer),
                       (re.compile(r"/v1/predict"), Template("/v1/predict"), predict_endpoint)]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for pattern, template, endpoint in self.routes:
                match = pattern.fullmatch(scope["path"])
                if match:
                    scope["route"], scope["path_params"] = template, match.groupdict()
                    scope["app"] = self.app
                    return await self.answer(endpoint, scope, receive, send)
        await self.app.behind(scope, receive, send)

    @staticmethod
    async def answer(endpoint, scope, receive, send) -> None:
        if scope["method"] != "POST":
            return await error_response(HTTPException(405, headers={"Allow": "POST"}))(scope, receive, send)
        body = await read_body(receive)  # a client gone, or a body over the limit: the outer layers answer those
        try:
            reply = await endpoint(Request(scope, receive), body)
        except (BadRequest, HTTPException) as e:
            return await error_response(e)(scope, receive, send)
        except Exception as e:  # the server's own fault: a one-line 500, and the traceback to the server's log
            await error_response(e)(scope, receive, send)
            raise
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": [(b"content-type", reply.content_type),
                                (b"content-length", str(len(reply.payload)).encode()), *reply.headers]})
        await send({"type": "http.response.body", "body": reply.payload})


async def read_body(receive) -> bytes:
    """The whole request body, as Starlette's Request.body reads it, without its stream's layers."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def document_busy_routes(app: FastAPI, model_name: str) -> None:
    def schema() -> dict:
        if app.openapi_schema is None:
            described = get_openapi(title=app.title, version=app.version, routes=app.routes)
            described["paths"].update(openapi.busy_paths(model_name))
            app.openapi_schema = described
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]


def known_model(request: Request, model_name: str) -> None:
    """The path names this server's model (its only version, 1), or the answer is 404."""
    name, version = request.path_params["name"], request.path_params.get("version", "1")
    if name != model_name or version != "1":
        raise BadRequest(f"no model {name!r} (version {version}); this server has {model_name!r} (version 1)", 404)


class InferJob(Job):
    """An Open Inference Protocol request: parsed and answered on the batcher's thread."""

    def __init__(self, body: bytes, header_length: str | None, manifest: dict, model_name: str):
        self.body, self.header_length, self.manifest, self.model_name = body, header_length, manifest, model_name
        self.request: oip.InferRequest | None = None

    def prepare(self) -> np.ndarray:
        self.request = oip.parse_infer(self.body, self.header_length, self.manifest, MAX_IMAGES)
        return self.request.images

    def finish(self, logits: np.ndarray, probabilities: np.ndarray) -> tuple:
        assert self.request is not None
        return oip.encode_infer(self.model_name, self.request, logits, probabilities)


# --- /v1: images as users have them --------------------------------------------------------------------------------

def add_v1_routes(app: FastAPI) -> None:
    @app.get("/v1/model", summary="The model: input contract, classes, test accuracy, hashes, runtime")
    async def model_info(request: Request):
        return describe(request.app.state.served, request.app.state.batcher)


async def answer(request: Request, body: bytes, invert: str, with_image: bool) -> Answer:
    """Read the images, label them through the batcher, and answer in request order."""
    if invert not in INVERT:
        raise BadRequest(f"invert must be one of {', '.join(INVERT)}", 422)
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise BadRequest("send multipart/form-data with fields named 'file', or application/json "
                         "{\"images\": [...]}", 415)
    served = request.app.state.served
    job = PredictJob(body, content_type, kind, served, served.framing(invert), with_image)
    payload = await answer_of(request, job)
    metrics.images("labelled").inc(len(job.good))
    if len(job.items) > len(job.good):
        metrics.images("failed").inc(len(job.items) - len(job.good))
    if not job.good:  # nothing could be read: the request itself is bad
        return Answer(payload, status=422 if kind == "application/json" else 400)
    return Answer(payload)


class PredictJob(Job):
    """A /v1 request: its images read, decoded and made MNIST-like, labelled, and its answer written, all on the
    batcher's thread."""

    def __init__(self, body: bytes, content_type: str, kind: str, served: Served, framing: Framing,
                 with_image: bool):
        self.body, self.content_type, self.kind, self.served = body, content_type, kind, served
        self.framing, self.with_image = framing, with_image
        self.items: list = []
        self.good: list = []

    def prepare(self) -> np.ndarray:
        if self.kind == "multipart/form-data":
            self.items = uploaded_items(self.body, self.content_type, self.framing, self.served.options.max_pixels)
        else:
            self.items = json_items(self.body, self.framing)
        self.good, batch = predict.model_batch(self.items, self.served.model.manifest)
        return batch

    def finish(self, logits: np.ndarray | None = None, probabilities: np.ndarray | None = None) -> bytes:
        """The answer; without outputs when no image could be read (the model had nothing to see)."""
        manifest = self.served.model.manifest
        rows = outputs.rows_for(self.items, self.good, probabilities, manifest, with_probabilities=True)
        results = [with_seen_image(row, item) if self.with_image else row for row, item in zip(rows, self.items)]
        if self.good:
            return orjson.dumps({"results": results})
        error = results[0]["error"] if len(results) == 1 else f"none of the {len(results)} images could be read"
        return orjson.dumps({"error": error, "results": results})


def uploaded_items(body: bytes, content_type: str, framing: Framing, max_pixels: int) -> list:
    uploads = [part for part in parse_form(body, content_type, max_parts=2 * MAX_IMAGES) if part.name == "file"]
    if not uploads:
        raise BadRequest("no field named 'file' in the form", 422)
    if len(uploads) > MAX_IMAGES:
        raise BadRequest(f"{len(uploads)} images; at most {MAX_IMAGES} per request", 413)
    items = []
    for i, part in enumerate(uploads):
        if part.filename is None:
            items.append(Item(i, f"file#{i}", error="the 'file' field must be a file, not text"))
        else:
            items.append(image_item(i, part.filename or f"file#{i}", part.data, framing, max_pixels))
    return items


def json_items(body: bytes, framing: Framing) -> list:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", 422) from None
    images = parsed.get("images") if isinstance(parsed, dict) else None
    if not isinstance(images, list) or not images:
        raise BadRequest("expected {\"images\": [one or more 28x28 arrays]}", 422)
    if len(images) > MAX_IMAGES:
        raise BadRequest(f"{len(images)} images; at most {MAX_IMAGES} per request", 413)
    return [array_item(i, f"images[{i}]", values, framing) for i, values in enumerate(images)]


def with_seen_image(row: dict, item) -> dict:
    """The row plus the image the model saw: 28x28 integers 0-255, white digit on black."""
    seen = None if item.error else np.clip(np.rint(item.pixels), 0, 255).astype(np.uint8).tolist()
    return {**row, "image": seen}


def describe(served: Served, batcher) -> dict:
    manifest, options = served.model.manifest, served.options
    accuracy = manifest.get("pytorch_test_accuracy")
    if options.model == manifest.get("artifacts", {}).get("int8"):
        accuracy = manifest.get("int8", {}).get("accuracy", accuracy)
    return {"model": options.model, "runtime": served.model.description, "input": manifest["input"],
            "output": manifest["output"], "classes": manifest["classes"], "test_accuracy": accuracy,
            "temperature": manifest_lib.temperature(manifest),
            "sha256": {name: entry["sha256"] for name, entry in manifest["files"].items()},
            "batching": {"on": options.batching, "max_batch": options.max_batch, "max_wait_ms": options.max_wait_ms,
                         "max_queue": options.max_queue, "model_threads": len(batcher.threads),
                         "model_runs": batcher.batches},
            "max_body_bytes": options.max_body, "max_pixels": options.max_pixels}


# --- /v2: the Open Inference Protocol ------------------------------------------------------------------------------

def add_v2_routes(app: FastAPI, model_name: str) -> None:
    def readiness(request: Request) -> Response:
        ready = request.app.state.lifecycle.ready(request.app.state.batcher)
        return Response(status_code=200 if ready else 400)  # the spec: 200 is true, a 4xx false; no body

    @app.get("/v2", summary="Server metadata")
    async def server_metadata():
        return oip.server_metadata(__version__)

    @app.get("/v2/health/live", summary="Liveness (200: live)")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", summary="Readiness (200: ready; 400: loading, draining or failed)")
    async def ready(request: Request):
        return readiness(request)

    @app.get("/v2/models/{name}", summary="Model metadata", openapi_extra=openapi.model_path(model_name))
    @app.get("/v2/models/{name}/versions/{version}", include_in_schema=False)
    async def model_metadata(request: Request):
        known_model(request, model_name)
        served = request.app.state.served
        return oip.model_metadata(model_name, served.model.manifest, f"onnxruntime_onnx ({served.model.description})")

    @app.get("/v2/models/{name}/ready", summary="Model readiness", openapi_extra=openapi.model_path(model_name))
    @app.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def model_ready(request: Request):
        known_model(request, model_name)
        return readiness(request)

