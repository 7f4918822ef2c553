"""What a server is started with: one definition of every setting and its default, which the command line reads."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..inference.images import MAX_PIXELS

MAX_BODY = 5 * 2**20
MAX_IMAGES = 256  # per request
INVERT = ("auto", "yes", "no")
TRUE = ("1", "true", "yes", "on")
RETRY_AFTER_S = 1


CONTROL_MODES = ("none", "explicit", "poll")  # Triton's --model-control-mode
RESTRICTED_CATEGORIES = ("model-repository",)  # what Triton's --http-restricted-api can guard that this server has


@dataclass
class ServeOptions:
    repository: str  # a model repository (<name>/<version>/ export folders), or one export folder; a path or URL
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
    control_mode: str = "none"  # none: the models loaded at start; explicit: the repository API; poll: rescans
    poll_s: float = 15.0  # poll mode: seconds between scans of the repository
    version_policy: str = "latest:1"  # for models whose config.json names none
    restricted_key: tuple | None = None  # (header, value) the repository API asks of its callers
    cache_dir: str | None = None  # where versions of a remote repository are copied


def default(name: str):
    """The default of one option, for the command line: written once, here."""
    return next(f.default for f in fields(ServeOptions) if f.name == name)

