"""/v1: images as users have them (multipart files or JSON arrays), labelled as predict labels them."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import orjson
from fastapi import FastAPI, Request

from ..inference import outputs, predict
from ..inference.inputs import Framing, Item, array_item, image_item
from . import metrics
from .batching import Job
from .errors import BadRequest
from .forms import parse_form
from .front import Answer, Template, answer_of
from .options import INVERT, MAX_IMAGES, TRUE

if TYPE_CHECKING:
    from .model import ServedModel


def busy_routes() -> list:
    """POST /v1/predict, answered ahead of FastAPI (``front.BusyRoutes``)."""

    async def predict_endpoint(request: Request, body: bytes) -> Answer:
        # Most requests have no query string: not parsing an empty one saves the event loop a few microseconds.
        query = request.query_params if request.scope["query_string"] else {}
        return await answer(request, chosen_model(request, query), body, query.get("invert", "auto"),
                            query.get("return_image", "").lower() in TRUE)

    return [(re.compile(r"/v1/predict"), Template("/v1/predict"), predict_endpoint)]


def chosen_model(request: Request, query) -> ServedModel:
    """The version that answers: ?model=NAME (and &version=V), else the server's default model's newest."""
    repository = request.app.state.repository
    if "model" in query:
        return repository.resolve(query["model"], query.get("version"))
    return repository.default()


def add_v1_routes(app: FastAPI) -> None:
    @app.get("/v1/model", summary="The model: name, version, input contract, classes, test accuracy, hashes, "
                                  "runtime")
    async def model_info(request: Request):
        return chosen_model(request, request.query_params).describe()


async def answer(request: Request, model: ServedModel, body: bytes, invert: str, with_image: bool) -> Answer:
    """Read the images, label them through the batcher, and answer in request order."""
    if invert not in INVERT:
        raise BadRequest(f"invert must be one of {', '.join(INVERT)}", 422)
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise BadRequest("send multipart/form-data with fields named 'file', or application/json "
                         "{\"images\": [...]}", 415)
    job = PredictJob(body, content_type, kind, model, model.framing(invert), with_image)
    payload = await answer_of(request, model, job)
    metrics.images("labelled", model.name, model.version).inc(len(job.good))
    if len(job.items) > len(job.good):
        metrics.images("failed", model.name, model.version).inc(len(job.items) - len(job.good))
    if not job.good:  # nothing could be read: the request itself is bad
        return Answer(payload, status=422 if kind == "application/json" else 400)
    return Answer(payload)


class PredictJob(Job):
    """A /v1 request: its images read, decoded and made MNIST-like, labelled, and its answer written, all on the
    batcher's thread."""

    def __init__(self, body: bytes, content_type: str, kind: str, model: ServedModel, framing: Framing,
                 with_image: bool):
        self.body, self.content_type, self.kind, self.model = body, content_type, kind, model
        self.framing, self.with_image = framing, with_image
        self.items: list = []
        self.good: list = []

    def prepare(self) -> np.ndarray:
        if self.kind == "multipart/form-data":
            self.items = uploaded_items(self.body, self.content_type, self.framing, self.model.options.max_pixels)
        else:
            self.items = json_items(self.body, self.framing)
        self.good, batch = predict.model_batch(self.items, self.model.manifest)
        return batch

    def finish(self, logits: np.ndarray | None = None, probabilities: np.ndarray | None = None) -> bytes:
        """The answer; without outputs when no image could be read (the model had nothing to see)."""
        manifest = self.model.manifest
        rows = outputs.rows_for(self.items, self.good, probabilities, manifest, with_probabilities=True)
        results = [with_seen_image(row, item) if self.with_image else row for row, item in zip(rows, self.items)]
        answered_by = {"model_name": self.model.name, "model_version": self.model.version}
        if self.good:
            return orjson.dumps({**answered_by, "results": results})
        error = results[0]["error"] if len(results) == 1 else f"none of the {len(results)} images could be read"
        return orjson.dumps({"error": error, **answered_by, "results": results})


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
