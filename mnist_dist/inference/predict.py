"""Label users' inputs with an exported model: in memory, or as a resumable job over any number of processes.

A bad input costs only its own row: it gets an error and every other input is
still labelled, in input order. The job (``accelerate launch jobs/predict.py``)
splits the inputs' global index space into fixed chunks, gives each process a
contiguous run of them, and writes every finished chunk atomically beside the
output; the main process then joins the chunks, in order, into one file. The
chunking does not depend on the number of processes, so 1, 2 or 16 processes,
and a run resumed after a kill, all write the same bytes.
"""
import csv
import io
import json
import shutil
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import atomic, launch
from ..errors import UserError
from ..exporting import manifest as manifest_lib
from ..exporting.manifest import image_size
from ..scores import softmax
from . import runtimes
from .inputs import Framing, InputIndex, Item

COLUMNS = ("input", "prediction", "confidence", "top3", "error")
CHUNK = 4096  # inputs per chunk at most: the unit of memory, of progress and of resuming
MIN_CHUNKS = 64  # a small job still splits this finely: every process gets work, and decoding overlaps labelling
PROGRESS_FROM = 1000  # inputs; fewer finish too fast for a bar to help
MODEL_SUFFIXES = (".onnx", ".ts", ".pt2")


@dataclass
class Model:
    """An exported model ready to run: float32 [N,1,H,W] -> logits, with its manifest and how it runs."""

    run: Callable
    manifest: dict
    runtime: str  # how it runs, for people: engine, provider or device, threads
    sha256: str
    engine: str  # what decides the numbers: a resumed job must keep it


