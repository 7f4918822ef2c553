"""Plain ASGI middleware around the app: what every request gets, whichever route answers it.

``Observed``: an ``X-Request-ID`` (the client's, or a new one) on the answer,
the request in the Prometheus metrics, one JSON access-log line, and
``Connection: close`` once the server drains. ``BodyLimit``: bodies over the
limit are refused with 413 before they are read whole.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import time

from fastapi.responses import JSONResponse

from . import metrics

REQUEST_ID = re.compile(rb"[\w.:/=+-]{1,128}")  # what may be echoed back: no header injection, bounded
# New request IDs: this process's random prefix and a counter. Unique across workers and restarts, and cheap:
# uuid4 reads os.urandom each time, which measured 50 us a call here, a tenth of a request's whole cost.
ID_PREFIX = os.urandom(8).hex()


class Observed:
    def __init__(self, app, lifecycle, access_log=None) -> None:
        self.app, self.lifecycle, self.access_log = app, lifecycle, access_log
        self.counter = itertools.count(1)
        self.series: dict = {}  # (route, method, status) -> the metrics' labelled children, looked up once

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = self.request_id(scope)
        status = 500  # what the client gets if the app fails before it answers

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id)]
                if self.lifecycle.draining:  # this connection's last answer: the client reconnects elsewhere
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            metrics.IN_FLIGHT.dec()
            seconds = time.perf_counter() - started
            key = (route_of(scope), scope["method"], status)
            series = self.series.get(key) or self.series.setdefault(key, (
                metrics.REQUESTS.labels(key[0], key[1], str(status)), metrics.REQUEST_SECONDS.labels(key[0])))
            series[0].inc()
            series[1].observe(seconds)
            if self.access_log is not None:
                self.log(scope, request_id, status, seconds)

    def request_id(self, scope) -> bytes:
        for name, value in scope["headers"]:
            if name == b"x-request-id" and REQUEST_ID.fullmatch(value):
                return value
        return f"{ID_PREFIX}-{next(self.counter):x}".encode()

    def log(self, scope, request_id: bytes, status: int, seconds: float) -> None:
        client = scope.get("client") or ("", 0)
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "request_id": request_id.decode(),
                "method": scope["method"], "path": scope["path"], "route": route_of(scope), "status": status,
                "duration_ms": round(1e3 * seconds, 3), "client": client[0]}
        self.access_log.write(json.dumps(line) + "\n")


def route_of(scope) -> str:
    """The route's template (/v2/models/{model_name}/infer), not the path: labels stay few whatever is requested."""
    route = scope.get("route")
    if route is not None:
        return route.path
    return "/static" if scope["path"].startswith("/static/") else "other"


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length or, for streamed bodies, by counting."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await JSONResponse({"error": "invalid Content-Length"}, status_code=400)(scope, receive, send)
            if int(declared) > self.max_bytes:
                return await self.too_large(scope, receive, send)
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
                await self.too_large(scope, receive, send)

    async def too_large(self, scope, receive, send) -> None:
        response = JSONResponse({"error": f"the body is over the {self.max_bytes:,}-byte limit"}, status_code=413)
        await response(scope, receive, send)


class BodyTooLarge(Exception):
    pass
