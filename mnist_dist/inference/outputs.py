"""predict's output: one row per input, as CSV, a JSON array, JSON lines or Parquet, written piece by piece."""
from __future__ import annotations

import csv
import io
import json
import textwrap
from pathlib import PurePosixPath

from .. import extras
from ..errors import UserError
from .inputs import Item

COLUMNS = ("input", "prediction", "confidence", "top3", "error")


def rows_for(items: list, good: list, probabilities, manifest: dict, with_probabilities: bool = False) -> list:
    """One row per item, in order: the model's answer for the good ones (``probabilities``: theirs, as
    ``manifest.probabilities`` gives them; None if there are none), the error for the others. With
    ``with_probabilities``, each row also carries all of them, one per class."""
    names = [int(c) for c in manifest["classes"]]
    classes = range(len(names))
    # Plain Python numbers, and each row's three best by a sort of its ten (stable: ties, the lower class first):
    # for the one or few images of a served request, numpy's per-call cost is most of the work.
    answers = iter(probabilities.tolist() if good else ())
    rows = []
    for item in items:
        p = None if item.error else next(answers)
        top = None if p is None else sorted(classes, key=p.__getitem__, reverse=True)[:3]
        row = make_row(item, names, p, top)
        if with_probabilities:
            row["probabilities"] = p
        rows.append(row)
    return rows


def make_row(item: Item, names: list, p: list | None, top: list | None) -> dict:
    """predict's output row: the best class and its probability, the three best, or the item's error."""
    if p is None or top is None:
        return {"input": item.name, "prediction": None, "confidence": None, "top3": [], "error": item.error}
    return {"input": item.name, "prediction": names[top[0]], "confidence": p[top[0]],
            "top3": [[names[c], p[c]] for c in top], "error": ""}


FORMATS = (".csv", ".json", ".jsonl", ".parquet")


def to_stdout(out) -> bool:
    """--out - or no --out: CSV on standard output."""
    return out is None or str(out) == "-"


class Format:
    """predict's output, chosen by --out's extension: CSV (also ``-``, standard output), a JSON array, JSON lines
    or Parquet. Each is written piece by piece, one piece per chunk: the same file however the rows are split
    (for Parquet, one row group per chunk)."""

    def __init__(self, out: str | None):
        suffix = ".csv" if to_stdout(out) else PurePosixPath(str(out)).suffix.lower()
        if suffix not in FORMATS:
            raise UserError(f"--out {out}: give a file ending in {', '.join(FORMATS)}, or - for CSV on standard "
                            "output")
        self.name = suffix[1:]
        if self.name == "parquet":
            extras.require("parquet", "--out *.parquet")

    def body(self, rows: list) -> bytes:
        """One chunk's rows, ready to be joined with the others'."""
        if self.name == "parquet":
            return parquet_bytes(rows)
        if self.name == "json":
            return ",\n".join(textwrap.indent(json.dumps(row, indent=1), " ") for row in rows).encode()
        if self.name == "jsonl":
            return "".join(json.dumps(row) + "\n" for row in rows).encode()
        return csv_text(rows).encode()

    def head(self) -> bytes:
        return {"csv": ",".join(COLUMNS) + "\n", "json": "[\n"}.get(self.name, "").encode()

    def write(self, f, bodies) -> None:
        """Join the chunks' bodies, in order, into the binary file ``f``."""
        if self.name == "parquet":
            return write_parquet(f, bodies)
        f.write(self.head())
        for k, body in enumerate(bodies):
            if k and self.name == "json":
                f.write(b",\n")
            f.write(body)
        if self.name == "json":
            f.write(b"\n]\n")


def csv_text(rows: list) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    for row in rows:
        writer.writerow({**row, "confidence": "" if row["confidence"] is None else f"{row['confidence']:.6f}",
                         "prediction": "" if row["prediction"] is None else row["prediction"],
                         "top3": " ".join(f"{d}:{p:.4f}" for d, p in row["top3"])})
    return buffer.getvalue()


def parquet_schema():
    import pyarrow as pa

    return pa.schema([("input", pa.string()), ("prediction", pa.int64()), ("confidence", pa.float64()),
                      ("top3", pa.list_(pa.int64())), ("error", pa.string())])


def parquet_table(rows: list):
    """The rows as typed columns: a failed input has no prediction or confidence (null), an empty top3, an error."""
    import pyarrow as pa

    columns = {"input": [r["input"] for r in rows], "prediction": [r["prediction"] for r in rows],
               "confidence": [r["confidence"] for r in rows], "top3": [[c for c, _ in r["top3"]] for r in rows],
               "error": [r["error"] for r in rows]}
    return pa.Table.from_pydict(columns, schema=parquet_schema())


def parquet_bytes(rows: list) -> bytes:
    import pyarrow.parquet as pq

    f = io.BytesIO()
    pq.write_table(parquet_table(rows), f)
    return f.getvalue()


def write_parquet(f, bodies) -> None:
    """One Parquet file, one row group per chunk (at most --chunk-size rows: a reader's memory stays bounded)."""
    import pyarrow.parquet as pq

    with pq.ParquetWriter(f, parquet_schema()) as writer:
        for body in bodies:
            table = pq.read_table(io.BytesIO(body))
            writer.write_table(table, row_group_size=max(1, table.num_rows))
