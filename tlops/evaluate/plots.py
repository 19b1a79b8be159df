"""The evaluate stage's plots and tables: confusion matrix, learning curves, worst errors."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tlops.core import paths
from tlops.core.config import Params
from tlops.core.io import write_bytes, write_text
from tlops.evaluate.metrics import confusion_rows, worst_indices
from tlops.inputs.images import PreprocessSpec, resize_crop
from tlops.inputs.text import TextSpec, load_text
from tlops.onnx.runtime import softmax

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONFUSION_COLUMNS = ["actual", "predicted"]


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # Figure.savefig renders with Agg: no display, no global backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Figure, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes(path, buf.getvalue())


def plot_confusion(y: np.ndarray, pred: np.ndarray, classes: Sequence[str], path: str | Path,
                   title: str | None = None) -> None:
    """Confusion matrix (rows actual, columns predicted) with counts in the cells."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    n = len(classes)
    side = min(4 + 0.45 * n, 24)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="actual",
           title=title or f"Confusion matrix (fine-tuned, {len(y)} test images)")
    ax.set_xticklabels(classes, rotation=90 if n > 10 else 0)
    ax.set_yticklabels(classes)
    if n <= 30:  # beyond that the numbers are unreadable; the colours still tell
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    dark = cm[i, j] > cm.max() / 2
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
    _save(fig, path)


