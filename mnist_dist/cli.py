"""The ``mnist-dist`` command group. Each command is a thin shell over a library module."""
import functools
import json
import os
import sys
from pathlib import Path

import click

from . import extras
from .errors import UserError
from .inference.runtimes import RUNTIME_CHOICES
from .interrupt import exit_alike, interruptible
from .launch import launched_rank
from .serving.options import CONTROL_MODES, RESTRICTED_CATEGORIES, ServeOptions
from .serving.options import default as serve_default


def friendly_errors(func):
    """Turn UserError into click's one-line 'Error: ...' and exit code 1.

    Under a launcher every process meets the same bad input: only the main one says so,
    the others leave quietly with the same exit code.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as e:
            if launched_rank() != 0:
                sys.exit(1)
            raise click.ClickException(str(e)) from None

    return wrapper


def requires(extra: str):
    """The command needs ``extra``'s packages: say which to install, in one line, before importing any of them."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            extras.require(extra, click.get_current_context().command_path)
            return func(*args, **kwargs)

        return wrapper

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mnist-dist")
def main():
    """Train, export and serve the MNIST CNN."""


data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False),
    help="torchvision root holding MNIST/raw, downloaded there if missing and online. Default: $MNIST_DATA_DIR, "
         "then ./data if it holds MNIST, then the copy bundled with mnist-dist.",
)

threads_option = click.option("--threads", type=click.IntRange(min=1), default=None,
                              help="CPU threads per process. Default: $OMP_NUM_THREADS if above 1 (accelerate "
                                   "launch exports 1 by default), else physical cores / processes on this machine.")


download_option = click.option("--download/--no-download", default=True, show_default=True,
                               help="Let torchvision download MNIST when it is not found.")


def recipe_help(name: str, text: str) -> str:
    from .training.config import PRESETS

    defaults = ", ".join(f"{preset} {values[name]}" for preset, values in PRESETS.items())
    return f"{text} [preset defaults: {defaults}]"


@main.command()
@data_dir_option
@click.option("--output-dir", default="runs/mnist", show_default=True, type=click.Path(),
              help="Where checkpoints, metrics and the resolved config go.")
@click.option("--preset", type=click.Choice(["tutorial", "fast", "best"]), default=None,
              help="Recipe: 'tutorial' (the tutorial exactly), 'fast' (default), 'best' (highest accuracy). "
                   "Options below override single knobs. When resuming, the run's own recipe is kept.")
@click.option("--epochs", type=int, default=None, help=recipe_help("epochs", "Epochs in total (also when resuming)."))
@click.option("--batch-size", type=int, default=None,
              help=recipe_help("batch_size", "Batch size PER PROCESS; the global batch is this x processes."))
@click.option("--lr", type=float, default=None, help=recipe_help("lr", "Adam learning rate (the peak for onecycle)."))
@click.option("--schedule", type=click.Choice(["constant", "onecycle"]), default=None,
              help=recipe_help("schedule", "Learning-rate schedule."))
@click.option("--mixed-precision", type=click.Choice(["auto", "no", "bf16", "fp16"]), default=None,
              help=recipe_help("mixed_precision", "Autocast precision; wins over `accelerate launch "
                               "--mixed_precision` (or `accelerate config`), which wins over the preset. auto = bf16 "
                               "on CPUs with native bf16 (AMX/AVX-512-BF16), fp32 elsewhere (measured faster on GPUs "
                               "for this CNN). fp16 needs a GPU."))
@click.option("--channels-last/--no-channels-last", default=None,
              help=recipe_help("channels_last", "channels_last memory format for the convolutions."))
@click.option("--label-smoothing", type=float, default=None, help=recipe_help("label_smoothing", "Label smoothing."))
@click.option("--augment/--no-augment", default=None,
              help=recipe_help("augment", "Random small rotation, scale and shift of training images."))
