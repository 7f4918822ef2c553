"""predict's output: one row per input, as CSV or a JSON array written piece by piece."""
import csv
import io
import json
import textwrap
from pathlib import Path

import numpy as np

from . import manifest as manifest_lib
from .inputs import Item

COLUMNS = ("input", "prediction", "confidence", "top3", "error")


def rows_for(items: list, good: list, logits, manifest: dict, probabilities: bool = False) -> list:
    """One row per item, in order: the model's answer for the good ones, the error for the others.
    With ``probabilities``, each row also carries all of them, one per class."""
    classes = manifest["classes"]
    scores = np.zeros((len(items), len(classes)))
    if good:
        scores[good] = manifest_lib.probabilities(logits, manifest)
    # The top three of every row at once, then plain Python numbers: per row, numpy calls cost more than the work.
    top = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    top_scores = np.take_along_axis(scores, top, axis=1).tolist()
    names = [int(c) for c in classes]
    rows = [make_row(item, [names[c] for c in top_row], p) for item, top_row, p in zip(items, top.tolist(), top_scores)]
    if probabilities:
        rows = [{**row, "probabilities": None if row["error"] else scores[i].tolist()} for i, row in enumerate(rows)]
    return rows


def make_row(item: Item, top_classes: list, top_scores: list) -> dict:
    """predict's output row: the best class and its probability, the three best, or the item's error."""
    if item.error:
        return {"input": item.name, "prediction": None, "confidence": None, "top3": [], "error": item.error}
    return {"input": item.name, "prediction": top_classes[0], "confidence": top_scores[0],
            "top3": [[c, p] for c, p in zip(top_classes, top_scores)], "error": ""}


class Format:
    """CSV, or a JSON array (--out *.json), written piece by piece: the same bytes however it is split."""

    def __init__(self, out):
        self.json = out is not None and Path(out).suffix.lower() == ".json"
        self.name = "json" if self.json else "csv"

    def head(self) -> str:
        return "[\n" if self.json else ",".join(COLUMNS) + "\n"

    def body(self, rows: list) -> str:
        if self.json:
            return ",\n".join(textwrap.indent(json.dumps(row, indent=1), " ") for row in rows)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        for row in rows:
            writer.writerow({**row, "confidence": "" if row["confidence"] is None else f"{row['confidence']:.6f}",
                             "prediction": "" if row["prediction"] is None else row["prediction"],
                             "top3": " ".join(f"{d}:{p:.4f}" for d, p in row["top3"])})
        return buffer.getvalue()

    def join(self, bodies) -> str:
        return ",\n".join(bodies) if self.json else "".join(bodies)

    def tail(self) -> str:
        return "\n]\n" if self.json else ""

    def whole(self, rows: list) -> str:
        return self.head() + self.body(rows) + self.tail()
