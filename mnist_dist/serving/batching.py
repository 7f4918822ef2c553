"""Micro-batching on model threads, with a bounded queue: requests that arrive together share one model run.

A request hands the batcher a ``Job``: its raw body and what to make of it.
The event loop only moves bytes; a model thread does everything else for every
job waiting at once: ``prepare`` (parse the JSON, decode the images: never on
the event loop), then one model run for up to ``max_batch`` images (``run``:
the batch in, a tuple of outputs out, one row per image each, so that work on
the outputs is done once a batch too), then ``finish`` (the answer's bytes,
from the job's rows of each output), and hands all the answers back to the
loop in one call. One thread hop per batch, not two per request: at one
request at a time that is what running each request on its own costs, and
under load it is a fraction of it. With ``threads`` > 1, each model thread
takes whatever is waiting when it is free, so one prepares and answers (which
holds the GIL) while another is in the model (which releases it); they take
turns at Python, never interleave it.

If the batch still holds fewer than ``max_batch`` images the thread waits up
to ``max_wait`` seconds for more; alone, a request waits at most that.

Backpressure: at most ``max_queue`` images wait for the model. A request
that arrives when the requests not yet prepared and the images prepared
and not yet taken by a model thread reach it is refused at once, before its
body is decoded (``Overloaded``: the server answers 503 with Retry-After);
images prepared past the bound are refused too, instead of joining a queue
that only grows; a request larger than the bound is taken only first in
line. A request that waits longer than its time-out is dropped
(``asyncio.TimeoutError``: 504) and costs no model time if it has not run
yet.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from typing import Any, Callable

import numpy as np


class Overloaded(Exception):
    """The queue is full: try again shortly."""


class Unavailable(Exception):
    """The batcher is not running (stopped, or failed): the model cannot answer."""


class NoStats:
    """Where a batcher reports what it does; the server's metrics replace it."""

    def batch(self, images: int, run_s: float) -> None:
        pass

    def waited(self, seconds: float) -> None:
        pass


class Job:
    """One request's work. ``prepare`` and ``finish`` run on the batcher's thread; either may raise an exception
    meant for the client (it reaches the request's handler as it is).

    ``finish(*outputs)``: the answer, from this request's rows of each of the model's outputs, in the order ``run``
    returns them (no outputs at all when ``prepare`` gave no image). Each job names the outputs it takes.
    """

    finish: Callable[..., Any]

    def prepare(self) -> np.ndarray:
        """The model's input batch for this request, [k, ...] (k may be 0: nothing to run)."""
        raise NotImplementedError


class Pending:
    """A job on its way through the batcher, and the future its handler waits on."""

    __slots__ = ("future", "images", "job", "queued_at", "result")

    def __init__(self, job: Job, future: asyncio.Future):
        self.job, self.future, self.queued_at = job, future, time.perf_counter()
        self.images: np.ndarray | None = None
        self.result: tuple = (None, None)  # (answer, exception)


