"""The chunks of a predict job: how inputs are cut, which process takes which, and the finished ones on disk."""
from __future__ import annotations

import json

from .. import atomic
from ..errors import UserError
from . import storage
from .outputs import Format
from .storage import Place, parent

CHUNK = 4096  # inputs per chunk at most: the unit of memory, of progress and of resuming
HEADER_BYTES = 1024  # a part's first line is shorter than this
# job.json's keys as the options that set them, for the message that refuses a --resume.
OPTION_NAMES = {"inputs": "inputs (names, sizes, versions)", "model": "--model", "runtime": "--runtime",
                "total": "number of inputs", "chunk": "--chunk-size", "invert": "--invert", "format": "--out format",
                "batch": "--batch-size"}
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
    """Finished chunks of a job, each a file (or object) written whole in a hidden folder beside the output.

    A part starts with one JSON line (its index range, rows, failures and the length of what follows),
    then the chunk's rows in the output's format. A part counts as done only when it is there and as long
    as its own first line says: object stores have no rename, so completeness is checked, not assumed. The
    folder's job.json names the inputs, the model and every option that changes the output, so that
    --resume never mixes runs. With --out a URL, parts and job.json live in the same store: no machine
    needs a shared file system.
    """

    def __init__(self, out: Place, identity: dict, total: int, chunk: int = CHUNK):
        self.out, self.identity, self.total, self.chunk = out, identity, total, chunk
        self.folder = out.sibling(f".{out.basename}.parts")

    def ranges(self) -> list:
        return chunk_ranges(self.total, self.chunk)

    def part(self, k: int) -> Place:
        return self.folder.child(f"{k:08d}.part")

    def check_resumable(self) -> bool:
        """True if there is a run of this very job to resume; UserError naming every option that differs."""
        try:
            recorded = json.loads(self.folder.fs.cat_file(self.folder.child("job.json").path))
        except FileNotFoundError:
            return False
        changed = [f"{OPTION_NAMES.get(key, key)} {recorded.get(key)!r}, not {value!r}"
                   for key, value in self.identity.items() if recorded.get(key) != value]
        if changed:
            raise UserError(f"--resume: the unfinished run for {self.out.name} had other {'; '.join(changed)}; "
                            "run without --resume to start afresh")
        return True

    def start(self, resume: bool) -> None:
        """On the main process: keep the finished chunks when resuming, else begin an empty folder."""
        if not resume:
            storage.remove_tree(self.folder)
        if self.out.is_local:
            self.folder.fs.makedirs(self.folder.path, exist_ok=True)
            # Temporary files of writes cut short by a hard kill: under the job's lock, no other writer owns them.
            atomic.remove_stale_temporaries(self.folder.path)
            atomic.remove_stale_temporaries(parent(self.out.path), self.out.basename)
        storage.write_whole(self.folder.child("job.json"), (json.dumps(self.identity, indent=2) + "\n").encode())

    def sizes(self) -> dict:
        """{part's name: its size} of every part in the folder, from one listing."""
        try:
            listed = self.folder.fs.ls(self.folder.path, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {info["name"].rstrip("/").rsplit("/", 1)[-1]: info["size"] for info in listed}

    def header(self, k: int, size: int | None) -> dict | None:
        """The first line of part ``k`` (of ``size`` bytes, None if absent) if the part is whole, else None."""
        if size is None:
            return None
        try:
            first = storage.read_range(self.part(k), 0, min(size, HEADER_BYTES)).split(b"\n", 1)[0]
            header = json.loads(first)
        except (FileNotFoundError, ValueError):
            return None
        whole = size == len(first) + 1 + header.get("bytes", -1)
        return header if whole and (header["start"], header["stop"]) == self.ranges()[k][1:] else None

    def finished(self, ranges: list) -> dict:
        """{chunk: its header} of the chunks among ``ranges`` whose parts are there and whole."""
        sizes = self.sizes()
        headers = {k: self.header(k, sizes.get(self.part(k).basename)) for k, _, _ in ranges}
        return {k: header for k, header in headers.items() if header is not None}

    def save(self, k: int, start: int, stop: int, rows: list, body: bytes) -> None:
        header = {"start": start, "stop": stop, "rows": len(rows), "failed": sum(1 for r in rows if r["error"]),
                  "bytes": len(body)}
        storage.write_whole(self.part(k), json.dumps(header).encode() + b"\n" + body)

    def bodies(self):
        """Each chunk's rows, in order; a missing or partial part is one line naming it."""
        sizes = self.sizes()
        for k, start, stop in self.ranges():
            header = self.header(k, sizes.get(self.part(k).basename))
            if header is None or header["rows"] != stop - start:
                raise UserError(f"the part for inputs {start}..{stop - 1} ({self.part(k).name}) is missing or "
                                "incomplete: run the same command with --resume to label them again")
            data = self.folder.fs.cat_file(self.part(k).path)
            yield data[data.index(b"\n") + 1 :]

    def merge(self, fmt: Format) -> None:
        """Join every chunk, in order, into the output (whole or not at all), then drop the folder."""
        with storage.open_output(self.out) as f:
            fmt.write(f, self.bodies())
        storage.remove_tree(self.folder)


def share(ranges: list, accelerator) -> list:
    """This process's contiguous run of chunks (earlier processes take one more when they do not divide)."""
    n, p = accelerator.num_processes, accelerator.process_index
    per, extra = divmod(len(ranges), n)
    first = p * per + min(p, extra)
    return ranges[first : first + per + (p < extra)]
