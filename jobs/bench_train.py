"""Benchmark training: the tutorial as written against the project's pipeline, in one run.

    python jobs/bench_train.py --json benchmarks/train-cpu.json        # full (minutes)
    python jobs/bench_train.py --quick                                 # a smoke run

Reports images/s and their ratio, and the training time to 99.0% and 99.2% test accuracy
(checked after each epoch); the JSON records the machine and the versions.
"""
import click

from mnist_dist import atomic, data
from mnist_dist.training.benchmark import benchmark, format_table


@click.command()
@click.option("--data-dir", envvar="MNIST_DATA_DIR", help="torchvision root holding MNIST/raw.")
@click.option("--quick", is_flag=True, help="A few batches of each: checks the benchmark runs, measures little.")
@click.option("--presets", default="fast", show_default=True, help="Comma-separated presets to run.")
@click.option("--processes", default="1", show_default=True,
              help="Comma-separated process counts (same global batch); 1,2 compares gloo on the CPU.")
@click.option("--tutorial-epochs", default=8, show_default=True,
              help="Cap on the tutorial's epochs (it stops early once it reaches 99.2%).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here.")
@click.argument("train_args", nargs=-1)
def main(data_dir, quick, presets, processes, tutorial_epochs, json_path, train_args):
    """TRAIN_ARGS after -- go to every jobs/train.py run (e.g. -- --batch-size 512)."""
    root = data.resolve_data_dir(data_dir)
    report = benchmark(root, quick, presets.split(","), [int(n) for n in processes.split(",")],
                       tutorial_epochs, list(train_args))
    click.echo(format_table(report))
    if json_path:
        atomic.write_json(json_path, report)
        click.echo(f"Wrote {json_path}")


if __name__ == "__main__":
    main()