@click.option("--warmup", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help=recipe_help("warmup", "onecycle: the share of steps spent rising to the peak rate."))
@click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=None, metavar="DECAY",
              help=recipe_help("ema", "Keep an exponential moving average of the weights with this decay; it is "
                               "what gets evaluated, checkpointed as the model and exported. 0 = off."))
@click.option("--seed", default=None, type=int,
              help="Seed for initialisation, shuffling, augmentation. [default: 0, or the resumed run's]")
@click.option("--eval-batch-size", default=1000, show_default=True, type=int, help="Test batch size per process.")
@click.option("--resume", metavar="PATH|latest", default=None,
              help="Continue from a checkpoint file, or 'latest' in --output-dir, after its last finished epoch.")
@click.option("--limit-batches", type=int, default=None, metavar="N",
              help="Train at most N batches per epoch (smoke runs); evaluation still covers the whole test set. "
                   "A resumed run keeps its own.")
@click.option("--log-every", default=200, show_default=True, type=int, help="Print the loss every N batches.")
@click.option("--metrics-every", default=20, show_default=True, type=int, metavar="N",
              help="Record the train loss and learning rate every N steps (steps.jsonl, curves.png, trackers).")
@click.option("--report-to", type=click.Choice(["none", "tensorboard", "mlflow", "wandb", "all"]), default="none",
              show_default=True, help="Experiment tracking through Accelerate, written into --output-dir.")
@threads_option
@click.option("--overwrite", is_flag=True, help="Start afresh in an --output-dir that already holds a run.")
@download_option
@click.option("--cpu", is_flag=True, help="Train on the CPU even when a GPU is present.")
@friendly_errors
@requires("train")
def train(**options):
    """Train the CNN on MNIST; run under `accelerate launch` for several processes or machines."""
    from pathlib import Path

    from . import locks

    # A folder in use is refused before torch is imported and before --resume reads it; the job then holds it.
    locks.check_free(Path(options["output_dir"]) / locks.RUN_LOCK, f"--output-dir {options['output_dir']}")
    from .training.config import TrainConfig
    from .training.loop import run

    with interruptible(f"the finished epochs are kept in {options['output_dir']}; continue with the same command "
                       "and --resume latest"):
        run(TrainConfig(**options))


@main.command()
@click.argument("checkpoint", type=click.Path())
@data_dir_option
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Test batch size per process.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the metrics to this JSON file.")
@download_option
@click.option("--cpu", is_flag=True, help="Evaluate on the CPU even when a GPU is present.")
@threads_option
@friendly_errors
@requires("train")
def evaluate(checkpoint, data_dir, batch_size, json_path, download, cpu, threads):
    """Test accuracy and loss of CHECKPOINT (a file, or a run dir for its latest) on all 10,000 test images.

    Works under `accelerate launch` too: the images are sharded and counted once."""
    from . import atomic
    from .training.evaluate import evaluate_checkpoint

    if json_path:
        atomic.check_output_file(json_path, "--json")
    with interruptible("nothing was written; run it again"):
        metrics = evaluate_checkpoint(checkpoint, data_dir, batch_size, download, cpu, threads)
    if json_path and launched_rank() == 0:
        atomic.write_json(json_path, metrics)


@main.command("export")
@click.option("--checkpoint", "source", required=True, type=click.Path(),
              help="A checkpoint file, or a training --output-dir (its latest checkpoint).")
@click.option("--out-dir", type=click.Path(), help="Folder to create with the exported models.")
@click.option("--repository", type=click.Path(file_okay=False),
              help="Instead of --out-dir: a model repository (serve --model-repository), where the export becomes "
                   "the next version of --name, e.g. models/mnist/3/.")
