"""The chunks of a predict job: how inputs are cut, which process takes which, and the finished ones on disk."""
import json
import shutil
from pathlib import Path

from .. import atomic
from ..errors import UserError
from .outputs import Format

CHUNK = 4096  # inputs per chunk at most: the unit of memory, of progress and of resuming
MIN_CHUNKS = 64  # a small job still splits this finely: every process gets work, and decoding overlaps labelling


def chunk_size(total: int, largest: int = CHUNK) -> int:
    """Inputs per chunk for a job of ``total``: at most ``largest``, and small enough for MIN_CHUNKS chunks (but
    not under 64 inputs, where a chunk's own costs would show). It depends on the inputs alone, never on the
    number of processes, so a run may be resumed on another number of them."""
    return max(1, min(largest, max(64, -(-total // MIN_CHUNKS))))


def chunk_ranges(total: int, chunk: int = CHUNK) -> list:
    """(chunk number, first index, last index + 1) of every chunk: fixed, whatever the number of processes."""
    return [(k, start, min(start + chunk, total)) for k, start in enumerate(range(0, total, chunk))]


class ChunkStore:
    """Finished chunks of a job, each an atomic file in a hidden folder beside the output.

    A chunk file starts with one JSON line (its index range, rows and failures), then its text. The
    folder's job.json names the inputs, the model and the options, so that --resume never mixes runs.
    """

    def __init__(self, out: Path, identity: dict, total: int, chunk: int = CHUNK):
        self.out, self.identity, self.total, self.chunk = out, identity, total, chunk
        self.folder = out.parent / f".{out.name}.parts"

    def ranges(self) -> list:
        return chunk_ranges(self.total, self.chunk)

    def path(self, k: int) -> Path:
        return self.folder / f"{k:08d}.part"

    def check_resumable(self) -> bool:
        """True if there is a run of this very job to resume; UserError if the folder belongs to another."""
        job = self.folder / "job.json"
        if not job.is_file():
            return False
        recorded = json.loads(job.read_text())
        changed = [key for key in self.identity if recorded.get(key) != self.identity[key]]
        if changed:
            raise UserError(f"--resume: the unfinished run for {self.out} had other {', '.join(changed)}; "
                            f"run without --resume to start afresh")
        return True

    def start(self, resume: bool) -> None:
        """On the main process: keep the finished chunks when resuming, else begin an empty folder."""
        if not resume and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(exist_ok=True)
        # Temporary files of writes cut short by a hard kill: under the job's lock, no other writer owns them.
        atomic.remove_stale_temporaries(self.folder)
        atomic.remove_stale_temporaries(self.out.parent, self.out.name)
        atomic.write_json(self.folder / "job.json", self.identity)

    def done(self, k: int) -> bool:
        return self.path(k).is_file()

    def failures(self, k: int) -> int:
        with open(self.path(k)) as f:
            return json.loads(f.readline())["failed"]

    def save(self, k: int, start: int, stop: int, rows: list, text: str) -> None:
        header = {"start": start, "stop": stop, "rows": len(rows), "failed": sum(1 for r in rows if r["error"])}
        atomic.write_text(self.path(k), json.dumps(header) + "\n" + text)

    def merge(self, fmt: Format) -> None:
        """Join every chunk, in order, into the output (atomically), then drop the folder."""
        with atomic.atomic_path(self.out) as tmp, open(tmp, "w") as f:
            f.write(fmt.head())
            for k, start, stop in self.ranges():
                with open(self.path(k)) as part:
                    header = json.loads(part.readline())
                    if (header["start"], header["stop"], header["rows"]) != (start, stop, stop - start):
                        raise UserError(f"{self.path(k)} does not hold inputs {start}..{stop - 1}: start afresh")
                    if k and fmt.json:
                        f.write(",\n")
                    shutil.copyfileobj(part, f)
            f.write(fmt.tail())
        shutil.rmtree(self.folder)


def share(ranges: list, accelerator) -> list:
    """This process's contiguous run of chunks (earlier processes take one more when they do not divide)."""
    n, p = accelerator.num_processes, accelerator.process_index
    per, extra = divmod(len(ranges), n)
    first = p * per + min(p, extra)
    return ranges[first : first + per + (p < extra)]
