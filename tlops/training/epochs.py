"""What every training loop does each epoch: the loss checked finite, the classes weighted, logits scored, and the
epoch's row in the learning curves (one schema for the head, fine-tuning and the merged curves of evaluate)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tlops.core.errors import NonFiniteLossError
from tlops.core.io import write_text
from tlops.evaluate import scoring

OnEpoch = Callable[[dict, int], None]  # called with each kept epoch's history row and its number
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


def check_finite(loss: torch.Tensor, stage: str, epoch: int, step: int) -> None:
    """Stop at once on a NaN/inf loss: training on would only spread it through every weight."""
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(
            f"{stage}: loss became {loss.item()} at epoch {epoch}, step {step}; lower the learning rate "
            f"or check the inputs for NaN")


def evaluate_logits(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of logits against labels."""
    return float(F.cross_entropy(logits.float(), y)), float((logits.argmax(1) == y).float().mean())


def class_weight_tensor(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """tlops.evaluate.scoring.class_weights of a label tensor."""
    return torch.from_numpy(scoring.class_weights(torch.bincount(y.long(), minlength=num_classes).numpy())).float()
