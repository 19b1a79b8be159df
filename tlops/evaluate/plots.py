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


def _save_image(img: Image.Image, path: str | Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
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
    `maps` (each the predicted class's activation map, h x w), the map over the image: where the model looked.
    Composed with Pillow, not matplotlib: a grid of images needs no axes (16 tiles: 0.05 s against 0.55 s)."""
    from PIL import ImageDraw, ImageFont

    cols = max(1, min(4, len(mistakes)))
    grid_rows = max(1, math.ceil(len(mistakes) / cols))
    font = ImageFont.load_default(size=13)
    line = 17
    tile_w, tile_h = TILE + 16, TILE + 2 * line + 14
    grid = Image.new("RGB", (cols * tile_w, grid_rows * tile_h), "white")
    draw = ImageDraw.Draw(grid)
    if not mistakes:
        draw.text((grid.width // 2, grid.height // 2), "none", fill="black", font=font, anchor="mm")
    for i, m in enumerate(mistakes):
        x, y = (i % cols) * tile_w, (i // cols) * tile_h
        img = resize_crop(load(m.path), spec).convert("RGB").resize((TILE, TILE), Image.Resampling.BILINEAR)
        if maps is not None and maps[i] is not None:
            img = Image.blend(img, _heat(maps[i]), 0.45)
        grid.paste(img, (x + 8, y + 2 * line + 8))
        for k, text in enumerate((f"{words[0]}: {m.actual}", f"{words[1]}: {m.predicted} ({m.confidence:.2f})")):
            draw.text((x + tile_w // 2, y + 4 + k * line), text, fill="darkred", font=font, anchor="mt")
    _save_image(grid, path)


TILE = 192  # pixels of each image in the grid


def _heat(a: np.ndarray) -> Image.Image:
    """A map (h x w) scaled to its own range, bilinearly enlarged to TILE and coloured blue -> red (jet's ramp,
    three clipped lines: no matplotlib for a colour scale)."""
    a = np.asarray(a, np.float32)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    t = np.asarray(Image.fromarray(a, mode="F").resize((TILE, TILE), Image.Resampling.BILINEAR))
    rgb = np.clip(1.5 - np.abs(4 * t[..., None] - np.array([3.0, 2.0, 1.0], np.float32)), 0, 1)
    return Image.fromarray((rgb * 255).astype(np.uint8), mode="RGB")


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

    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    line = 18
    img = Image.new("RGB", (1100, 20 + line * max(1, len(mistakes))), "white")
    draw = ImageDraw.Draw(img)
    if not mistakes:
        draw.text((img.width // 2, img.height // 2), "none", fill="black", font=font, anchor="mm")
    for i, m in enumerate(mistakes):
        snippet = textwrap.shorten(load_text(m.path, max_chars), 110, placeholder=" …")
        draw.text((10, 10 + i * line), f"{words[0]} {m.actual} / {words[1]} {m.predicted} ({m.confidence:.2f}): "
                  f"{snippet}", fill="darkred", font=font)
    _save_image(img, path)
