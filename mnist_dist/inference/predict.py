"""Label users' inputs with an exported model: in memory, or as a resumable job over any number of processes.

A bad input costs only its own row: it gets an error and every other input is
still labelled, in input order. The job (``accelerate launch jobs/predict.py``)
splits the inputs' global index space into fixed chunks, gives each process a
contiguous run of them, and writes every finished chunk atomically beside the
output; the main process then joins the chunks, in order, into one file. The
chunking does not depend on the number of processes, so 1, 2 or 16 processes,
and a run resumed after a kill, all write the same bytes.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import atomic, collective, extras, launch, locks
from ..errors import UserError
from . import lease as lease_lib
from . import manifest as manifest_lib
from . import storage
from .chunks import CHUNK, ChunkStore, chunk_ranges, chunk_size, share
from .inputs import Framing, InputIndex
from .manifest import image_size
from .models import Runner, needs_torch, open_model
from .outputs import Format, rows_for, to_stdout
from .storage import Place

PROGRESS_FROM = 1000  # inputs; fewer finish too fast for a bar to help


def framing(manifest: dict, invert: str) -> Framing:
    return Framing(manifest_lib.image_size(manifest), manifest_lib.digit_box(manifest), invert)


def model_batch(items: list, contract: dict) -> tuple:
    """(positions of the items that did not fail, their pixels as the model's input batch)."""
    good = [i for i, item in enumerate(items) if not item.error]
    # np.array, not np.stack: the same array at a quarter of the cost for one image, and for a thousand.
    pixels = np.array([items[i].pixels for i in good]) if good else np.zeros((0, *image_size(contract)), np.float32)
    return good, manifest_lib.model_input(pixels, contract)


def label(items: list, model: Runner, batch_size: int) -> tuple:
    """(one row per item, in order; seconds spent in the model). Failed items keep their error."""
    good, batch = model_batch(items, model.manifest)
    parts, seconds = [], 0.0
    for start in range(0, len(good), batch_size):
        t0 = time.perf_counter()
        parts.append(model.run(batch[start : start + batch_size]))
        seconds += time.perf_counter() - t0
    logits = np.concatenate(parts) if parts else np.zeros((0, len(model.manifest["classes"])), np.float32)
    return rows_for(items, good, manifest_lib.probabilities(logits, model.manifest), model.manifest), seconds


def predict(inputs, model_path, invert: str = "auto", batch_size: int = 256, show_progress=True,
            runtime: str = "onnxruntime") -> tuple:
    """Label inputs in this process and return (rows in input order, summary); for libraries and tests."""
    model = open_model(model_path, runtime=runtime, batch=batch_size)
    index = InputIndex.build(inputs, framing(model.manifest, invert))
    started = time.perf_counter()
    rows, model_s = [], 0.0
    bar = launch.progress_bar(index.total, "predict", show_progress and index.total >= PROGRESS_FROM)
    for start in range(0, index.total, CHUNK):
        chunk_rows, seconds = label(index.read(start, min(start + CHUNK, index.total)), model, batch_size)
        rows += chunk_rows
        model_s += seconds
        bar.update(len(chunk_rows))
    bar.close()
    failed = sum(1 for row in rows if row["error"])
    model_rate = (len(rows) - failed) / model_s if model_s > 0 else 0.0
    return rows, summarise(len(rows), failed, len(rows), time.perf_counter() - started, model_rate, [model.description])


def summarise(inputs: int, failed: int, labelled: int, seconds: float, model_rate: float, runtimes_: list) -> dict:
    """``labelled``: inputs labelled by this run (a resumed run skips the others); rates are per second."""
    return {"inputs": inputs, "failed": failed, "labelled_now": labelled, "resumed_inputs": inputs - labelled,
            "seconds": seconds, "images_per_s": labelled / seconds if seconds > 0 else 0.0,
            "model_images_per_s": model_rate, "processes": len(runtimes_), "runtimes": runtimes_}


def failure_limit(text: str | None) -> float | None:
    """--max-failed as given: None (no limit), a count of inputs (``10``) or a fraction of them (``0.01``)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and (value.is_integer() or value < 1)):
        raise UserError(f"--max-failed must be a count of inputs (0, 10) or a fraction of them (0.01), not {text!r}")
    return value


def too_many_failed(summary: dict, limit: float | None) -> bool:
    """Whether the failed inputs exceed --max-failed (a count, or below 1 a fraction of the inputs)."""
    if limit is None or not summary["failed"]:
        return False
    allowed = limit if limit >= 1 or limit == 0 else limit * summary["inputs"]
    return summary["failed"] > allowed


def failures_line(summary: dict, limit: float | None) -> str:
    line = f"{summary['failed']} of {summary['inputs']} inputs failed; their rows say why"
    if too_many_failed(summary, limit):
        assert limit is not None
        shown = f"{limit:g}" if limit >= 1 or limit == 0 else f"{limit:g} of the inputs"
        line += f" (more than --max-failed {shown} allows)"
    return line


def describe(summary: dict, out=None) -> str:
    memory = ""
    if summary.get("peak_rss_mb") and None not in summary["peak_rss_mb"]:
        memory = f", peak memory {max(summary['peak_rss_mb']):.0f} MB per process"
    resumed = ""
    if summary["resumed_inputs"]:
        earlier = f"the attempt before restart {summary['restarts']}" if summary.get("restarts") else "the run resumed"
        resumed = f" ({summary['resumed_inputs']} of them kept from {earlier})"
    return (f"{summary['inputs']} inputs{resumed}, {summary['failed']} failed, {summary['images_per_s']:.0f} images/s "
            f"end to end ({summary['model_images_per_s']:.0f} images/s in the model alone), {summary['processes']} "
            f"process(es){memory}; {'; '.join(summary['runtimes'])}" + (f"; wrote {out}" if out else ""))


@dataclass
class JobOptions:
    inputs: tuple
    model_path: str
    out: str | None = None
    invert: str = "auto"
    batch_size: int = 256
    resume: bool = False
    workers: int | None = None
    threads: int | None = None
    cpu: bool = False
    chunk_size: int = CHUNK
    runtime: str = "auto"
    show_progress: bool = True
    storage_options: dict = field(default_factory=dict)
    lease_ttl_s: float = lease_lib.TTL_S


@dataclass
class Prepared:
    """What each process sets up before any work: the model, its inputs, and where the output goes."""

    model: Runner
    index: InputIndex
    fingerprint: str  # of the inputs: compared across processes, and recorded for --resume
    out: Place | None
    fmt: Format
    threads: int


def run_job(opts: JobOptions, echo=print) -> dict:
    """Label every input across however many processes were launched; the main process writes --out.

    Returns the summary (on every process). Bad input raises UserError on every process, before any
    work and before the output folder is touched. Accelerate (and torch) start only where the job has
    several processes or a TorchScript / torch.export model.
    """
    if needs_torch(opts.model_path):
        extras.require("train", f"predict with {opts.model_path}")
    if opts.resume and to_stdout(opts.out):
        raise UserError("--resume continues a run into --out: give the same --out")
    accelerator = launch.job_processes(opts.cpu, needs_torch(opts.model_path))
    try:
        with ExitStack() as held:
            return _run_job(opts, accelerator, echo, held)
    finally:
        accelerator.end_training()


def prepare(opts: JobOptions, accelerator) -> Prepared:
    """Everything a process checks before any work: the output's place, the model, the inputs. Every process
    does it, since on several machines each sees its own disks and its own credentials."""
    fmt = Format(opts.out)  # an unknown extension, or Parquet without pyarrow, is refused first
    out = None
    if not to_stdout(opts.out):
        out = storage.locate(opts.out, opts.storage_options)
        if out.is_local:
            atomic.check_output_file(out.name, "--out")
        else:
            storage.check_writable(out, "--out")
    threads, _ = launch.choose_threads(opts.threads)
    model = open_model(opts.model_path, opts.runtime, threads, str(accelerator.device), opts.batch_size)
    index = InputIndex.build(opts.inputs, framing(model.manifest, opts.invert), opts.storage_options)
    return Prepared(model, index, index.fingerprint(), out, fmt, threads)


def check_same_inputs(seen: list) -> None:
    """Every process must see the inputs the main process sees: the same files, sizes and versions."""
    main_total, main_fingerprint = seen[0]
    for rank, (total, fingerprint) in enumerate(seen):
        if total != main_total:
            what = f"{total} inputs where the main process sees {main_total}"
        elif fingerprint != main_fingerprint:
            what = "inputs of other names, sizes or versions than the main process does"
        else:
            continue
        raise UserError(f"process {rank} sees {what}: every process must see the same inputs (a shared file "
                        "system or an object store)")


def _run_job(opts: JobOptions, accelerator, echo, held: ExitStack) -> dict:
    if to_stdout(opts.out) and accelerator.num_processes > 1:
        raise UserError("--out is required when several processes label the inputs (a file or a URL; - is "
                        "standard output, for one process)")
    here: list = []  # this process's Prepared, once every process has passed every check

    def prepare_here() -> tuple:
        here.append(prepare(opts, accelerator))
        return here[0].index.total, here[0].fingerprint

    check_same_inputs(collective.agree(accelerator, prepare_here))
    model, index, out, fmt, threads = here[0].model, here[0].index, here[0].out, here[0].fmt, here[0].threads
    started = time.perf_counter()  # end to end from here: decoding, labelling, writing
    chunk = chunk_size(index.total, opts.chunk_size)
    identity = {"inputs": here[0].fingerprint, "model": model.sha256, "runtime": model.engine, "total": index.total,
                "chunk": chunk, "invert": opts.invert, "format": fmt.name, "batch": opts.batch_size}
    store = ChunkStore(out, identity, index.total, chunk) if out else None
    # A group that torchrun restarted (--max_restarts) continues from the chunks its earlier attempt finished.
    resume = opts.resume or launch.restart_count() > 0
    leases: list = []  # the main process's lease on an --out in an object store
    if store is not None:
        collective.on_main_process(accelerator, lambda: begin(store, resume, held, opts.lease_ttl_s, leases))
    accelerator.wait_for_everyone()

    mine = share(chunk_ranges(index.total, chunk), accelerator)
    finished = store.finished(mine) if store is not None else {}  # by the run being resumed
    todo = [r for r in mine if r[0] not in finished]
    labelled, failed, model_s = label_ranges(opts, index, model, store, todo, accelerator, echo, fmt, threads)
    failed += sum(header["failed"] for header in finished.values())
    accelerator.wait_for_everyone()
    stats = gather_stats(accelerator, labelled, failed, model_s, model.description)
    if store is not None:
        collective.on_main_process(accelerator, lambda: commit(store, fmt, leases))
    summary = summarise(index.total, stats["failed"], stats["labelled"], time.perf_counter() - started,
                        stats["model_images_per_s"], stats["runtimes"])
    return {**summary, "peak_rss_mb": stats["peak_rss_mb"], "restarts": launch.restart_count()}


def begin(store: ChunkStore, resume: bool, held: ExitStack, lease_ttl_s: float, leases: list) -> None:
    """On the main process: hold --out for the run's whole life (a lock beside a local file, a lease beside an
    object in a store with conditional writes), then keep the finished chunks of the run being resumed, or
    start afresh."""
    what = f"--out {store.out.name}"
    if store.out.is_local:
        held.enter_context(locks.exclusive(Path(storage.parent(store.out.path)) / f".{store.out.basename}.lock",
                                           what))
    elif lease_lib.leasable(store.out):
        leases.append(held.enter_context(lease_lib.Lease(store.out, what, lease_ttl_s)))
        leases[0].acquire(resume)
    store.start(resume and store.check_resumable())


def commit(store: ChunkStore, fmt: Format, leases: list) -> None:
    """On the main process: join the chunks into --out, unless another run took the lease over meanwhile."""
    for lease in leases:
        lease.check()
    store.merge(fmt)


def label_ranges(opts, index, model, store, todo, accelerator, echo, fmt: Format, threads: int) -> tuple:
    """Label this process's ranges, decoding the next while the model labels the current one."""
    total = sum(stop - start for _, start, stop in todo)
    bar = launch.progress_bar(total, "predict", opts.show_progress and accelerator.is_main_process
                              and total >= PROGRESS_FROM)
    labelled = failed = 0
    model_s = 0.0
    workers = opts.workers or threads
    with ThreadPoolExecutor(max_workers=workers) as pool:
        if todo:
            pending = index.read_later(todo[0][1], todo[0][2], pool, workers)
        for position, (k, start, stop) in enumerate(todo):
            items = pending()
            if position + 1 < len(todo):
                pending = index.read_later(todo[position + 1][1], todo[position + 1][2], pool, workers)
            rows, seconds = label(items, model, opts.batch_size)
            model_s += seconds
            labelled += len(rows)
            failed += sum(1 for row in rows if row["error"])
            body = fmt.body(rows)
            if store is not None:
                store.save(k, start, stop, rows, body)
            else:  # one process writing CSV to stdout: stream the rows as they come
                echo(((b"" if position else fmt.head()) + body).decode(), nl=False)
            bar.update(len(rows))
    bar.close()
    return labelled, failed, model_s


def gather_stats(accelerator, labelled: int, failed: int, model_s: float, runtime: str) -> dict:
    mine = [{"labelled": labelled, "failed": failed, "model_s": model_s, "runtime": runtime,
             "peak_rss_mb": peak_rss_mb()}]
    every = mine
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        every = gather_object(mine)
    # The model's own rate: the processes run side by side, so their rates add up.
    return {"labelled": sum(s["labelled"] for s in every), "failed": sum(s["failed"] for s in every),
            "model_images_per_s": sum(s["labelled"] / s["model_s"] for s in every if s["model_s"] > 0),
            "runtimes": [f"process {i}: {s['runtime']}" for i, s in enumerate(every)],
            "peak_rss_mb": [s["peak_rss_mb"] for s in every]}


def peak_rss_mb():
    """This process's peak resident memory so far, in MB (Linux and macOS report it in different units; Windows
    has no ``resource`` module, and gets None)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