def plot_curves(rows: Sequence[dict[str, Any]], unfreeze: float | None, path: str | Path) -> None:
    """Loss and accuracy of both phases over one epoch axis, the unfreeze point marked."""
    fig = _figure(10, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    for ax, keys, title in ((ax_loss, ("train_loss", "val_loss"), "loss"),
                            (ax_acc, ("train_accuracy", "val_accuracy"), "accuracy")):
        for key in keys:
            ax.plot(epochs, [_num(r.get(key)) for r in rows], marker=".", label=key)
        if unfreeze is not None:
            ax.axvline(unfreeze, color="grey", linestyle="--", label="unfreeze (fine-tuning starts)")
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
    ax_acc.legend(loc="best", fontsize=8)
    ax_loss.legend(loc="best", fontsize=8)
    _save(fig, path)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


@dataclass(frozen=True)
class Mistake:
    """A misclassified test image, for the worst-cases grid."""

    path: str
    actual: str
    predicted: str
    confidence: float


def plot_worst(mistakes: Sequence[Mistake], spec: PreprocessSpec, load: Callable[[str], Image.Image],
               path: str | Path, maps: Sequence[np.ndarray | None] | None = None,
               words: tuple[str, str] = ("true", "pred")) -> None:
    """Grid of the most confidently wrong test images, as the model saw them, with labels and confidence; with
    `maps` (each the predicted class's activation map, h x w), the map over the image: where the model looked."""
    cols = max(1, min(4, len(mistakes)))
    grid_rows = max(1, math.ceil(len(mistakes) / cols))
    fig = _figure(2.6 * cols, 2.8 * grid_rows)
    if not mistakes:
        fig.text(0.5, 0.5, "none", ha="center", va="center")
    for i, m in enumerate(mistakes):
        ax = fig.add_subplot(grid_rows, cols, i + 1)
        ax.imshow(resize_crop(load(m.path), spec))
        if maps is not None and maps[i] is not None:
            s = spec.input_size
            ax.imshow(maps[i], cmap="jet", alpha=0.45, extent=(-0.5, s - 0.5, s - 0.5, -0.5), interpolation="bilinear")
        ax.set_title(f"{words[0]}: {m.actual}\n{words[1]}: {m.predicted} ({m.confidence:.2f})", fontsize=9,
                     color="darkred")
        ax.axis("off")
    _save(fig, path)


def plot_reliability(before: Sequence[dict], after: Sequence[dict], temperature: float, path: str | Path) -> None:
    """Reliability diagram of the test split: accuracy against confidence per bin, before and after the
    temperature; a calibrated model sits on the diagonal."""
    fig = _figure(5.5, 5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for bins, label, marker in ((before, "uncalibrated", "o"), (after, f"T = {temperature:.2f}", "s")):
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker=marker, label=label)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Reliability (test split)")
    ax.legend(loc="upper left")
    _save(fig, path)


def write_plots(images: Sequence[str], y: np.ndarray, logits: np.ndarray, classes: Sequence[str],
                spec: PreprocessSpec | TextSpec, load: Callable[[str], Image.Image] | None, params: Params,
                explanation: np.ndarray | None = None) -> None:
    """confusion.csv + history.csv for `dvc plots`, and confusion/curves/worst PNGs; `explanation` (the exported
    model's, per test item) marks what decided each worst error."""
    from tlops.training.epochs import merge_history, read_history, write_history  # here: epochs imports torch

    probs, pred = softmax(logits), logits.argmax(axis=1)
    write_csv(paths.CONFUSION, confusion_rows(y, pred, classes), CONFUSION_COLUMNS)
    rows, unfreeze = merge_history(read_history(paths.HEAD_HISTORY), read_history(paths.FINETUNE_HISTORY))
    write_history(rows, paths.HISTORY)
    plot_confusion(y, pred, classes, paths.PLOTS_DIR / "confusion.png")
    plot_curves(rows, unfreeze, paths.PLOTS_DIR / "curves.png")
    chosen = worst_indices(probs, y, params.evaluate.worst_k)
    worst = [Mistake(str(images[i]), classes[y[i]], classes[pred[i]], float(probs[i].max())) for i in chosen]
    shares = [explanation[i, pred[i]] for i in chosen] if explanation is not None else None
    if isinstance(spec, TextSpec):
        write_text(paths.PLOTS_DIR / "worst.md", worst_texts_markdown(worst, spec.max_chars, shares, spec))
        plot_worst_texts(worst, spec.max_chars, paths.PLOTS_DIR / "worst.png")
    else:
        plot_worst(worst, spec, load, paths.PLOTS_DIR / "worst.png", shares)


WORST_CHARS = 300  # of each misclassified text shown in worst.md


def worst_texts_markdown(mistakes: Sequence[Mistake], max_chars: int, shares: Sequence[np.ndarray] | None = None,
                         spec: TextSpec | None = None, title: str = "Most confident errors (test split)",
                         words: tuple[str, str] = ("true", "predicted")) -> str:
    """The most confidently wrong test texts as a markdown table: true, predicted, confidence, the text, its file;
    with `shares` (each token's share of the predicted logit), the tokens that decided it, largest first."""
    lines = [f"# {title}", "",
             f"| # | {words[0]} | {words[1]} | confidence | deciding tokens | text | file |",
             "|---|---|---|---|---|---|---|"]
    for i, m in enumerate(mistakes, start=1):
        text = load_text(m.path, max_chars)
        shown = text if len(text) <= WORST_CHARS else text[:WORST_CHARS].rstrip() + " …"
        cell = shown.replace("|", "\\|")
        deciding = ""
        if shares is not None and spec is not None:
            tokens = spec.tokens(spec.ids(text))
            top = np.argsort(-np.asarray(shares[i - 1][:len(tokens)]))[:3]
            deciding = ", ".join(f"**{tokens[k]}** ({shares[i - 1][k]:+.2f})" for k in top).replace("|", "\\|")
        lines.append(f"| {i} | {m.actual} | {m.predicted} | {m.confidence:.2f} | {deciding} | {cell} | {m.path} |")
    if not mistakes:
        lines.append("| | | | | | none | |")
    return "\n".join(lines) + "\n"


def plot_worst_texts(mistakes: Sequence[Mistake], max_chars: int, path: str | Path,
                     words: tuple[str, str] = ("true", "pred")) -> None:
    """worst.png for texts: one line per mistake (labels, confidence, the text's start), so dvc plots shows it too."""
    import textwrap

    fig = _figure(11, 0.5 + 0.55 * max(1, len(mistakes)))
    if not mistakes:
        fig.text(0.5, 0.5, "none", ha="center", va="center")
    for i, m in enumerate(mistakes):
        snippet = textwrap.shorten(load_text(m.path, max_chars), 110, placeholder=" …")
        fig.text(0.01, 1 - (i + 0.8) / (len(mistakes) + 0.5), f"{words[0]} {m.actual} / {words[1]} {m.predicted} "
                 f"({m.confidence:.2f}): {snippet}", fontsize=8, color="darkred", family="monospace")
    _save(fig, path)
