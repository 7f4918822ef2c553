"""Readiness and draining: what Kubernetes (or any load balancer) needs to move traffic away without losing any.

Ready: every model is loaded and warmed up, their batchers run, and no drain
has begun. On SIGTERM or SIGINT the server drains: not ready at once; for a short
grace it still picks up what clients had already sent (requests waiting in
the kernel's queues); then it stops listening, answers every request it has
taken (each answer with ``Connection: close``), and exits 0, at most
``drain_s`` after the signal.
"""
from __future__ import annotations

import asyncio
import gc
import signal
import sys
import time

GRACE_S = 0.25  # long enough for the event loop to read what is already in the socket queues
# Measured at 32 clients, alternated side by side: on the AVX2 EPYC 1 ms answered 15% more requests than 5 ms and
# 0.2-3 ms about the same; on the Zen 5 EPYC (OIP binary, two model threads) 0.2 ms answered 1.21x the requests of
# 1 ms, and 0.1 ms 1.03x those of 0.2 ms in a second run (0.05 ms 1.06x: within noise).
SWITCH_INTERVAL_S = 0.0001


class Lifecycle:
    def __init__(self, drain_s: float):
        self.drain_s = drain_s
        self.warmed = False
        self.draining = False
        self.drain_started = 0.0

    def ready(self) -> bool:
        """The process's part of readiness (the models' part is the repository's)."""
        return self.warmed and not self.draining

    def drain_on_signals(self, log) -> None:
        """Take over SIGTERM and SIGINT from uvicorn, which would stop listening and drop idle-looking connections at
        once, and raise the signal again on exit (a non-zero status). Outside uvicorn's main thread (tests), a no-op.
        """
        server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)  # uvicorn.Server.handle_exit
        if server is None or not hasattr(server, "should_exit"):
            return
        loop = asyncio.get_running_loop()

        def on_signal(signum, frame):
            if self.draining:  # a second signal (Ctrl-C twice, or the supervisor after the terminal): the deadline
                # holds
                return
            self.draining, self.drain_started = True, time.monotonic()
            log(f"Draining: not ready, answering the requests taken, exiting within {self.drain_s:g} s")
            loop.call_soon_threadsafe(loop.call_later, min(GRACE_S, self.drain_s), stop_listening)

        def stop_listening():
            server.config.timeout_graceful_shutdown = max(0.0, self.drain_s - (time.monotonic() - self.drain_started))
            server.should_exit = True

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)


def settle_process() -> None:
    """Process-wide settings of a server process, once it has started and loaded its models: made by the server
    (``create_app(..., process_wide=True)``), never by an app made in someone else's process."""
    # Everything loaded so far (onnxruntime, the models, uvicorn, the app) mostly lives until exit: keep it out of the
    # garbage collector's full passes, which otherwise walk all of it and stall every request in flight.
    gc.collect()
    gc.freeze()
    # A model thread, back from a run, waits for the GIL until the event loop lets go of it, at most a switch
    # interval (5 ms by default) while the loop is busy with a burst of requests; the model waits with it.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
