"""Benchmark training: the tutorial as written against the project's pipeline, in one run.

    python jobs/bench_train.py --json benchmarks/train-cpu.json        # full (minutes)
    python jobs/bench_train.py --quick                                 # a smoke run
    python jobs/bench_train.py --launchers accelerate,python           # the README's command against plain python
    python jobs/bench_train.py --seeds 0,1,2,3,4                       # the default recipe's spread over 5 seeds

The pipeline runs as the README runs it, `accelerate launch jobs/train.py`. Reports images/s and
their ratio, and the training time to 99.0% and 99.2% test accuracy (checked after each epoch);
the JSON records the machine and the versions.
"""
from pathlib import Path

import click

from mnist_dist import atomic
from mnist_dist.bench.train import LAUNCHERS, benchmark, format_table

TRAIN_SCRIPT = Path(__file__).resolve().with_name("train.py")


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="torchvision root holding MNIST/raw (default: the copy bundled with mnist-dist).")
@click.option("--quick", is_flag=True, help="A few batches of each: checks the benchmark runs, measures little.")
@click.option("--presets", default="fast", show_default=True, help="Comma-separated presets to run.")
@click.option("--processes", default="1", show_default=True,
              help="Comma-separated process counts (same global batch); 1,2 compares gloo on the CPU.")
@click.option("--launchers", default="accelerate", show_default=True,
              help=f"Comma-separated launchers for the 1-process runs: {', '.join(LAUNCHERS)}.")
@click.option("--seeds", default="0", show_default=True,
              help="Comma-separated seeds: each preset runs once per seed, and the report gives the spread.")
@click.option("--tutorial-epochs", default=8, show_default=True,
              help="Cap on the tutorial's epochs (it stops early once it reaches 99.2%).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here.")
@click.argument("train_args", nargs=-1)
def main(data_dir, quick, presets, processes, launchers, seeds, tutorial_epochs, json_path, train_args):
    """TRAIN_ARGS after -- go to every jobs/train.py run (e.g. -- --batch-size 512)."""
    launchers = launchers.split(",")
    if set(launchers) - set(LAUNCHERS):
        raise click.BadParameter(f"choose from {', '.join(LAUNCHERS)}", param_hint="--launchers")
    if json_path:
        atomic.check_output_file(json_path, "--json")
    report = benchmark(TRAIN_SCRIPT, data_dir, quick, presets.split(","), [int(n) for n in processes.split(",")],
                       tutorial_epochs, list(train_args), launchers, [int(s) for s in seeds.split(",")])
    click.echo(format_table(report))
    if json_path:
        atomic.write_json(json_path, report)
        click.echo(f"Wrote {json_path}")


if __name__ == "__main__":
    main()
