"""What a server is started with: one definition of every setting and its default, which the command line reads."""
from __future__ import annotations

from dataclasses import dataclass

from ..inference.images import MAX_PIXELS

MAX_BODY = 5 * 2**20
MAX_IMAGES = 256  # per request
INVERT = ("auto", "yes", "no")
TRUE = ("1", "true", "yes", "on")
RETRY_AFTER_S = 1


@dataclass
class ServeOptions:
    model_dir: str
    model: str = "model.onnx"
    threads: int | None = None
    batching: bool = True
    max_batch: int = 64
    max_wait_ms: float = 0.0  # measured: waiting 2 ms more cost single clients 3 ms and won nothing under load
    max_body: int = MAX_BODY
    runtime: str = "auto"
    model_name: str = "mnist"
    max_queue: int = 1024  # images waiting for the model; 0: no bound
    timeout_s: float = 10.0
    max_pixels: int = MAX_PIXELS
    drain_s: float = 20.0
    access_log: str | None = None  # a file, or "-" for standard output
    # Threads taking batches to the model in each process. With two, one prepares and answers while the other is
    # in the model; on 2 cores they also run the model side by side and starve the event loop: measured there
    # (alternated side by side, 0.1 ms switch interval), one answered more requests at 1 and at 32 clients.
    model_threads: int = 1

