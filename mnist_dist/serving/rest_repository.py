"""Triton's model repository extension: the index, and loads and unloads on request (``--model-control-mode
explicit``), optionally only for callers presenting a key (Triton's ``--http-restricted-api``).

    POST /v2/repository/index                  [{"name", "version", "state": READY|UNAVAILABLE, "reason"}]
    POST /v2/repository/models/{name}/load     load or reload: the policy's versions, switched in when all are warm
    POST /v2/repository/models/{name}/unload   every version, once each has answered the requests it took

A load that fails is a 400 with the reason, and what was serving goes on
serving. Inference stays open to everyone; only these routes are guarded.
"""
from __future__ import annotations

import asyncio
import hmac
from contextlib import contextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..errors import UserError
from .errors import BadRequest


def add_repository_routes(app: FastAPI) -> None:
    @app.post("/v2/repository/index", summary="The repository's models and versions, and which are loaded")
    async def index(request: Request):
        check_key(request)
        body = await request.body()
        ready_only = bool(body.strip()) and parsed(body).get("ready") is True
        with repository_errors():
            entries = await asyncio.to_thread(request.app.state.repository.index)
        return JSONResponse([e for e in entries if e["state"] == "READY" or not ready_only])

    @app.post("/v2/repository/models/{name}/load", summary="Load or reload a model (--model-control-mode explicit)")
    async def load(request: Request, name: str):
        return await controlled(request, request.app.state.repository.load, name)

    @app.post("/v2/repository/models/{name}/unload", summary="Unload a model (--model-control-mode explicit)")
    async def unload(request: Request, name: str):
        return await controlled(request, request.app.state.repository.unload, name)


async def controlled(request: Request, action, name: str) -> JSONResponse:
    """A load or an unload: allowed, its body read (its parameters are Triton's and change nothing here), done."""
    check_explicit(request)
    parsed(await request.body())
    with repository_errors():
        await action(name)
    return JSONResponse({})


@contextmanager
def repository_errors():
    """The repository cannot be read now (a store unreachable, a folder gone): the caller's 400, in one line."""
    try:
        yield
    except UserError as e:
        raise BadRequest(str(e), 400) from None


def check_key(request: Request) -> None:
    """403 unless the caller presents the key the repository API is restricted to (when it is)."""
    key = request.app.state.repository.options.restricted_key
    if key is None:
        return
    header, value = key
    if not hmac.compare_digest(request.headers.get(header, "").encode(), value.encode()):
        raise BadRequest(f"this API is restricted: the request must carry the header {header!r} with its key", 403)


def check_explicit(request: Request) -> None:
    check_key(request)
    mode = request.app.state.repository.options.control_mode
    if mode != "explicit":
        raise BadRequest(f"explicit model load and unload need --model-control-mode explicit (this server runs "
                         f"{mode})", 400)


def parsed(body: bytes) -> dict:
    """The request's JSON object (an empty body is an empty object), as Triton's client sends it."""
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the request is not valid JSON", 400) from None
    if not isinstance(value, dict):
        raise BadRequest("the request must be a JSON object", 400)
    return value
