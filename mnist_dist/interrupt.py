"""A job stops cleanly on a signal, and dies with its launcher.

SIGTERM or SIGINT becomes JobInterrupted in the main thread, so that every ``finally`` on the way out runs; a
thread woken by the signal ends a process stuck in C++ after a grace period; under a launcher the kernel ends a
worker whose launcher died.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager, suppress
from typing import NoReturn

from .launch import launched_rank, launched_world_size, under_accelerate_launch

GRACE_S = 1.5  # after a stop signal, the most a process takes to clean up before the kernel ends it
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class JobInterrupted(BaseException):
    """A stop signal arrived. A BaseException, as KeyboardInterrupt is: no ``except Exception`` swallows it, and
    every ``finally`` on the way out runs (temporary files removed, locks released)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def under_launcher() -> bool:
    """Started by `accelerate launch` (one process, or torchrun for several) or another launcher, rather than by
    a shell."""
    return (under_accelerate_launch() or "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
            or launched_world_size() > 1)


def die_with_launcher() -> None:
    """End this process (SIGTERM) when the process that started it dies, even by SIGKILL.

    torchrun starts each worker in a session of its own, so nothing else ties it to the launcher: a killed
    launcher would leave its workers running. On Linux the kernel sends the signal (PR_SET_PDEATHSIG); the
    parent is checked once more after asking, in case it died first. Elsewhere a thread watches the parent.
    """
    parent = os.getppid()
    if not ask_kernel_for_parent_death_signal():
        threading.Thread(target=watch_parent, args=(parent,), daemon=True, name="watch-launcher").start()
    if os.getppid() != parent:  # the launcher died between the two reads: the kernel will send nothing
        os.kill(os.getpid(), signal.SIGTERM)


def ask_kernel_for_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent: int, every_s: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def interruptible(resume_hint: str):
    """Run a job so that SIGTERM or SIGINT (and, under a launcher, the launcher's death) stops it cleanly.

    The signal becomes JobInterrupted in the main thread; the way out removes temporary files and releases
    locks; the main process then says how to resume, and the process exits with 128 + the signal's number.
    A main thread blocked in a collective whose peer is gone runs no Python at all: a thread woken by the
    signal itself ends the process GRACE_S later if it is still there.
    """
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, raise_interrupted) for s in stops}
    previous_wakeup, sockets = arm_deadline()
    try:
        if under_launcher():
            die_with_launcher()
        yield
    except JobInterrupted as stop:
        # The signal may land inside any constructor (tqdm's, say); the half-built object's finaliser then fails
        # when it is freed on the way out, which would print a traceback that says nothing about this stop.
        sys.unraisablehook = ignore_unraisable
        if launched_rank() == 0:
            say(f"Interrupted by {signal.Signals(stop.signum).name}: {resume_hint}")
        raise SystemExit(128 + stop.signum) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(previous_wakeup)
        sockets[0].shutdown(socket.SHUT_RDWR)  # wakes the deadline thread, which then ends
        for sock in sockets:
            sock.close()


def exit_alike(code: int) -> NoReturn:
    """End with ``code``, the verdict every process of the job reached together. A launcher that saw another
    process end first sends the rest a stop signal: it must not turn this process's verdict into a kill."""
    if under_launcher():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
    raise SystemExit(code)


def ignore_unraisable(unraisable) -> None:
    pass


def raise_interrupted(signum, frame):
    for s in (signal.SIGTERM, signal.SIGINT):  # one stop is enough: a second signal must not cut the clean-up short
        signal.signal(s, signal.SIG_IGN)
    raise JobInterrupted(signum)


def arm_deadline() -> tuple:
    """Start a thread that ends the process GRACE_S after a stop signal arrives. Python's C-level handler writes
    the signal's number to the wake-up socket at once, even while the main thread is blocked in C++.
    Returns (the previous wake-up fd, the two sockets to close afterwards)."""
    woken, wake = socket.socketpair()
    wake.setblocking(False)
    previous = signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=deadline, args=(woken,), daemon=True, name="stop-deadline").start()
    return previous, (woken, wake)


def deadline(woken: socket.socket) -> None:
    while True:
        try:
            received = woken.recv(1)
        except OSError:
            return
        if not received:  # shut down: the job is over
            return
        if received[0] in (signal.SIGTERM, signal.SIGINT):
            time.sleep(GRACE_S)
            os._exit(128 + received[0])


def say(text: str) -> None:
    """One line on stderr, which may be a pipe to a launcher that is gone."""
    with suppress(OSError):
        print(text, file=sys.stderr, flush=True)