class Doorbell:
    """Wakes one idle model thread per ring (Condition.notify(1)). threading.Event wakes every thread waiting on it:
    at one request at a time the other model thread woke for nothing, which cost more CPU than the request itself
    (measured: 1,650 us against 1,320 a request with one model thread)."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.idle = 0  # threads waiting now

    def ring(self) -> None:
        with self.condition:
            self.condition.notify(1)

    def ring_all(self) -> None:
        with self.condition:
            self.condition.notify_all()

    def wait(self, ready, timeout: float | None = None) -> None:
        """Wait for a ring (or ``timeout``), unless ``ready()`` already: checked under the condition's lock, which
        a ring needs, so that work that came just before is not slept through."""
        with self.condition:
            if ready():
                return
            self.idle += 1
            try:
                self.condition.wait(timeout)
            finally:
                self.idle -= 1


class MicroBatcher:
    def __init__(self, run, max_batch: int = 64, max_wait: float = 0.0, max_queue: int | None = None,
                 stats=None, threads: int = 1):
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait, max_queue
        self.stats = stats or NoStats()
        self.waiting: collections.deque = collections.deque()
        self.unanswered: set = set()  # the futures of every request handed in and not yet answered: the loop's own
        self.doorbell = Doorbell()
        self.threads = [threading.Thread(target=self.serve_forever, name=f"batcher-{i}", daemon=True)
                        for i in range(threads)]
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0  # model runs so far, for /v1/model
        # Admitted groups no model thread has taken yet, and their images: the model threads' own, under the lock.
        self.ready: collections.deque = collections.deque()
        self.queued = 0
        self.lock = threading.Lock()
        # Held by a model thread while it runs Python (preparing and finishing jobs), not while it runs the model.
        # Two threads that interleave Python hand the GIL to each other at every numpy or Pillow call that releases
        # it: measured at 32 clients, 20 times the futex calls and 30% more CPU a request than one thread.
        self.python = threading.Lock()

    @property
    def running(self) -> bool:
        # Asked on every request: a flag, not the threads' liveness (a lock each), which it already tells, since
        # a model thread that exits for any reason sets it and so stops them all (serve_forever).
        return self.loop is not None and not self.stopping

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for thread in self.threads:
            thread.start()

    async def stop(self) -> None:
        self.stopping = True
        self.doorbell.ring_all()
        for thread in self.threads:
            if thread.is_alive():
                await asyncio.to_thread(thread.join)

    async def __call__(self, job: Job, timeout: float | None = None):
        """The job's answer, once its images have been through the model with whatever else was waiting."""
        if not self.running:
            raise Unavailable("the model is not running")
        # Refused before anything is decoded, and the raw bodies waiting are bounded too: each holds one image or
        # more. (The images of prepared requests are counted again when they are admitted.)
        if self.max_queue and len(self.waiting) + self.queued >= self.max_queue:
            raise Overloaded(f"more than {self.max_queue} images are waiting for the model")
        assert self.loop is not None
        pending = Pending(job, self.loop.create_future())
        self.unanswered.add(pending.future)
        self.waiting.append(pending)  # deque appends and pops are atomic: the thread takes from the other end
        self.doorbell.ring()
        # A timer on the future itself: asyncio.wait_for would make a task for every request.
        expiry = None if timeout is None else self.loop.call_later(timeout, expire, pending.future)
        try:
            return await pending.future
        finally:
            self.unanswered.discard(pending.future)
            if expiry is not None:
                expiry.cancel()

    # --- on the model threads -----------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        try:
            while not self.stopping:
                self.doorbell.wait(lambda: bool(self.waiting or self.ready or self.stopping))
                while (self.waiting or self.ready) and not self.stopping:
                    if self.waiting:
                        self.admit(self.next_batch())
                    self.run_next_group()
        finally:  # stopped (or broken): nobody may wait for an answer that cannot come
            self.stopping = True
            self.doorbell.ring_all()  # the other model threads stop too
            # Every request not yet answered, wherever it is (waiting, queued, or in a thread that failed while
            # holding it), is answered at once rather than at its time-out.
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.fail_unanswered)

    def fail_unanswered(self) -> None:
        """On the event loop: the model stopped; every request still waiting for it hears so."""
        for future in list(self.unanswered):
            if not future.done():
                future.set_exception(Unavailable("the model stopped"))

    def take_all(self) -> list:
        """Every job waiting now. Each pop is atomic, but another model thread may take the last job between a
        check and a pop: popping until the deque says it is empty is the only safe test (a check first once
        killed a model thread, and with it the server, under load)."""
        taken = []
        with contextlib.suppress(IndexError):
            while True:
                taken.append(self.waiting.popleft())
        return taken

    def next_batch(self) -> list:
        """Every job waiting, prepared; more, for up to ``max_wait``, while fewer than ``max_batch`` images."""
        batch = self.prepare_all(self.take_all())
        deadline = time.perf_counter() + self.max_wait
        while self.max_wait and images_in(batch) < self.max_batch and time.perf_counter() < deadline:
            self.doorbell.wait(lambda: bool(self.waiting or self.stopping), deadline - time.perf_counter())
            batch += self.prepare_all(self.take_all())
        return batch

    def prepare_all(self, pendings: list) -> list:
        with self.python:
            return [self.prepared(p) for p in pendings]

    def prepared(self, pending: Pending) -> Pending:
        self.stats.waited(time.perf_counter() - pending.queued_at)
        if pending.future.done():  # timed out, or the client went away: not worth anything more
            return pending
        try:
            images = pending.job.prepare()
        except Exception as e:  # the client's mistake, or an image that cannot be read: this request's alone
            pending.result = (None, e)
            return pending
        if len(images):
            pending.images = images
        else:  # nothing the model needs to see (no image could be read): answered at once
            pending.result = finished(pending, ())
        return pending

    def admit(self, batch: list) -> None:
        """Queue prepared jobs for the model, ``max_batch`` images a group, while at most ``max_queue`` images wait;
        refusals and requests that could not be read are answered at once."""
        runnable, answered = [], []
        with self.lock:
            for pending in batch:
                if pending.images is None:  # answered already, or no longer wanted
                    answered.append(pending)
                elif self.max_queue and self.queued and self.queued + len(pending.images) > self.max_queue:
                    pending.result = (None, Overloaded(f"more than {self.max_queue} images are waiting for the "
                                                       "model"))
                    answered.append(pending)
                else:
                    self.queued += len(pending.images)
                    runnable.append(pending)
            groups = groups_of(runnable, self.max_batch)
            self.ready.extend(groups)
        self.deliver(answered)
        if len(groups) > 1:  # more than this thread takes next: another model thread may run one meanwhile
            self.doorbell.ring()

    def run_next_group(self) -> None:
        with self.lock:
            if not self.ready:  # another model thread took it
                return
            group = self.ready.popleft()
            self.queued -= images_in(group)
        # Requests that timed out, or whose clients left, while they waited: no model time for them.
        group = [p for p in group if not p.future.done()]
        if group:
            self.run_group(group)
            self.deliver(group)

    def run_group(self, group: list) -> None:
        started = time.perf_counter()
        batch = np.concatenate([p.images for p in group])
        try:
            outputs = self.run(batch)
        except Exception as e:  # the model's failure is every waiting request's failure, not the server's
            for p in group:
                p.result = (None, e)
            return
        with self.lock:
            self.batches += 1
        self.stats.batch(len(batch), time.perf_counter() - started)
        start = 0
        with self.python:
            for p in group:
                end = start + len(p.images)
                p.result = finished(p, tuple(output[start:end] for output in outputs))
                start = end

    def deliver(self, answered: list) -> None:
        """Hand the answers to the event loop together: one wake-up of the loop for all of them."""
        if answered and self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(settle, [(p.future, *p.result) for p in answered])