@click.option("--name", default="mnist", show_default=True, help="The model's name in --repository.")
@data_dir_option
@click.option("--force", is_flag=True, help="Replace --out-dir if it exists (only once the new export is valid).")
@download_option
@friendly_errors
@requires("train")
def export_command(source, out_dir, repository, name, data_dir, force, download):
    """Export a checkpoint to TorchScript, ONNX and torch.export, validated on all 10,000 test images.

    The folder appears only when every artifact matches PyTorch; a failed export leaves nothing behind. With
    --repository, the new version appears in one rename: a server polling the repository never sees half of it."""
    from .exporting.export import export_model
    from .exporting.validate import format_report
    from .inference.repository import check_name
    from .scores import calibration_line

    if bool(out_dir) == bool(repository):
        raise UserError("give --out-dir, or --repository (and --name)")
    destination = Path(repository) / check_name(name) if repository else out_dir
    manifest, results, out_dir = export_model(source, destination, data_dir, force, download, log=click.echo,
                                              as_version=bool(repository))
    click.echo(format_report(results))
    calibration = manifest["calibration"]
    click.echo(f"Calibrated on {calibration['fitted_on']}; on the test set, "
               + calibration_line(calibration["test_before"], calibration["test_after"]))
    click.echo(f"Wrote {', '.join(manifest['files'])} and manifest.json to {out_dir}")


@main.command()
@click.argument("model_dir", type=click.Path())
@data_dir_option
@download_option
@friendly_errors
@requires("train")
def validate(model_dir, data_dir, download):
    """Re-check an export folder: hashes, the ONNX checker, and parity with PyTorch on the test set."""
    from .exporting.validate import format_report, validate_folder

    click.echo(format_report(validate_folder(model_dir, data_dir, download)))
    click.echo(f"{model_dir}: all artifacts match PyTorch")


@main.command()
@data_dir_option
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--start", default=59_000, show_default=True, type=int, help="Index of the first image shown.")
@click.option("--count", default=9, show_default=True, type=int, help="How many images (laid out in a square).")
@click.option("--out", default="grid.png", show_default=True, type=click.Path(dir_okay=False),
              help="PNG file to write.")
@download_option
@friendly_errors
@requires("train")
def preview(data_dir, split, start, count, out, download):
    """The tutorial's sample grid: images START.. of a split, each titled with its label."""
    from . import atomic
    from .data import mnist
    from .reports import plots

    atomic.check_output_file(out, "--out")
    source = mnist.find_source(data_dir)
    splits = {name: mnist.load_split(name, download=download, source=source) for name in ("train", "test")}
    click.echo(f"Training images: {len(splits['train'][1])}, test images: {len(splits['test'][1])}")
    images, labels = splits[split]
    if count <= 0 or not start >= 0 or start + count > len(labels):
        raise UserError(f"--start {start} --count {count} is outside the {len(labels)} {split} images")
    indices = list(range(start, start + count))
    titles = plots.sample_grid(images.numpy(), labels.numpy(), out, indices)
    click.echo(f"Wrote {out}: {split} images {start}..{start + count - 1}, titled {' '.join(titles)}")


@main.command()
@click.argument("run_dir", required=False, type=click.Path())
@click.option("--model-dir", type=click.Path(), help="An export folder: draw confusion.png, mistakes.png, report.md.")
@data_dir_option
@click.option("--limit", default=100, show_default=True, type=int, help="Most misclassified images to show.")
@download_option
@friendly_errors
@requires("train")
def report(run_dir, model_dir, data_dir, limit, download):
    """Pictures: RUN_DIR's training curves, and/or a test-set report for --model-dir."""
    from .reports import report as report_lib
    from .scores import calibration_line

    if not run_dir and not model_dir:
        raise UserError("give a training RUN_DIR, --model-dir DIR, or both")
    if run_dir:
        click.echo(f"Wrote {report_lib.run_curves(run_dir)}")
    if model_dir:
        summary = report_lib.model_report(model_dir, data_dir, download, limit=limit)
        calibration = summary["calibration"]
        click.echo(f"Accuracy {100 * summary['accuracy']:.2f}%, {summary['mistakes']} misclassified; "
                   + calibration_line(calibration["before"], calibration["after"]))
        click.echo(f"Wrote {', '.join(report_lib.PICTURES)} and {report_lib.REPORT} in {model_dir}")


