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


def busy_routes(model_name: str) -> list:
    """POST .../infer, answered ahead of FastAPI (``front.BusyRoutes``)."""

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

    return [(re.compile(r"/v2/models/(?P<name>[^/]+)/infer"), Template("/v2/models/{name}/infer"), infer),
            (re.compile(r"/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/infer"),
             Template("/v2/models/{name}/versions/{version}/infer"), infer)]


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

