"""Learning curves: one row per epoch, one schema for the head, fine-tuning and the merged curves of evaluate."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlops.io import write_text

HISTORY_COLUMNS = ["epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]


def history_row(epoch: int, phase: str, train_loss: float, train_acc: float, val_loss: float, val_acc: float,
                lr: float) -> dict:
    return {"epoch": epoch, "phase": phase, "train_loss": train_loss, "train_accuracy": train_acc,
            "val_loss": val_loss, "val_accuracy": val_acc, "lr": lr}


def epoch_metrics(row: dict) -> dict[str, float]:
    """The numeric columns of a history row, for a tracker's log_metrics(step=row["epoch"])."""
    return {k: float(row[k]) for k in HISTORY_COLUMNS if k not in ("epoch", "phase")}


def write_history(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Per-epoch rows as CSV with HISTORY_COLUMNS (other keys ignored), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def read_history(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def merge_history(head: Sequence[dict[str, Any]],
                  finetune: Sequence[dict[str, Any]]) -> tuple[list[dict], float | None]:
    """Both phases on one epoch axis, and the epoch boundary where fine-tuning (unfreezing) starts.

    Fine-tune epochs normally continue the head's numbering; if they restart, they are shifted after it.
    """
    rows = [{**r, "epoch": int(float(r["epoch"]))} for r in head]
    last = max((r["epoch"] for r in rows), default=0)
    ft = [{**r, "epoch": int(float(r["epoch"]))} for r in finetune]
    if ft and min(r["epoch"] for r in ft) <= last:
        shift = last - min(r["epoch"] for r in ft) + 1
        ft = [{**r, "epoch": r["epoch"] + shift} for r in ft]
    unfreeze = (min(r["epoch"] for r in ft) - 0.5) if ft else None
    return rows + ft, unfreeze
