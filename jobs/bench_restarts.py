"""Benchmark how reliably predict heals: 2 gloo processes under `accelerate launch --max_restarts 3`, one worker
SIGKILLed twice a run, run after run; beside an earlier checkout in the same invocation when one is given.

    python jobs/bench_restarts.py --model artifacts/mnist/model.onnx --runs 8 \\
        --baseline-src /path/to/older/checkout --json benchmarks/restarts-cpu.json
"""
from pathlib import Path

import click

from mnist_dist import atomic
from mnist_dist.bench.restarts import benchmark

HERE = Path(__file__).resolve().parents[1]


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False), help="An exported ONNX model.")
@click.option("--runs", default=8, show_default=True, type=click.IntRange(min=1), help="Killed runs per checkout.")
@click.option("--rows", default=200_000, show_default=True, type=click.IntRange(min=50_000),
              help="Rows of the array (test digits repeated).")
@click.option("--baseline-src", type=click.Path(exists=True, file_okay=False),
              help="A checkout of an earlier mnist-dist, run the same way first.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here.")
def main(model, runs, rows, baseline_src, json_path):
    srcs = {"baseline": baseline_src, "this": str(HERE)} if baseline_src else {"this": str(HERE)}
    report = benchmark(str(Path(model).resolve()), runs, rows, srcs, log=click.echo)
    for name, result in report["variants"].items():
        click.echo(f"{name}: {result['clean']} of {runs} runs clean (exit 0, the uninterrupted run's bytes)")
    if json_path:
        atomic.write_json(json_path, report)


if __name__ == "__main__":
    main()