@main.command()
@click.argument("model_dir", type=click.Path())
@data_dir_option
@click.option("--calibration-images", default=2000, show_default=True, type=click.IntRange(1, 60_000),
              help="Training images (never test images) used to calibrate activation ranges.")
@download_option
@friendly_errors
@requires("train")
def quantize(model_dir, data_dir, calibration_images, download):
    """Write MODEL_DIR/model.int8.onnx: onnxruntime static QDQ INT8, calibrated on training images."""
    from .exporting.quantize import quantize as run_quantize

    result = run_quantize(model_dir, data_dir, calibration_images, download, log=click.echo)
    click.echo(f"INT8 accuracy {100 * result['accuracy']:.2f}% (fp32 {100 * result['onnx_fp32_accuracy']:.2f}%, "
               f"drop {result['accuracy_drop_points']:.2f} points); manifest updated")


def csv_list(kind, minimum=None):
    """A click callback for comma-separated values, each checked as it would be on its own."""

    def parse(ctx, param, value):
        try:
            values = [kind(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list of {kind.__name__}, got {value!r}") from None
        if not values:
            raise click.BadParameter("give at least one value")
        bad = [v for v in values if minimum is not None and v < minimum]
        if bad:
            raise click.BadParameter(f"{', '.join(map(str, bad))}: each value must be at least {minimum}")
        return values

    return parse


@main.command()
@click.option("--model-dir", required=True, type=click.Path(), help="An export folder (see mnist-dist export).")
@data_dir_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full report here too.")
@click.option("--batch-sizes", default="1,64,1024,10000", show_default=True, callback=csv_list(int, minimum=1))
@click.option("--runtimes", "runtime_names", default="available", show_default=True, callback=csv_list(str),
              help="Which to compare, from onnxruntime-fp32, onnxruntime-int8, openvino-fp32, openvino-bf16 (CPUs "
                   "with native bf16), openvino-int8, pytorch-eager, torchscript; available: all this machine runs.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for every runtime (default: all cores).")
@click.option("--providers", default="CPUExecutionProvider", show_default=True, callback=csv_list(str),
              help="onnxruntime providers, e.g. CUDAExecutionProvider,CPUExecutionProvider (needs onnxruntime-gpu).")
@click.option("--seconds", default=3.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Timing budget per runtime and batch size.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use only the first N test images (smoke runs).")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Also write confusion.png, mistakes.png and report.md into the model dir.")
@download_option
@friendly_errors
@requires("train")
def bench(model_dir, data_dir, json_path, batch_sizes, runtime_names, threads, providers, seconds, limit, report,
          download):
    """Benchmark inference on the MNIST test set: onnxruntime fp32 / INT8 against PyTorch eager and TorchScript."""
    from pathlib import Path

    from . import atomic
    from .bench import inference as bench_lib
    from .reports import report as report_lib

    unknown = [name for name in runtime_names if name not in (*bench_lib.RUNTIMES, "available")]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; choose from {', '.join(bench_lib.RUNTIMES)}, "
                                 "available", param_hint="--runtimes")
    if json_path:
        atomic.check_output_file(json_path, "--json")
    names = None if runtime_names == ["available"] else [n for n in runtime_names if n != "available"]
    result = bench_lib.run(model_dir, data_dir, batch_sizes, names, threads, providers, seconds,
                           limit=limit, download=download, log=lambda *_: None)
    click.echo(bench_lib.format_table(result))
    for absent in result["providers"]["absent"]:
        click.echo(f"note: {absent} is not available in this onnxruntime build; ran on {result['providers']['used']}")
    atomic.write_json(Path(model_dir) / report_lib.BENCH_JSON, result)
    if json_path:
        atomic.write_json(json_path, result)
    if report:
        report_lib.model_report(model_dir, data_dir, download, bench=result)
        click.echo(f"Wrote {report_lib.REPORT}, {', '.join(report_lib.PICTURES)} in {model_dir}")
    off = sorted({r["runtime"] for r in result["results"] if r["valid"] is False})
    if off:
        raise UserError(f"{', '.join(off)}: accuracy off PyTorch's {100 * result['pytorch_test_accuracy']:.2f}% "
                        f"(fp32 must match exactly, bf16 and INT8 may lose {bench_lib.MAX_DROP_POINTS} points)")


@main.command()
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--model", "model_path", required=True, type=click.Path(),
              help="model.onnx, model.int8.onnx, model.ts or model.pt2; its manifest.json must sit beside it.")
