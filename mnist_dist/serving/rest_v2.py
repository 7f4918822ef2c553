"""/v2: the Open Inference Protocol's REST routes, over the codec in ``oip``."""
from __future__ import annotations

import re

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from .. import __version__
from . import metrics, oip, openapi
from .batching import Job
from .errors import BadRequest
from .front import Answer, Template, answer_of
from .options import MAX_IMAGES


def busy_routes() -> list:
    """POST .../infer, answered ahead of FastAPI (``front.BusyRoutes``)."""

    async def infer(request: Request, body: bytes) -> Answer:
        model = requested_model(request)
        job = InferJob(body, request.headers.get("inference-header-content-length"), model.manifest, model.name,
                       model.version)
        payload, header_size = await answer_of(request, model, job)
        assert job.request is not None  # prepared, since it was answered
        metrics.images("labelled", model.name, model.version).inc(len(job.request.images))
        if header_size is None:
            return Answer(payload)
        return Answer(payload, b"application/octet-stream",
                      headers=((b"inference-header-content-length", str(header_size).encode()),))

    return [(re.compile(r"/v2/models/(?P<name>[^/]+)/infer"), Template("/v2/models/{name}/infer"), infer),
            (re.compile(r"/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/infer"),
             Template("/v2/models/{name}/versions/{version}/infer"), infer)]


def requested_model(request: Request):
    """The model version a /v2/models/{name}[/versions/{version}] path asks for; 404 if none is loaded."""
    return request.app.state.repository.resolve(request.path_params["name"], request.path_params.get("version"))


def add_v2_routes(app: FastAPI) -> None:
    names = list(app.state.repository.loaded)
    unversioned, versioned = openapi.model_path(names), openapi.version_path(names)

    @app.get("/v2", summary="Server metadata")
    async def server_metadata():
        return oip.server_metadata(__version__)

    @app.get("/v2/health/live", summary="Liveness (200: live)")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", summary="Readiness (200: every model loaded; 400: loading, draining or failed)")
    async def ready(request: Request):
        state = request.app.state
        return readiness(state.lifecycle.ready() and state.repository.ready())

    @app.get("/v2/models/{name}", summary="Model metadata (its newest version)", openapi_extra=unversioned)
    @app.get("/v2/models/{name}/versions/{version}", summary="Model metadata (one version)",
             openapi_extra=versioned)
    async def model_metadata(request: Request):
        model = requested_model(request)
        return oip.model_metadata(model.name, request.app.state.repository.versions(model.name), model.manifest,
                                  model.platform)

    @app.get("/v2/models/{name}/ready", summary="Model readiness", openapi_extra=unversioned)
    @app.get("/v2/models/{name}/versions/{version}/ready", summary="Model version readiness",
             openapi_extra=versioned)
    async def model_ready(request: Request):
        try:
            model = requested_model(request)
        except BadRequest:  # not loaded: not ready, which is an answer, not an error
            return readiness(False)
        return readiness(model.running and request.app.state.lifecycle.ready())


def readiness(ready: bool) -> Response:
    return Response(status_code=200 if ready else 400)  # the spec: 200 is true, a 4xx false; no body


class InferJob(Job):
    """An Open Inference Protocol request: parsed and answered on the batcher's thread."""

    def __init__(self, body: bytes, header_length: str | None, manifest: dict, model_name: str, version: str):
        self.body, self.header_length, self.manifest = body, header_length, manifest
        self.model_name, self.version = model_name, version
        self.request: oip.InferRequest | None = None

    def prepare(self) -> np.ndarray:
        self.request = oip.parse_infer(self.body, self.header_length, self.manifest, MAX_IMAGES)
        return self.request.images

    def finish(self, logits: np.ndarray, probabilities: np.ndarray) -> tuple:
        assert self.request is not None
        return oip.encode_infer(self.model_name, self.version, self.request, logits, probabilities)

