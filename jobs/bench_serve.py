"""Load benchmark of the HTTP server on loopback, in one run: a bare FastAPI endpoint (the framework's ceiling), the
/v1 API and the Open Inference Protocol (binary and JSON tensors) at 1, 8 and 32 clients, micro-batching off, two
workers, and an overload row; each server's start-up and peak memory; beside an earlier version when one is given.

    python jobs/bench_serve.py --model-dir artifacts/mnist --json benchmarks/serve-cpu.json \
        --baseline-src /path/to/older/checkout

Then `python jobs/perf_table.py` puts the table in the README.
"""
import click

from mnist_dist import atomic
from mnist_dist.bench.serve import CLIENTS, benchmark


@click.command()
@click.option("--model-dir", required=True, type=click.Path(exists=True, file_okay=False), help="An export folder.")
@click.option("--clients", default=",".join(map(str, CLIENTS)), show_default=True,
              help="Comma-separated numbers of concurrent clients.")
@click.option("--seconds", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Measured time per setting, after a one-second warm-up.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Times each setting is measured, the settings taking turns; each row is its median round.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="The server's --threads.")
@click.option("--baseline-src", type=click.Path(exists=True, file_okay=False),
              help="A checkout of an earlier mnist-dist whose server runs beside this one, for comparison.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here.")
def main(model_dir, clients, seconds, rounds, threads, baseline_src, json_path):
    if json_path:
        atomic.check_output_file(json_path, "--json")
    report = benchmark(model_dir, [int(c) for c in clients.split(",")], seconds, threads=threads,
                       baseline_src=baseline_src, log=click.echo, rounds=rounds)
    if json_path:
        atomic.write_json(json_path, report)
        click.echo(f"Wrote {json_path}")


if __name__ == "__main__":
    main()