@click.option("--out",
              help="Where the rows go, by extension: .csv, .json, .jsonl or .parquet; a path or a URL (s3://, gs://, "
                   "az://, file://). - or none: CSV on standard output (one process only).")
@click.option("--invert", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Make digits white on black: yes/no for every input, arrays included; auto inverts each image "
                   "or array row whose border is light.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run into the same --out: finished chunks are kept, the rest labelled.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Threads decoding images while the model runs. [default: the threads per process]")
@click.option("--chunk-size", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Most inputs per chunk: what is held in memory, written at once and skipped by --resume. Smaller "
                   "jobs use smaller chunks, so that there are 64 of them (of 64 inputs at least).")
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False),
              help="Also write the summary (counts, rates, runtimes, peak memory per process) as JSON here.")
@click.option("--runtime", type=click.Choice(RUNTIME_CHOICES), default="auto",
              show_default=True,
              help="For ONNX models. auto: the faster of onnxruntime and OpenVINO for --batch-size on this machine "
                   "(from bench.json beside the model, else OpenVINO from batches of 64 for INT8 models, and for fp32 "
                   "ones on AVX-512 CPUs); never bf16 unless asked; "
                   "onnxruntime on a GPU. openvino-bf16 needs a CPU with native bf16.")
@click.option("--storage-options", "storage_options", default="{}", metavar="JSON",
              help='Options for the storage of URL inputs and --out, beyond what its library reads from the '
                   'environment (for S3: AWS_* variables and ~/.aws), e.g. \'{"anon": true}\'.')
@click.option("--lease-ttl", "lease_ttl_s", default=60.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds without a renewal after which the lease on an --out in S3 is stale, and --resume may take "
                   "it over from a run that died.")
@click.option("--max-failed", metavar="N|FRACTION",
              help="Exit 2 when more than N inputs (or this fraction of them, e.g. 0.01) failed, once the output is "
                   "written. By default any number may fail: their rows say why, and the exit code is 0.")
@threads_option
@click.option("--cpu", is_flag=True, help="Stay on the CPU even when a GPU is present.")
@friendly_errors
def predict(inputs, model_path, out, invert, batch_size, resume, workers, chunk_size, summary_path, runtime,
            storage_options, lease_ttl_s, max_failed, threads, cpu):
    """Label INPUTS: image files (PNG, JPEG, BMP, GIF), folders, .npy arrays or MNIST IDX files, as paths or URLs
    (s3://bucket/scans/, 's3://bucket/scans/**/*.png', gs://..., https://.../digits.npy).

    Runs under `accelerate launch` over any number of processes or machines: each labels its own
    contiguous share, and the main process writes one --out in input order. An input that cannot be read
    gets a row saying why and every other input is still labelled; the exit code is 2 only past
    --max-failed. Restarted by `accelerate launch --max_restarts N`, it continues from the finished chunks."""
    from . import atomic
    from .inference.outputs import to_stdout
    from .inference.predict import JobOptions, describe, failure_limit, failures_line, run_job, too_many_failed

    limit = failure_limit(max_failed)
    if summary_path:
        atomic.check_output_file(summary_path, "--summary")
    options = JobOptions(inputs, model_path, out, invert, batch_size, resume, workers, threads, cpu, chunk_size,
                         runtime, storage_options=parse_storage_options(storage_options), lease_ttl_s=lease_ttl_s)
    hint = (f"the finished chunks are kept beside {out}; continue with the same command and --resume"
            if not to_stdout(out) else "nothing was written; run it again")
    with interruptible(hint):
        summary = run_job(options, echo=click.echo)
    if launched_rank() == 0:
        click.echo(describe(summary, None if to_stdout(out) else out), err=True)
        if summary_path:
            atomic.write_json(summary_path, summary)
        if summary["failed"]:
            click.echo(failures_line(summary, limit), err=True)
    if too_many_failed(summary, limit):  # every process holds the same summary, and exits the same way
        exit_alike(2)


