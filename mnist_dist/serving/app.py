"""The HTTP API and the draw-a-digit page, over one shared onnxruntime session.

    POST /v1/predict   images as multipart fields named ``file``, or JSON {"images": [28x28 arrays]}
    GET  /v1/model     the input contract, test accuracy, hashes and runtime
    GET  /healthz      liveness
    GET  /             the page: draw a digit, see what the model reads

Preprocessing and output fields are predict's own (``inference.inputs``,
``inference.predict``). Every error reaches the client as {"error": "one line"}
with a 4xx status (5xx only for the server's own faults); no traceback ever
leaves the process.
"""
from __future__ import annotations

import gc
import io
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import UserError, one_line
from ..inference import outputs, predict
from ..inference.inputs import Framing, Item, array_item, image_item
from ..inference.models import Runner, open_model
from .batching import MicroBatcher, Unbatched

MAX_BODY = 5 * 2**20
MAX_IMAGES = 256  # per request
INLINE_DECODE_BYTES = 16 * 2**10
INVERT = ("auto", "yes", "no")
TRUE = ("1", "true", "yes", "on")


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


@dataclass
class Served:
    """What every request shares: the model (one onnxruntime session), its manifest and how it runs."""

    options: ServeOptions
    model: Runner

    def framing(self, invert: str) -> Framing:
        return predict.framing(self.model.manifest, invert)


def load(options: ServeOptions) -> Served:
    """Load and check the model before the server starts: missing, changed or unreadable files are one UserError."""
    path = Path(options.model_dir) / options.model
    if path.suffix != ".onnx":
        raise UserError(f"--model {options.model}: the server runs ONNX models (model.onnx or model.int8.onnx)")
    # Requests come one image at a time: "auto" chooses for batches of one. The event loop shares the cores with
    # the model: no spinning threads.
    model = open_model(path, options.runtime, options.threads, batch=1, spin=False)
    return Served(options, model)


def create_app(served: Served) -> FastAPI:
    options = served.options

    @asynccontextmanager
    async def lifespan(app):
        if options.batching:
            app.state.batcher = MicroBatcher(served.model.run, options.max_batch, options.max_wait_ms / 1000)
        else:
            app.state.batcher = Unbatched(served.model.run)
        await app.state.batcher.start()
        # Everything loaded so far (torch, onnxruntime, the model) lives until exit: keep it out of the garbage
        # collector's full passes, which otherwise walk all of it and stall every request in flight.
        gc.collect()
        gc.freeze()
        yield
        await app.state.batcher.stop()

    app = FastAPI(title="mnist-dist", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.served = served
    app.add_middleware(BodyLimit, max_bytes=options.max_body)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return JSONResponse({"error": one_line(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse({"error": one_line(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # the server's own fault: say so in one line, keep the traceback here
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_info(request: Request):
        return describe(request.app.state.served, request.app.state.batcher)

    @app.post("/v1/predict")
    async def predict_endpoint(request: Request):
        return await answer(request)

    static = resources.files(__package__) / "static"

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


async def answer(request: Request):
    """Read the images, label them through the batcher, and answer in request order."""
    served = request.app.state.served
    invert = request.query_params.get("invert", "auto")
    if invert not in INVERT:
        raise HTTPException(422, f"invert must be one of {', '.join(INVERT)}")
    framing = served.framing(invert)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        items = await uploaded_items(request, framing)
    elif kind == "application/json":
        items = await json_items(request, framing)
    else:
        raise HTTPException(415, "send multipart/form-data with fields named 'file', or application/json "
                                 "{\"images\": [...]}")
    good, batch = predict.model_batch(items, served.model.manifest)
    logits = await request.app.state.batcher(batch) if good else None
    rows = outputs.rows_for(items, good, logits, served.model.manifest["classes"], probabilities=True)
    with_image = request.query_params.get("return_image", "").lower() in TRUE
    results = [with_seen_image(row, item) if with_image else row for row, item in zip(rows, items)]
    if not good:  # nothing could be read: the request itself is bad
        return JSONResponse({"error": results[0]["error"] if len(results) == 1 else
                             f"none of the {len(results)} images could be read", "results": results},
                            status_code=422 if kind == "application/json" else 400)
    return JSONResponse({"results": results})  # plain JSON types already: no encoder pass needed


def with_seen_image(row: dict, item) -> dict:
    """The row plus the image the model saw: 28x28 integers 0-255, white digit on black."""
    seen = None if item.error else np.clip(np.rint(item.pixels), 0, 255).astype(np.uint8).tolist()
    return {**row, "image": seen}


async def uploaded_items(request: Request, framing: Framing):
    form = await request.form(max_files=MAX_IMAGES, max_fields=MAX_IMAGES)
    uploads = [(key, value) for key, value in form.multi_items() if key == "file"]
    if not uploads:
        raise HTTPException(422, "no field named 'file' in the form")
    items = []
    for i, (_, upload) in enumerate(uploads):
        if isinstance(upload, str):
            items.append(Item(i, f"file#{i}", error="the 'file' field must be a file, not text"))
            continue
        data = await upload.read()
        name = upload.filename or f"file#{i}"
        if len(data) <= INLINE_DECODE_BYTES:  # a small image decodes faster than a hop to a worker thread
            items.append(image_item(i, name, io.BytesIO(data), framing))
        else:  # a photo: decode it off the event loop, so other requests keep flowing
            items.append(await run_in_threadpool(image_item, i, name, io.BytesIO(data), framing))
    return items


async def json_items(request: Request, framing: Framing):
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(422, "the body is not valid JSON") from None
    images = body.get("images") if isinstance(body, dict) else None
    if not isinstance(images, list) or not images:
        raise HTTPException(422, "expected {\"images\": [one or more 28x28 arrays]}")
    if len(images) > MAX_IMAGES:
        raise HTTPException(413, f"at most {MAX_IMAGES} images per request")
    return [array_item(i, f"images[{i}]", values, framing) for i, values in enumerate(images)]


def describe(served: Served, batcher) -> dict:
    manifest, options = served.model.manifest, served.options
    accuracy = manifest.get("pytorch_test_accuracy")
    if options.model == manifest.get("artifacts", {}).get("int8"):
        accuracy = manifest.get("int8", {}).get("accuracy", accuracy)
    return {"model": options.model, "runtime": served.model.description, "input": manifest["input"],
            "output": manifest["output"], "classes": manifest["classes"], "test_accuracy": accuracy,
            "sha256": {name: entry["sha256"] for name, entry in manifest["files"].items()},
            "batching": {"on": options.batching, "max_batch": options.max_batch, "max_wait_ms": options.max_wait_ms,
                         "model_runs": batcher.batches},
            "max_body_bytes": options.max_body}


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length or, for streamed bodies, by counting."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = JSONResponse({"error": f"the body is over the {self.max_bytes:,}-byte limit"}, status_code=413)
        if declared is not None:
            if not declared.isdigit():
                return await JSONResponse({"error": "invalid Content-Length"}, status_code=400)(scope, receive, send)
            if int(declared) > self.max_bytes:
                return await too_large(scope, receive, send)
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await too_large(scope, receive, send)


class BodyTooLarge(Exception):
    pass
