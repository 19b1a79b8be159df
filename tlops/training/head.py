"""Head training on cached features: a linear (or MLP) head, a small grid, the best on validation saved."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tlops.core import paths
from tlops.core.config import HeadParams
from tlops.core.errors import DataError
from tlops.core.io import write_json
from tlops.evaluate.scoring import score
from tlops.models.heads import build_head, save_state
from tlops.training.devices import torch_threads
from tlops.training.epochs import (
    OnEpoch,
    check_finite,
    class_weight_tensor,
    evaluate_logits,
    history_row,
    write_history,
)


@dataclass
class HeadResult:
    """The kept head (best grid config, weights restored to its best epoch) and how it got there."""

    model: nn.Module
    kind: str
    hidden: int
    dropout: float
    in_features: int
    classes: list[str]
    lr: float
    weight_decay: float
    metric: str  # the selection metric (tlops.evaluate.scoring) the grid and early stopping went by
    val_metric: float
    val_accuracy: float
    val_loss: float
    epochs: int  # epochs the kept config ran before early stopping (or the limit)
    best_epoch: int
    history: list[dict]
    grid: list[dict]
    class_weighted: bool = False
    backbone: dict = field(default_factory=dict)


def train_head_grid(ds: Any, params: HeadParams, on_epoch: OnEpoch | None = None, metric: str = "accuracy",
               class_weighted: bool | None = None, report: Callable[[dict], None] | None = None) -> HeadResult:
    """Sweep head.lrs x head.weight_decays on the cached features; keep the config with the best validation
    `metric` (tlops.evaluate.scoring; ties: the lower val loss, then the earlier grid point).

    `ds` is a tlops.features.FeatureDataset. on_epoch sees the kept config's epochs, after the sweep. report (a
    one-point grid only: `tlops tune`'s head trials) sees every epoch's row as it ends and may raise to stop.
    """
    X, y = (torch.as_tensor(a) for a in ds.split("train"))
    Xv, yv = (torch.as_tensor(a) for a in ds.split("val"))
    for name, labels in (("train", y), ("val", yv)):
        if len(labels) == 0:
            raise DataError(f"feature dataset has no {name} rows: the prepare stage must assign some images to {name}")
    num_classes = len(ds.classes)
    weighted = params.class_weighting is True if class_weighted is None else class_weighted
    weight = class_weight_tensor(y, num_classes) if weighted else None
    runs = []
    with torch_threads(1):  # a head's small matmuls lose more to thread hand-offs than they gain
        for lr in params.lrs:
            for wd in params.weight_decays:
                one_point = len(params.lrs) * len(params.weight_decays) == 1
                head, history, best = fit_head(X.float(), y.long(), Xv.float(), yv.long(), num_classes, params, lr,
                                               wd, metric, weight, report if one_point else None)
                runs.append((head, history, best, lr, wd))
    head, history, best, lr, wd = max(runs, key=lambda r: (r[2]["val_metric"], -r[2]["val_loss"]))
    for row in history:
        if on_epoch:
            on_epoch(row, row["epoch"])
    grid = [{"lr": r[3], "weight_decay": r[4], f"val_{metric}": r[2]["val_metric"],
             "val_accuracy": r[2]["val_accuracy"], "val_loss": r[2]["val_loss"], "epochs": len(r[1])} for r in runs]
    return HeadResult(
        model=head, kind=params.kind, hidden=params.hidden, dropout=params.dropout, in_features=X.shape[1],
        classes=list(ds.classes), lr=lr, weight_decay=wd, metric=metric, val_metric=best["val_metric"],
        val_accuracy=best["val_accuracy"], val_loss=best["val_loss"], epochs=len(history), best_epoch=best["epoch"],
        history=history, grid=grid, class_weighted=weight is not None,
        backbone=dict(getattr(ds, "meta", {}) or {}))


def fit_head(X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor, num_classes: int,
             params: HeadParams, lr: float, weight_decay: float, metric: str = "accuracy",
             weight: torch.Tensor | None = None, report: Callable[[dict], None] | None = None
             ) -> tuple[nn.Module, list[dict], dict]:
    """One grid point: AdamW, kept at its best epoch by (val metric, -val loss), stopped after head.patience epochs
    without a better one; returns the head, the history and the kept epoch's row (with val_metric)."""
    torch.manual_seed(params.seed)
    order = torch.Generator().manual_seed(params.seed)
    head = build_head(params.kind, X.shape[1], num_classes, params.hidden, params.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    history: list[dict] = []
    best, best_state, stale = None, copy.deepcopy(head.state_dict()), 0
    for epoch in range(1, params.epochs + 1):
        head.train()
        loss_sum, correct = 0.0, 0
        for idx in torch.randperm(len(y), generator=order).split(params.batch_size):
            logits = head(X[idx])
            loss = F.cross_entropy(logits, y[idx], weight=weight)
            check_finite(loss, "train_head", epoch, len(history))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        val_logits = _eval(head, Xv)
        val_loss, val_acc = evaluate_logits(val_logits, yv)
        history.append(history_row(epoch, "head", loss_sum / len(y), correct / len(y), val_loss, val_acc, lr))
        row = {**history[-1], "val_metric": score(metric, yv.numpy(), val_logits.argmax(1).numpy(), num_classes)}
        if report:
            report(row)
        if best is None or (row["val_metric"], -row["val_loss"]) > (best["val_metric"], -best["val_loss"]):
            best, best_state, stale = row, copy.deepcopy(head.state_dict()), 0
        else:
            stale += 1
            if stale >= params.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return head, history, best


def _eval(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return model(X)


def save_head(result: HeadResult, out_dir: str | Path = paths.HEAD_DIR,
              history_path: str | Path = paths.HEAD_HISTORY) -> dict:
    """Write head.safetensors + head.json into out_dir and the history CSV; return the JSON written."""
    out_dir = Path(out_dir)
    info = {
        "kind": result.kind, "hidden": result.hidden, "dropout": result.dropout,
        "in_features": result.in_features, "classes": result.classes,
        "lr": result.lr, "weight_decay": result.weight_decay, "metric": result.metric,
        "val_metric": result.val_metric, "val_accuracy": result.val_accuracy, "val_loss": result.val_loss,
        "class_weighted": result.class_weighted,
        "epochs": result.epochs, "best_epoch": result.best_epoch, "grid": result.grid,
        "backbone": result.backbone,
    }
    save_state(result.model.state_dict(), out_dir / paths.HEAD_WEIGHTS.name)
    write_json(out_dir / paths.HEAD_INFO.name, info)
    write_history(result.history, history_path)
    return info