def parse_storage_options(text: str) -> dict:
    try:
        options = json.loads(text)
    except ValueError as e:
        raise UserError(f"--storage-options is not JSON ({e})") from None
    if not isinstance(options, dict):
        raise UserError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return options


def parse_restricted_api(text: str | None):
    """Triton's --http-restricted-api CATEGORY:HEADER=VALUE: (header, value) of the key, or None."""
    if text is None:
        return None
    category, _, key = text.partition(":")
    header, _, value = key.partition("=")
    if category not in RESTRICTED_CATEGORIES or not header or not value:
        raise UserError(f"--http-restricted-api {text!r}: expected {RESTRICTED_CATEGORIES[0]}:HEADER=VALUE, e.g. "
                        "model-repository:admin-key=s3cret")
    return header.lower(), value


@main.command()
@click.option("--model-repository", "repository", envvar="STORAGE_URI", show_envvar=True,
              help="A model repository, <name>/<version>/ export folders (mnist-dist export --repository), or one "
                   "export folder; a path or a URL (s3://bucket/models, gs://...), copied to a local cache and "
                   "checked against each manifest's sha256.")
@click.option("--model-dir", type=click.Path(),
              help="One export folder (mnist-dist export): a repository of one model, --model-name, version 1.")
@click.option("--model", "model_file", default=serve_default("model"), show_default=True,
              help="Which ONNX file of each version's folder to serve: model.onnx or model.int8.onnx (a model's "
                   "config.json may name its own, as default_model_filename).")
@click.option("--model-control-mode", "control_mode", type=click.Choice(CONTROL_MODES),
              default=serve_default("control_mode"), show_default=True,
              help="none: the models loaded at start stay. explicit: the repository API loads and unloads them "
                   "(POST /v2/repository/models/NAME/load). poll: the repository is rescanned every "
                   "--repository-poll-s, new versions loaded, removed ones unloaded. A new version takes traffic "
                   "only once it is loaded and warm; a failed load leaves the serving version serving.")
@click.option("--repository-poll-s", "poll_s", default=serve_default("poll_s"), show_default=True,
              type=click.FloatRange(min=0.1), help="Seconds between scans of the repository in poll mode.")
@click.option("--version-policy", default=serve_default("version_policy"), show_default=True,
              help="Which versions of each model to serve: latest:N, all, or specific:1,3 (a model's config.json "
                   "may set its own).")
@click.option("--http-restricted-api", "restricted_api", metavar="model-repository:HEADER=VALUE",
              help="Only callers sending this header with this value may use the repository API; others get 403. "
                   "Inference stays open.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where versions of a remote repository are copied.  [default: ~/.cache/mnist-dist/repositories]")
