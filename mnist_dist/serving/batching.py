"""Micro-batching: requests that arrive together share one model run.

The batcher takes the first waiting request and every other one already
queued (those that arrived while the model ran the previous batch); then, if
the batch still holds fewer than ``max_batch`` images, it waits up to
``max_wait`` seconds for more. It runs the model once in a worker thread
(onnxruntime releases the GIL) and answers each request with its own rows.
Under load batches form without waiting; alone, a request waits at most
``max_wait``.
"""
import asyncio
from typing import Optional

import numpy as np


class MicroBatcher:
    def __init__(self, run, max_batch: int = 64, max_wait: float = 0.002):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: Optional[asyncio.Task] = None
        self.batches = 0  # model runs so far, for /v1/model

    async def start(self) -> None:
        self.queue = asyncio.Queue()  # bound to the running loop (Python 3.9 binds a queue at creation)
        self.task = asyncio.create_task(self.serve_forever())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        """The logits of ``images`` [k, ...], computed in a batch with whatever else is waiting."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((images, future))
        return await future

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await self.queue.get()]
            size = len(waiting[0][0])
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                waiting.append(item)
                size += len(item[0])
            await self.run_batch(waiting)

    async def run_batch(self, waiting: list) -> None:
        self.batches += 1
        try:
            logits = await asyncio.to_thread(self.run, np.concatenate([images for images, _ in waiting]))
        except Exception as e:  # the model's failure is every waiting request's failure, not the server's
            for _, future in waiting:
                if not future.done():
                    future.set_exception(e)
            return
        start = 0
        for images, future in waiting:
            if not future.done():  # a client that went away leaves a cancelled future
                future.set_result(logits[start : start + len(images)])
            start += len(images)


class Unbatched:
    """One model run per request, concurrently on the shared session: the baseline micro-batching is measured
    against."""

    batches = 0

    def __init__(self, run):
        self.run = run

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        self.batches += 1
        return await asyncio.to_thread(self.run, images)
