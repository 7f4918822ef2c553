"""Pictures as matplotlib PNGs: the tutorial's sample grid, training curves, confusion matrix, mistakes,
reliability diagram.

Figures are drawn with the Agg backend (no display needed) at a fixed size
and DPI, so each PNG has a known pixel size; each is written atomically.
"""
import math

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt
import numpy as np

from .. import atomic

DPI = 100
GRID_SIZE_IN = (6, 6)
CURVES_SIZE_IN = (15, 4.5)
CONFUSION_SIZE_IN = (8, 8)
RELIABILITY_SIZE_IN = (7, 8)
MISTAKES_COLUMNS = 10
MISTAKE_CELL_IN = (1.2, 1.45)


def save(fig, path) -> None:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)


def sample_grid(images, labels, path, indices) -> list:
    """The tutorial's grid: one image per cell, titled with its label. Returns the titles drawn."""
    side = math.ceil(math.sqrt(len(indices)))
    fig = plt.figure(figsize=GRID_SIZE_IN)
    for cell, index in enumerate(indices):
        ax = fig.add_subplot(side, side, cell + 1)
        ax.set_title(str(int(labels[index])))
        ax.axis("off")
        ax.imshow(np.asarray(images[index]).squeeze(), cmap="gray")
    titles = [ax.get_title() for ax in fig.axes]
    save(fig, path)
    return titles


def training_curves(epochs: list, steps: list, path, label_smoothing: float = 0.0) -> dict:
    """Three panels: the train loss every few steps (log scale) with the per-epoch test loss, the learning
    rate, both against fractional epochs, and the test accuracy per epoch on an axis ending at 100%.
    A dashed line marks where a resumed run took over. With label smoothing the training loss has a floor
    well above the test loss (which is plain cross-entropy); the legend says so. Returns what was drawn."""
    fig, (loss_ax, lr_ax, acc_ax) = plt.subplots(1, 3, figsize=CURVES_SIZE_IN)
    if steps:
        smoothed = f", label smoothing {label_smoothing:g}" if label_smoothing else ""
        loss_ax.plot([s["epoch"] for s in steps], [s["loss"] for s in steps], lw=1, label=f"train{smoothed}")
        lr_ax.plot([s["epoch"] for s in steps], [s["lr"] for s in steps], color="tab:purple")
    else:  # runs recorded before per-step rows existed
        loss_ax.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], marker="o", label="train")
    loss_ax.plot([r["epoch"] for r in epochs], [r["test_loss"] for r in epochs], "o", color="tab:red",
                 label="test (end of epoch)")
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy (log scale)", yscale="log")
    loss_ax.legend()
    lr_ax.set(title="Learning rate", xlabel="epoch", ylabel="Adam learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    accuracy_panel(acc_ax, epochs)
    resumed_at = [row["epoch"] - 1 for before, row in zip(epochs, epochs[1:]) if row.get("run") != before.get("run")]
    for ax in (loss_ax, lr_ax, acc_ax):
        ax.grid(alpha=0.3)
        for x in resumed_at:
            ax.axvline(x, color="gray", ls="--", lw=1)
    fig.tight_layout()
    save(fig, path)
    return {"step_points": len(steps), "epoch_points": len(epochs), "resumed_at": resumed_at,
            "accuracy_axis": acc_ax.get_ylim()}


def accuracy_panel(ax, epochs: list) -> None:
    """Test accuracy per epoch, each point labelled; the axis ends at 100% and starts just below the lowest point."""
    x = [r["epoch"] for r in epochs]
    y = [100 * r["test_accuracy"] for r in epochs]
    ax.plot(x, y, marker="o", color="tab:green")
    for xi, yi in zip(x, y) if len(x) <= 12 else ():
        ax.annotate(f"{yi:.2f}%", (xi, yi), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    low = math.floor(min(y) - 0.5) if y else 0
    ax.set(title="Test accuracy (10,000 images)", xlabel="epoch", ylabel="%", ylim=(max(0, low), 100),
           xlim=(0, max(x, default=1) + 0.5))
    ax.xaxis.get_major_locator().set_params(integer=True)


def confusion(cm: np.ndarray, path, classes) -> dict:
    """The confusion matrix, true label by row, with the count in every cell. Returns what the figure shows."""
    fig, ax = plt.subplots(figsize=CONFUSION_SIZE_IN)
    ax.imshow(np.log1p(cm), cmap="Blues")  # log scale: the few errors stay visible next to ~1000 hits
    for (row, col), count in np.ndenumerate(cm):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=9,
                color="white" if row == col else "black")
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=f"Confusion matrix ({cm.sum():,} test images)")
    fig.tight_layout()
    diagonal = [t for t in ax.texts if t.get_position()[0] == t.get_position()[1]]
    drawn = {"cells": len(ax.texts), "annotated_total": sum(int(t.get_text()) for t in ax.texts),
             "annotated_diagonal": sum(int(t.get_text()) for t in diagonal)}
    save(fig, path)
    return drawn


