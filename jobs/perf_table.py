"""Regenerate the generated tables of README.md and docs/*.md from the committed benchmark JSON and the code;
never edit them by hand.

    python jobs/perf_table.py             # rewrites each table between its markers, in whichever page holds them
    python jobs/perf_table.py --check     # exit 1 if any table is out of date

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
    "serve-swap": ("mnist_dist.bench.serve:swap_table", ["benchmarks/serve-swap-cpu-avx512.json"]),
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
    """``text`` with the table between NAME's markers replaced; ``text`` unchanged where it has no markers."""
    start, end = f"<!-- {name}-table:start -->", f"<!-- {name}-table:end -->"
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}\n{end}{tail}"


def pages(root: Path) -> list:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


@click.command()
@click.option("--root", default=".", show_default=True, type=click.Path(exists=True, file_okay=False),
              help="The checkout whose README.md and docs/*.md hold the tables.")
@click.option("--check", is_flag=True, help="Only check that the tables are up to date.")
def main(root, check):
    """Write (or --check) every generated table in README.md and docs/*.md."""
    root = Path(root)
    texts = {page: page.read_text() for page in pages(root)}
    updated = dict(texts)
    for name in TABLES:
        table = render(name, root)
        placed = {page: replace_table(text, name, table) for page, text in updated.items()}
        if all(f"<!-- {name}-table:start -->" not in text for text in placed.values()):
            raise click.ClickException(f"no page has the <!-- {name}-table:start --> ... end markers")
        updated = placed
    stale = [page for page in texts if updated[page] != texts[page]]
    names = ", ".join(str(page.relative_to(root)) for page in stale)
    if check:
        if stale:
            raise click.ClickException(f"generated tables out of date in {names}: run jobs/perf_table.py")
        return
    for page in stale:
        write_text(page, updated[page])
    click.echo(f"Updated {len(stale)} page(s): {names or 'none needed'}")


if __name__ == "__main__":
    main()