@click.option("--runtime", type=click.Choice(RUNTIME_CHOICES), default=serve_default("runtime"),
              show_default=True,
              help="auto: the faster for batches of --max-batch on this machine, as under load (bench.json beside "
                   "the model, else as measured: OpenVINO, if installed, from batches of 64 with AVX-512 or for "
                   "int8 models; onnxruntime otherwise); openvino-bf16 needs native bf16.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default answers this machine only; 0.0.0.0 opens it to the network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@threads_option
@click.option("--batching/--no-batching", default=serve_default("batching"), show_default=True,
              help="Gather concurrent requests into one model run.")
@click.option("--max-batch", default=serve_default("max_batch"), show_default=True, type=click.IntRange(min=1),
              help="Most images in one micro-batch.")
@click.option("--max-wait-ms", default=serve_default("max_wait_ms"), show_default=True,
              type=click.FloatRange(min=0),
              help="Longest a request waits for others to join its batch. 0: batches still form from the requests "
                   "that arrive while the model runs, and a lone request never waits.")
@click.option("--max-body-mb", default=serve_default("max_body") / 2**20, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Larger request bodies are refused with 413.")
@click.option("--max-pixels", default=serve_default("max_pixels"), show_default=True, type=click.IntRange(min=1),
              help="Images with more pixels (read from their header, before decoding) are refused.")
@click.option("--max-queue", default=serve_default("max_queue"), show_default=True, type=click.IntRange(min=0),
              help="Most images waiting for the model; past it requests get 503 with Retry-After at once. 0: no "
                   "bound.")
@click.option("--timeout-s", default=serve_default("timeout_s"), show_default=True, type=click.FloatRange(min=0),
              help="Longest a request waits for the model before it gets 504. 0: no limit.")
@click.option("--drain-s", default=serve_default("drain_s"), show_default=True, type=click.FloatRange(min=0),
              help="On SIGTERM or SIGINT: not ready at once, every request taken is answered, exit within this.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Server processes on the one port, each with its own model sessions; the cores are split "
                   "between them.")
@click.option("--model-threads", default=serve_default("model_threads"), show_default=True,
              type=click.IntRange(min=1),
              help="Threads taking batches to the model in each server process: with two, one prepares and answers "
                   "while the other is in the model. On 2 cores one answered more requests.")
@click.option("--model-name", "model_name", default=serve_default("model_name"), show_default=True,
              help="The model's name when the repository is one export folder, and the model /v1 and the page use.")
@click.option("--access-log", type=click.Path(dir_okay=False, allow_dash=True),
              help="Append one JSON line a request to this file ('-': standard output).")
@friendly_errors
@requires("serve")
def serve(repository, model_dir, model_file, control_mode, poll_s, version_policy, restricted_api, cache_dir, runtime,
          host, port, threads, batching, max_batch, max_wait_ms, max_body_mb, max_pixels, max_queue, timeout_s,
          drain_s, workers, model_threads, model_name, access_log):
    """Serve exported models over HTTP: the Open Inference Protocol (/v2/..., versioned routes too), Triton's
    repository API (/v2/repository/...), a simpler JSON API (POST /v1/predict), Prometheus metrics (/metrics),
    liveness (/healthz, /v2/health/live), readiness (/v2/health/ready) and a page at / to draw a digit on.

    New versions go live without a restart: --model-control-mode explicit or poll. Needs the serve extra
    (pip install "mnist-dist[serve]")."""
    from .serving.server import serve as run_server

    if model_dir and repository and repository != os.environ.get("STORAGE_URI"):
        raise UserError("give --model-dir or --model-repository, not both")
    if not (model_dir or repository):
        raise UserError("give --model-repository (or $STORAGE_URI), or --model-dir")
    if model_dir and not (Path(model_dir) / "manifest.json").is_file():
        raise UserError(f"{model_dir} has no manifest.json: --model-dir is one export folder (mnist-dist export); "
                        "use --model-repository for a repository of them")
    options = ServeOptions(model_dir or repository, model_file, threads, batching, max_batch, max_wait_ms,
                           int(max_body_mb * 2**20), runtime, model_name, max_queue, timeout_s, max_pixels, drain_s,
                           access_log, model_threads, control_mode, poll_s, version_policy,
                           parse_restricted_api(restricted_api), cache_dir)
    run_server(options, host, port, workers, log=click.echo)


if __name__ == "__main__":
    main()