def expire(future: asyncio.Future) -> None:
    """On the event loop: a request that waited its whole time-out gets asyncio.TimeoutError (504)."""
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


def settle(answers: list) -> None:
    """On the event loop: each handler gets its answer or its exception (unless it stopped waiting)."""
    for future, answer, error in answers:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(answer)


def images_in(batch: list) -> int:
    return sum(len(p.images) for p in batch if p.images is not None)


def groups_of(runnable: list, max_batch: int) -> list:
    """Whole jobs, in order, in groups of at most ``max_batch`` images (a larger job alone)."""
    groups: list = []
    group: list = []
    size = 0
    for pending in runnable:
        if group and size + len(pending.images) > max_batch:
            groups.append(group)
            group, size = [], 0
        group.append(pending)
        size += len(pending.images)
    return [*groups, group] if group else groups


def finished(pending: Pending, outputs: tuple) -> tuple:
    """(answer, None), or (None, the exception writing it raised). ``outputs``: the job's rows of each model output
    (none at all when the job had no image for the model)."""
    try:
        return pending.job.finish(*outputs), None
    except Exception as e:
        return None, e


class Unbatched(MicroBatcher):
    """One job at a time per request, each in its own worker thread, concurrently on the shared session: the
    baseline micro-batching is measured against."""

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def __call__(self, job: Job, timeout: float | None = None):
        if not self.running:
            raise Unavailable("the model is not running")
        assert self.loop is not None
        pending = Pending(job, self.loop.create_future())
        work = asyncio.to_thread(self.alone, pending)
        return await (work if timeout is None else asyncio.wait_for(work, timeout))

    def alone(self, pending: Pending):
        if self.prepare_all([pending])[0].images is not None:
            self.run_group([pending])
        answer, error = pending.result
        if error is not None:
            raise error
        return answer
