"""One run per folder: an exclusive lock that a job holds on its output for its whole life.

The lock is the kernel's ``flock`` on a small file: the kernel releases it when the
process dies, however it dies, so a stale file never blocks the next run. The file
holds who took it (pid, host, start time), for the message that refuses a second run.
It guards local file systems and NFS mounts that honour flock; it cannot guard a file
system that ignores flock, nor an object store.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

RUN_LOCK = ".mnist-dist.lock"  # in a training --output-dir, held by the run writing there

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not guarded
    fcntl = None  # type: ignore[assignment]


@contextmanager
def exclusive(path, what: str):
    """Hold an exclusive lock on ``path`` (created if needed) for the block; a UserError naming the holder if
    another process holds it. ``what`` names the place for the message (say "--output-dir runs/mnist")."""
    if fcntl is None:
        yield
        return
    path = Path(path)
    made = [folder for folder in path.parents if not folder.exists()]  # to leave the place as it was found
    handle = acquire(path, what)
    try:
        yield
    finally:
        # Unlink while still holding the lock: a process that opened the old file then finds it gone (below).
        path.unlink(missing_ok=True)
        handle.close()
        for folder in made:
            try:
                folder.rmdir()  # only while empty: a run that wrote nothing leaves no folder behind
            except OSError:
                break


def check_free(path, what: str) -> None:
    """Refuse at once, with the holder's name, if a run holds ``path``; hold nothing. Any number of processes may
    look at the same moment (a shared lock, taken and let go), and a held exclusive lock refuses every one."""
    path = Path(path)
    if fcntl is None or not path.exists():
        return
    try:
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(busy(what, handle.read())) from None
    except FileNotFoundError:  # let go of between the two looks
        pass


def busy(what: str, holder: str) -> str:
    return f"{what} is in use by another run ({describe(holder)}); wait for it to end, or choose another place"


def acquire(path: Path, what: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+")  # noqa: SIM115 - held open for the job's life, closed by exclusive()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read()
            handle.close()
            raise UserError(busy(what, holder)) from None
        if same_file(handle, path):
            break
        handle.close()  # the holder we waited for removed the file as it let go: lock the new one
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
    handle.flush()
    return handle


def same_file(handle, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def describe(holder: str) -> str:
    try:
        return describe_holder(json.loads(holder))
    except ValueError:  # the holder had not written itself yet
        return "its holder is starting"


def describe_holder(who: dict) -> str:
    try:
        return f"pid {who['pid']} on {who['host']}, started {who['started']}"
    except (KeyError, TypeError):  # the holder had not written itself yet
        return "its holder is starting"
