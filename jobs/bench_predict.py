"""Benchmark predict end to end: 20,000 PNGs, 2,000 large JPEG photos and a 1,000,000-row .npy, at 1 and 2
processes, beside an earlier version of the project when one is given; and the PNGs and the array read from an
S3-compatible server on loopback beside the same files on local disk (--sets pngs,npy,pngs@s3,npy@s3).

    python jobs/bench_predict.py --model artifacts/mnist/model.onnx --json benchmarks/predict-cpu.json \\
        --baseline-src /path/to/older/checkout

The sets are written once into --work-dir and reused. Then `python jobs/perf_table.py` puts the table
in the README.
"""
import tempfile
from pathlib import Path

import click

from mnist_dist import atomic
from mnist_dist.bench.predict import DEFAULT_SETS, QUICK_SETS, SETS, benchmark, format_table

PREDICT_SCRIPT = Path(__file__).resolve().with_name("predict.py")


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False), help="An exported model file.")
@click.option("--work-dir", type=click.Path(file_okay=False),
              default=str(Path(tempfile.gettempdir()) / "mnist-dist-predict-sets"), show_default=True,
              help="Where the input sets are written (about 1.2 GB) and kept for the next run.")
@click.option("--sets", default=",".join(DEFAULT_SETS), show_default=True,
              help=f"Comma-separated sets to run, of {', '.join(SETS)}. The @s3 sets are the same files read from "
                   "moto's S3 server on loopback (needs the dev extra).")
@click.option("--processes", default="1,2", show_default=True,
              help="Comma-separated process counts under `accelerate launch`; 'plain' is one process without it.")
@click.option("--baseline-src", type=click.Path(exists=True, file_okay=False),
              help="A checkout of an earlier mnist-dist whose `predict` runs first, for comparison.")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1),
              help="Runs of each command; the fastest counts.")
@click.option("--quick", is_flag=True, help="Small sets: checks the benchmark runs, measures little.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here.")
@click.option("--baseline-note", default="", help="What the baseline is, for the README's table.")
def main(model, work_dir, sets, processes, baseline_src, repeats, quick, json_path, baseline_note):
    names = [s for s in sets.split(",") if s]
    if set(names) - set(SETS):
        raise click.BadParameter(f"choose from {', '.join(SETS)}", param_hint="--sets")
    if json_path:
        atomic.check_output_file(json_path, "--json")
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    sizes = {name: (QUICK_SETS if quick else SETS)[name] for name in names}
    counts = [n if n == "plain" else int(n) for n in processes.split(",")]
    report = benchmark(model, PREDICT_SCRIPT, work_dir, sizes, counts, baseline_src,
                       log=click.echo, repeats=1 if quick else repeats, baseline_note=baseline_note)
    click.echo(format_table(report))
    if json_path:
        atomic.write_json(json_path, report)
        click.echo(f"Wrote {json_path}")


if __name__ == "__main__":
    main()
