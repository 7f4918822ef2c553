"""A lease on an output in an object store: one run at a time writes it, with no lock server.

Object stores have no flock, but S3 (and stores that follow it) take conditional writes: a PUT with
``If-None-Match: *`` creates an object only if there is none, and one with ``If-Match: <ETag>`` replaces it only
if nobody replaced it since. A run first creates a lease object beside its output that way, naming its holder,
and renews it (a conditional write too) while it works. A second run finds the lease and is refused. A lease
whose renewals stopped (its holder was killed) for longer than its time to live may be taken over by
``--resume``, with a conditional write, so that of two runs taking it over at once exactly one wins; a group
that torchrun restarted takes over its own dead attempt's lease at once. The lease is removed when the job ends,
by a signal too.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import suppress
from datetime import datetime, timezone

from ..errors import UserError
from ..interrupt import under_launcher
from ..launch import restart_count
from ..locks import describe_holder
from .storage import Place, describe_error

LEASED_PROTOCOLS = ("s3", "s3a")  # stores whose file system here makes conditional writes
TTL_S = 60.0  # a lease not renewed for this long is stale
RENEWALS_PER_TTL = 4


def leasable(place: Place) -> bool:
    protocols = place.fs.protocol if isinstance(place.fs.protocol, tuple) else (place.fs.protocol,)
    return not place.is_local and any(p in LEASED_PROTOCOLS for p in protocols)


def launch_identity() -> str:
    """The launcher that started this process, which a restarted attempt shares with the one that died."""
    return f"{socket.gethostname()}:{os.getppid()}" if under_launcher() else ""


class Lease:
    """Held by the main process from before the first write beside ``out`` until the job ends."""

    def __init__(self, out: Place, what: str, ttl_s: float = TTL_S):
        self.place = out.sibling(f".{out.basename}.lease")
        self.what, self.ttl_s = what, ttl_s
        self.etag: str | None = None
        self.lost = ""  # why the lease is no longer ours, if a renewal found it taken over
        self.stopping = threading.Event()
        self.renewer = threading.Thread(target=self.renew_forever, daemon=True, name="lease-renewal")
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "launch": launch_identity()}

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def body(self) -> bytes:
        return (json.dumps({**self.holder, "ttl_s": self.ttl_s}) + "\n").encode()

    def acquire(self, resume: bool) -> None:
        """Create the lease, or take over a stale one (``resume``) or the one of this job's own dead attempt;
        otherwise a UserError naming the holder."""
        try:
            self.put(mode="create")
        except FileExistsError:
            self.take_over(resume)
        self.renewer.start()

    def take_over(self, resume: bool) -> None:
        current, etag, age = self.read()
        if current is None:  # released between the two looks
            self.put(mode="create")
            return
        restarted_here = restart_count() > 0 and current.get("launch") and current["launch"] == self.holder["launch"]
        stale = age > current.get("ttl_s", self.ttl_s)
        if not (restarted_here or (resume and stale)):
            raise UserError(self.refusal(current, age, stale))
        try:
            self.put(IfMatch=etag)
        except OSError:  # renewed or taken by another run since we read it
            current, _, age = self.read()
            raise UserError(self.refusal(current or {}, age, stale=False)) from None

    def refusal(self, holder: dict, age: float, stale: bool) -> str:
        who = describe_holder(holder)
        if stale:
            hint = "its holder stopped renewing it: continue with --resume to take it over"
        else:
            hint = (f"wait for it to end; if it died, --resume takes its lease over once it has not been renewed "
                    f"for {holder.get('ttl_s', self.ttl_s):g} s")
        return f"{self.what} is in use by another run ({who}; lease renewed {age:.0f} s ago); {hint}"

    def read(self) -> tuple:
        """(the holder, the lease's ETag, seconds since it was last written by the store's clock), or (None, ...)
        if there is no lease."""
        fs = self.place.fs
        try:
            info = fs.info(self.place.path, refresh=True)
            holder = json.loads(fs.cat_file(self.place.path))
        except FileNotFoundError:
            return None, None, 0.0
        except ValueError:  # a lease being written: treat as held, and fresh
            return {}, None, 0.0
        written = info.get("LastModified")
        age = (datetime.now(timezone.utc) - written).total_seconds() if isinstance(written, datetime) else 0.0
        return holder, info.get("ETag"), age

    def put(self, **condition) -> None:
        response = self.place.fs.pipe_file(self.place.path, self.body(), **condition)
        etag = response.get("ETag") if isinstance(response, dict) else None
        self.etag = etag or self.place.fs.info(self.place.path, refresh=True).get("ETag")

    def renew_forever(self) -> None:
        while not self.stopping.wait(self.ttl_s / RENEWALS_PER_TTL):
            try:
                self.put(IfMatch=self.etag)
            except OSError as e:
                current, _, _ = self.read()
                if current is not None and current.get("pid") == self.holder["pid"] \
                        and current.get("host") == self.holder["host"]:
                    continue  # the store failed this once; the lease is still ours
                self.lost = (f"the lease on {self.what} was taken over by another run "
                             f"({describe_holder(current or {})}): {describe_error(e)}")
                return

    def check(self) -> None:
        """Refuse to commit the output if another run took the lease over while this one worked."""
        if self.lost:
            raise UserError(f"{self.lost}; this run stops without writing {self.what}")

    def release(self) -> None:
        self.stopping.set()
        if self.renewer.is_alive():
            self.renewer.join()
        if self.etag is None or self.lost:
            return
        current, etag, _ = self.read()
        if current is not None and etag == self.etag:
            with suppress(OSError):  # left behind, it goes stale by itself
                self.place.fs.rm_file(self.place.path)
        self.etag = None
