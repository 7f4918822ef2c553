"""The ``mnist-dist`` command group. Each command is a thin shell over a library module."""
import functools
import warnings

import click

from .errors import UserError


def friendly_errors(func):
    """Turn UserError into click's one-line 'Error: ...' and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mnist-dist")
def main():
    """Train, export and serve the MNIST CNN."""


data_dir_option = click.option(
    "--data-dir", envvar="MNIST_DATA_DIR", show_envvar=True, type=click.Path(file_okay=False),
    help="torchvision root holding MNIST/raw (default: ./data; downloaded there if missing and online).",
)


@main.command()
@data_dir_option
@click.option("--output-dir", default="runs/mnist", show_default=True, type=click.Path(),
              help="Where checkpoints, metrics and the resolved config go.")
@click.option("--epochs", default=8, show_default=True, type=int, help="Epochs to train (in total, when resuming).")
@click.option("--batch-size", default=64, show_default=True, type=int,
              help="Batch size PER PROCESS; the global batch is this times the number of processes.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate (peak rate for onecycle).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for initialisation and shuffling.")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default="no", show_default=True,
              help="Autocast precision (bf16 works on recent CPUs and GPUs; fp16 needs a GPU).")
@click.option("--schedule", type=click.Choice(["constant", "onecycle"]), default="constant", show_default=True,
              help="Learning-rate schedule.")
@click.option("--channels-last/--no-channels-last", default=False, show_default=True,
              help="Use the channels_last memory format for convolutions.")
@click.option("--eval-batch-size", default=1000, show_default=True, type=int, help="Test batch size per process.")
@click.option("--resume", metavar="PATH|latest", default=None,
              help="Continue from a checkpoint file, or 'latest' in --output-dir, after its last finished epoch.")
@click.option("--limit-batches", type=int, default=None, metavar="N",
              help="Train at most N batches per epoch (smoke runs); evaluation still covers the whole test set.")
@click.option("--log-every", default=200, show_default=True, type=int, help="Print the loss every N batches.")
@click.option("--overwrite", is_flag=True, help="Start afresh in an --output-dir that already holds a run.")
@click.option("--download/--no-download", default=True, show_default=True,
              help="Let torchvision download MNIST when it is not found.")
@click.option("--cpu", is_flag=True, help="Train on the CPU even when a GPU is present.")
@friendly_errors
def train(**options):
    """Train the CNN on MNIST; run under `accelerate launch` for several processes or machines."""
    from .config import TrainConfig
    from .train import run

    run(TrainConfig(**options))


@main.command()
@click.argument("checkpoint", type=click.Path())
@data_dir_option
@click.option("--batch-size", default=1000, show_default=True, type=int, help="Test batch size per process.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the metrics to this JSON file.")
@click.option("--download/--no-download", default=True, show_default=True,
              help="Let torchvision download MNIST when it is not found.")
@click.option("--cpu", is_flag=True, help="Evaluate on the CPU even when a GPU is present.")
@friendly_errors
def evaluate(checkpoint, data_dir, batch_size, json_path, download, cpu):
    """Test accuracy and loss of CHECKPOINT (a file, or a run dir for its latest) on all 10,000 test images.

    Works under `accelerate launch` too: the images are sharded and counted once."""
    import os

    from . import atomic
    from .evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(checkpoint, data_dir, batch_size, download, cpu)
    if json_path and int(os.environ.get("RANK", "0")) == 0:
        atomic.write_json(json_path, metrics)


@main.command("export")
@click.option("--checkpoint", "source", required=True, type=click.Path(),
              help="A checkpoint file, or a training --output-dir (its latest checkpoint).")
@click.option("--out-dir", required=True, type=click.Path(), help="Folder to create with the exported models.")
@data_dir_option
@click.option("--force", is_flag=True, help="Replace --out-dir if it exists (only once the new export is valid).")
@click.option("--download/--no-download", default=True, show_default=True,
              help="Let torchvision download MNIST when it is not found.")
@friendly_errors
def export_command(source, out_dir, data_dir, force, download):
    """Export a checkpoint to TorchScript, ONNX and torch.export, validated on all 10,000 test images.

    The folder appears only when every artifact matches PyTorch; a failed export leaves nothing behind."""
    from .export import export_model
    from .validate import format_report

    manifest, results = export_model(source, out_dir, data_dir, force, download, log=click.echo)
    click.echo(format_report(results))
    click.echo(f"Wrote {', '.join(manifest['files'])} and manifest.json to {out_dir}")


@main.command()
@click.argument("model_dir", type=click.Path())
@data_dir_option
@click.option("--download/--no-download", default=True, show_default=True,
              help="Let torchvision download MNIST when it is not found.")
@friendly_errors
def validate(model_dir, data_dir, download):
    """Re-check an export folder: hashes, the ONNX checker, and parity with PyTorch on the test set."""
    from .validate import format_report, validate_folder

    click.echo(format_report(validate_folder(model_dir, data_dir, download)))
    click.echo(f"{model_dir}: all artifacts match PyTorch")


if __name__ == "__main__":
    main()