def reliability(curves: dict, path) -> dict:
    """A reliability diagram: per confidence bin, the accuracy against the mean confidence (on the diagonal
    when calibrated), one curve per entry of ``curves`` (label -> scores.reliability rows, plus its ECE), each
    point's area growing with the answers in its bin, since a bin of two answers says little; below, how many
    answers fall in each bin (log scale), side by side. Returns what was drawn."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=RELIABILITY_SIZE_IN, height_ratios=(3, 1.3), sharex=True)
    top.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="calibrated")
    share = 0.9 / max(len(curves), 1)  # of a bin's width, for each curve's bar
    for i, ((label, curve), colour) in enumerate(zip(curves.items(), ("tab:red", "tab:blue"))):
        rows = curve["bins"]
        x, counts = [r["confidence"] for r in rows], np.array([r["count"] for r in rows])
        top.plot(x, [r["accuracy"] for r in rows], color=colour, lw=1,
                 label=f"{label}: ECE {100 * curve['ece']:.2f}%")
        top.scatter(x, [r["accuracy"] for r in rows], s=8 + 25 * np.log10(counts), color=colour, zorder=3)
        widths = [(r["hi"] - r["lo"]) * share for r in rows]
        bottom.bar([r["lo"] + (r["hi"] - r["lo"]) * (0.05 + share * (i + 0.5)) for r in rows], counts, width=widths,
                   color=colour, label=label)
    top.set(title="Reliability on the test set (15 confidence bins; point area ~ log answers)",
            ylabel="accuracy in the bin", xlim=(0, 1.01), ylim=(-0.02, 1.02))
    top.legend(loc="lower right")
    bottom.set(xlabel="confidence (probability of the predicted class)", ylabel="answers", yscale="log")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    drawn = {"curves": [line.get_label() for line in top.lines[1:]], "points": [len(line.get_xdata())
                                                                                for line in top.lines[1:]]}
    save(fig, path)
    return drawn


def mistakes_size_px(count: int) -> tuple:
    rows = max(1, math.ceil(count / MISTAKES_COLUMNS))
    return (round(MISTAKES_COLUMNS * MISTAKE_CELL_IN[0] * DPI), round(rows * MISTAKE_CELL_IN[1] * DPI))


def mistakes(images, labels, predictions, confidences, path, limit: int) -> dict:
    """A gallery of misclassified images (the first ``limit`` by index). Returns the indices drawn and
    what the figure shows: one panel per image, titled with its true label and the prediction."""
    shown = np.flatnonzero(predictions != labels)[:limit].tolist()
    width, height = mistakes_size_px(len(shown))
    fig = plt.figure(figsize=(width / DPI, height / DPI))
    columns, rows = MISTAKES_COLUMNS, max(1, math.ceil(len(shown) / MISTAKES_COLUMNS))
    for cell, index in enumerate(shown):
        ax = fig.add_subplot(rows, columns, cell + 1)
        ax.imshow(np.asarray(images[index]).squeeze(), cmap="gray")
        ax.set_title(f"true {labels[index]} / pred {predictions[index]}\n{100 * confidences[index]:.0f}%", fontsize=8)
        ax.axis("off")
    if not shown:
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    drawn = {"shown": shown, "panels": len(fig.axes), "titles": [ax.get_title() for ax in fig.axes]}
    save(fig, path)
    return drawn


def png_size(path) -> tuple:
    """(width, height) read from a PNG header; raises ValueError for a file that is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
