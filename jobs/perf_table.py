"""Regenerate the README's benchmark tables from the committed benchmark JSON; never edit them by hand.

    python jobs/perf_table.py             # rewrites each table in README.md between its markers
    python jobs/perf_table.py --check     # exit 1 if any table in README.md is out of date

Each table sits between <!-- NAME-table:start --> and <!-- NAME-table:end --> and is drawn by its
benchmark's own module from the files listed here.
"""
import importlib
import json
from pathlib import Path

import click

from mnist_dist.atomic import write_text

# table name -> (renderer "module:function", the reports behind it, newest machine first)
TABLES = {
    "presets": ("mnist_dist.training.config:readme_table", []),
    "metrics": ("mnist_dist.serving.metrics:readme_table", []),
    "perf": ("mnist_dist.bench.train:readme_table",
             ["benchmarks/train-cpu-avx512.json", "benchmarks/train-cpu-avx512-fp32.json",
              "benchmarks/train-cpu-avx512-best.json", "benchmarks/train-cpu-avx512-launchers.json",
              "benchmarks/train-cpu-avx2.json", "benchmarks/train-cpu-avx2-best.json", "benchmarks/train-h100.json"]),
    "inference": ("mnist_dist.bench.inference:readme_table",
                  ["benchmarks/inference-cpu-avx512.json", "benchmarks/inference-cpu-avx2.json"]),
    "calibration": ("mnist_dist.bench.inference:calibration_table",
                    ["benchmarks/inference-cpu-avx2.json", "benchmarks/inference-cpu-avx2-best.json"]),
    "predict": ("mnist_dist.bench.predict:readme_table",
                ["benchmarks/predict-cpu-avx2-deploy.json", "benchmarks/predict-cpu-avx512.json"]),
    "predict-s3": ("mnist_dist.bench.predict:s3_table", ["benchmarks/predict-s3-cpu-avx2.json"]),
    "serve": ("mnist_dist.bench.serve:readme_table",
              ["benchmarks/serve-cpu-avx2.json", "benchmarks/serve-cpu-avx512.json"]),
}


def render(name: str, root: Path) -> str:
    target, files = TABLES[name]
    module, function = target.split(":")
    reports = []
    for path in files:
        report = json.loads((root / path).read_text())
        report["_source"] = f"`{path}`"
        reports.append(report)
    return getattr(importlib.import_module(module), function)(reports)


def replace_table(text: str, name: str, table: str) -> str:
    start, end = f"<!-- {name}-table:start -->", f"<!-- {name}-table:end -->"
    if start not in text or end not in text:
        raise click.ClickException(f"the README has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}\n{end}{tail}"


@click.command()
@click.option("--readme", default="README.md", show_default=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--check", is_flag=True, help="Only check that the README's tables are up to date.")
def main(readme, check):
    """Write (or --check) every benchmark table in the README from the committed benchmark files."""
    readme = Path(readme)
    text = readme.read_text()
    updated = text
    for name in TABLES:
        updated = replace_table(updated, name, render(name, readme.parent))
    if check:
        if updated != text:
            raise click.ClickException(f"{readme}'s benchmark tables are out of date: run jobs/perf_table.py")
        return
    write_text(readme, updated)
    click.echo(f"Updated {len(TABLES)} table(s) in {readme}")


if __name__ == "__main__":
    main()
