"""The front of the app: plain ASGI ahead of FastAPI for the routes that carry images, and how every error and
every batcher refusal reaches a client as one line."""
from __future__ import annotations

import asyncio
from typing import Callable, NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..errors import one_line
from . import metrics, openapi
from .batching import Job, Overloaded, Unavailable
from .errors import BadRequest
from .options import RETRY_AFTER_S


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


async def answer_of(request: Request, model, job: Job):
    """The job's answer from the model version's batcher, or 503 (too busy: try again) or 504 (waited too long).
    The job's own errors (BadRequest) reach the error handlers as they are."""
    options = model.options
    try:
        return await model.predict(job, timeout=options.timeout_s or None)
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

    def __init__(self, app: Fronted, routes: list) -> None:
        self.app, self.routes = app, routes  # [(path pattern, its Template, endpoint(request, body) -> Answer)]

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


def document_busy_routes(app: FastAPI) -> None:
    def schema() -> dict:
        if app.openapi_schema is None:
            described = get_openapi(title=app.title, version=app.version, routes=app.routes)
            described["paths"].update(openapi.busy_paths(list(app.state.repository.loaded)))
            app.openapi_schema = described
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]