def load_model(model_path, device: str = "cpu", threads=None, runtime: str = "onnxruntime", batch: int = 256,
               spin: bool = True) -> Model:
    """The model file with its manifest beside it; checks that it honours the manifest's input contract.

    ONNX files run in onnxruntime (its CUDA provider on a GPU process where onnxruntime-gpu is installed) or
    OpenVINO, as ``runtime`` says ("auto": see ``runtimes.choose_runtime``, for batches of ``batch``);
    TorchScript and torch.export files run in PyTorch on ``device``.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"model {model_path} does not exist")
    if model_path.suffix not in MODEL_SUFFIXES:
        raise UserError(f"{model_path}: --model takes model.onnx, model.int8.onnx, model.ts or model.pt2")
    manifest = manifest_lib.find_for_model(model_path)
    if model_path.suffix == ".onnx":
        check_onnx_input(model_path, manifest)
        engine, why = runtimes.choose_runtime(model_path, runtime, batch, device)
        if engine == "onnxruntime" and device.startswith("cuda"):
            engine = "onnxruntime-cuda"
        if engine.startswith("onnxruntime"):
            session = runtimes.onnx_session(model_path, threads, runtimes.onnx_providers(device), spin)
            run, runtime = runtimes.onnx_runner(session), f"onnxruntime {session.get_providers()[0]}"
        else:
            precision = "bf16" if engine == "openvino-bf16" else "fp32"
            run, runtime = runtimes.load_openvino(model_path, threads, precision), f"openvino CPU {precision}"
        runtime += f" ({why})" if why else ""
    else:
        try:
            run = runtimes.load_runner(model_path, device)
        except Exception as e:  # torch raises many types for a corrupt or foreign file
            raise UserError(f"cannot load {model_path}: {' '.join(str(e).split())[:200]}") from e
        engine = "torchscript" if model_path.suffix == ".ts" else "torch.export"
        runtime = f"{engine} on {device}"
    if threads and "CUDA" not in runtime and not runtime.endswith("cuda"):
        runtime += f", {threads} thread{'s' if threads > 1 else ''}"
    check_output_shape(model_path, run, manifest)
    return Model(run, manifest, runtime, manifest_lib.sha256(model_path), engine)


def check_onnx_input(path: Path, manifest: dict) -> None:
    """The graph takes one [batch, 1, 28, 28] input with a free batch dimension, whichever runtime runs it."""
    import onnx

    try:
        inputs = onnx.load(str(path), load_external_data=False).graph.input
    except Exception as e:  # protobuf's DecodeError and others, for a truncated or foreign file
        raise UserError(f"cannot load ONNX model {path}: {' '.join(str(e).split())[:200]}") from e
    if len(inputs) != 1:
        raise UserError(f"{path} takes {len(inputs)} inputs; expected one image batch")
    dims = [d.dim_param or d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    expected = manifest["input"]["shape"][1:]
    if len(dims) != 4 or dims[1:] != expected or not isinstance(dims[0], str):
        raise UserError(f"{path}: input shape {dims}; expected [batch, {', '.join(map(str, expected))}]")


def check_output_shape(path: Path, run, manifest: dict) -> None:
    """TorchScript declares no shapes: a trial batch of two shows whether the contract holds."""
    expected = (2, len(manifest["classes"]))
    try:
        probe = run(np.zeros((2, *manifest["input"]["shape"][1:]), np.float32))
    except Exception as e:  # the runtime's own error for a mismatched model
        raise UserError(f"{path} does not accept {manifest['input']['shape']} input "
                        f"({' '.join(str(e).split())[:200]})") from e
    if probe.shape != expected:
        raise UserError(f"{path} returns shape {probe.shape} for 2 images; expected {expected}")


def framing(manifest: dict, invert: str) -> Framing:
    return Framing(manifest_lib.image_size(manifest), manifest_lib.digit_box(manifest), invert)


def model_batch(items: list, contract: dict) -> tuple:
    """(positions of the items that did not fail, their pixels as the model's input batch)."""
    good = [i for i, item in enumerate(items) if not item.error]
    pixels = np.stack([items[i].pixels for i in good]) if good else np.zeros((0, *image_size(contract)), np.float32)
    return good, manifest_lib.model_input(pixels, contract)


def rows_for(items: list, good: list, logits, classes: list, probabilities: bool = False) -> list:
    """One row per item, in order: the model's answer for the good ones, the error for the others.
    With ``probabilities``, each row also carries all of them, one per class."""
    scores = np.zeros((len(items), len(classes)))
    if good:
        scores[good] = softmax(logits)
    # The top three of every row at once, then plain Python numbers: per row, numpy calls cost more than the work.
    top = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    top_scores = np.take_along_axis(scores, top, axis=1).tolist()
    names = [int(c) for c in classes]
    rows = [make_row(item, [names[c] for c in top_row], p) for item, top_row, p in zip(items, top.tolist(), top_scores)]
    if probabilities:
        rows = [{**row, "probabilities": None if row["error"] else scores[i].tolist()} for i, row in enumerate(rows)]
    return rows


def label(items: list, model: Model, batch_size: int) -> tuple:
    """(one row per item, in order; seconds spent in the model). Failed items keep their error."""
    good, batch = model_batch(items, model.manifest)
    logits, seconds = [], 0.0
    for start in range(0, len(good), batch_size):
        t0 = time.perf_counter()
        logits.append(model.run(batch[start : start + batch_size]))
        seconds += time.perf_counter() - t0
    logits = np.concatenate(logits) if logits else np.zeros((0, len(model.manifest["classes"])), np.float32)
    return rows_for(items, good, logits, model.manifest["classes"]), seconds


def make_row(item: Item, top_classes: list, top_scores: list) -> dict:
    """predict's output row: the best class and its probability, the three best, or the item's error."""
    if item.error:
        return {"input": item.name, "prediction": None, "confidence": None, "top3": [], "error": item.error}
    return {"input": item.name, "prediction": top_classes[0], "confidence": top_scores[0],
            "top3": [[c, p] for c, p in zip(top_classes, top_scores)], "error": ""}


class Format:
    """CSV, or a JSON array (--out *.json), written piece by piece: the same bytes however it is split."""

    def __init__(self, out):
        self.json = out is not None and Path(out).suffix.lower() == ".json"
        self.name = "json" if self.json else "csv"

    def head(self) -> str:
        return "[\n" if self.json else ",".join(COLUMNS) + "\n"

    def body(self, rows: list) -> str:
        if self.json:
            return ",\n".join(textwrap.indent(json.dumps(row, indent=1), " ") for row in rows)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        for row in rows:
            writer.writerow({**row, "confidence": "" if row["confidence"] is None else f"{row['confidence']:.6f}",
                             "prediction": "" if row["prediction"] is None else row["prediction"],
                             "top3": " ".join(f"{d}:{p:.4f}" for d, p in row["top3"])})
        return buffer.getvalue()

    def join(self, bodies) -> str:
        return ",\n".join(bodies) if self.json else "".join(bodies)

    def tail(self) -> str:
        return "\n]\n" if self.json else ""

    def whole(self, rows: list) -> str:
        return self.head() + self.body(rows) + self.tail()


def to_csv(rows: list) -> str:
    return Format(None).whole(rows)


def write(rows: list, out) -> None:
    atomic.write_text(out, Format(out).whole(rows))


def predict(inputs, model_path, invert: str = "auto", batch_size: int = 256, show_progress=True,
            runtime: str = "onnxruntime") -> tuple:
    """Label inputs in this process and return (rows in input order, summary); for libraries and tests."""
    model = load_model(model_path, runtime=runtime, batch=batch_size)
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
    return rows, summarise(len(rows), failed, len(rows), time.perf_counter() - started, model_rate, [model.runtime])


def summarise(inputs: int, failed: int, labelled: int, seconds: float, model_rate: float, runtimes_: list) -> dict:
    """``labelled``: inputs labelled by this run (a resumed run skips the others); rates are per second."""
    return {"inputs": inputs, "failed": failed, "labelled_now": labelled, "resumed_inputs": inputs - labelled,
            "seconds": seconds, "images_per_s": labelled / seconds if seconds > 0 else 0.0,
            "model_images_per_s": model_rate, "processes": len(runtimes_), "runtimes": runtimes_}


def describe(summary: dict, out=None) -> str:
    memory = ""
    if summary.get("peak_rss_mb") and None not in summary["peak_rss_mb"]:
        memory = f", peak memory {max(summary['peak_rss_mb']):.0f} MB per process"
    return (f"{summary['inputs']} inputs, {summary['failed']} failed, {summary['images_per_s']:.0f} images/s end to "
            f"end ({summary['model_images_per_s']:.0f} images/s in the model alone), {summary['processes']} "
            f"process(es){memory}; {'; '.join(summary['runtimes'])}" + (f"; wrote {out}" if out else ""))


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


@dataclass
class JobOptions:
    inputs: tuple
    model_path: str
    out: str = None
    invert: str = "auto"
    batch_size: int = 256
    resume: bool = False
    workers: int = None
    threads: int = None
    cpu: bool = False
    chunk_size: int = CHUNK
    runtime: str = "auto"
    show_progress: bool = True


def run_job(opts: JobOptions, echo=print) -> dict:
    """Label every input across however many processes were launched; the main process writes --out.

    Returns the summary (on every process). Bad input raises UserError on every process, before any
    work and before the output folder is touched.
    """
    accelerator = launch.make_accelerator(cpu=opts.cpu)
    try:
        return _run_job(opts, accelerator, echo)
    finally:
        accelerator.end_training()


def _run_job(opts: JobOptions, accelerator, echo) -> dict:
    if opts.out is None and accelerator.num_processes > 1:
        raise UserError("--out is required when several processes label the inputs")
    out = atomic.check_output_file(opts.out, "--out") if opts.out else None
    threads, _ = launch.apply_threads(opts.threads)
    model = load_model(opts.model_path, str(accelerator.device), threads, opts.runtime, opts.batch_size)
    started = time.perf_counter()  # end to end from here: enumerating, decoding, labelling, writing
    index = InputIndex.build(opts.inputs, framing(model.manifest, opts.invert))
    fmt = Format(out)
    chunk = chunk_size(index.total, opts.chunk_size)
    identity = {"inputs": index.fingerprint(), "model": model.sha256, "runtime": model.engine, "total": index.total,
                "chunk": chunk, "invert": opts.invert, "format": fmt.name}
    store = ChunkStore(out, identity, index.total, chunk) if out else None
    resuming = opts.resume and store is not None and store.check_resumable()
    accelerator.wait_for_everyone()  # every process passed every check: now the folder may change
    if store is not None and accelerator.is_main_process:
        store.start(resuming)
    accelerator.wait_for_everyone()

    mine = share(chunk_ranges(index.total, chunk), accelerator)
    finished = [r for r in mine if store is not None and store.done(r[0])]  # by the run being resumed
    todo = [r for r in mine if r not in finished]
    labelled, failed, model_s = label_ranges(opts, index, model, store, todo, accelerator, echo)
    failed += sum(store.failures(k) for k, _, _ in finished)
    accelerator.wait_for_everyone()
    stats = gather_stats(accelerator, labelled, failed, model_s, model.runtime)
    if store is not None and accelerator.is_main_process:
        store.merge(fmt)
    summary = summarise(index.total, stats["failed"], stats["labelled"], time.perf_counter() - started,
                        stats["model_images_per_s"], stats["runtimes"])
    return {**summary, "peak_rss_mb": stats["peak_rss_mb"]}


def share(ranges: list, accelerator) -> list:
    """This process's contiguous run of chunks (earlier processes take one more when they do not divide)."""
    n, p = accelerator.num_processes, accelerator.process_index
    per, extra = divmod(len(ranges), n)
    first = p * per + min(p, extra)
    return ranges[first : first + per + (p < extra)]


def label_ranges(opts, index, model, store, todo, accelerator, echo) -> tuple:
    """Label this process's ranges, decoding the next while the model labels the current one."""
    total = sum(stop - start for _, start, stop in todo)
    bar = launch.progress_bar(total, "predict", opts.show_progress and accelerator.is_main_process
                              and total >= PROGRESS_FROM)
    labelled = failed = 0
    model_s = 0.0
    fmt = Format(opts.out)
    workers = opts.workers or launch.choose_threads(opts.threads)[0]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = index.read_later(todo[0][1], todo[0][2], pool, workers) if todo else None
        for position, (k, start, stop) in enumerate(todo):
            items = pending()
            if position + 1 < len(todo):
                pending = index.read_later(todo[position + 1][1], todo[position + 1][2], pool, workers)
            rows, seconds = label(items, model, opts.batch_size)
            model_s += seconds
            labelled += len(rows)
            failed += sum(1 for row in rows if row["error"])
            text = fmt.body(rows)
            if store is not None:
                store.save(k, start, stop, rows, text)
            else:  # one process writing to stdout: stream the rows as they come
                echo(("" if position else fmt.head()) + text, nl=False)
            bar.update(len(rows))
    bar.close()
    return labelled, failed, model_s


def gather_stats(accelerator, labelled: int, failed: int, model_s: float, runtime: str) -> dict:
    from accelerate.utils import gather_object

    mine = [{"labelled": labelled, "failed": failed, "model_s": model_s, "runtime": runtime,
             "peak_rss_mb": peak_rss_mb()}]
    every = gather_object(mine) if accelerator.num_processes > 1 else mine
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
