"""Metrics of logits against labels: accuracy and friends, calibration, confusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tlops.core.errors import DataError
from tlops.evaluate import scoring
from tlops.onnx.runtime import softmax

ECE_BINS = 15


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (natural log)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def confidence_bins(p: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """The equal-width bin of each probability: bin i holds (i/bins, (i+1)/bins] (a probability of exactly 0 goes to
    bin 0)."""
    return np.clip(np.ceil(p * bins).astype(int) - 1, 0, bins - 1)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    idx = confidence_bins(conf, bins)
    ece = 0.0
    for b in range(bins):
        in_bin = idx == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def compute_metrics(logits: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """accuracy, macro_f1, top5_accuracy (more than 5 classes), ece, loss and per-class P/R/F1/support."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, top_k_accuracy_score

    logits, y = np.asarray(logits), np.asarray(y, dtype=int)
    if logits.ndim != 2 or logits.shape[0] != len(y) or logits.shape[1] != len(classes):
        raise ValueError(f"logits {logits.shape} do not match {len(y)} labels x {len(classes)} classes")
    if len(y) == 0:
        raise DataError("the test split is empty: no metrics can be computed")
    probs, pred = softmax(logits), logits.argmax(axis=1)
    labels = list(range(len(classes)))
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": scoring.score("balanced_accuracy", y, pred, len(classes)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
    }
    if len(classes) > 5:
        out["top5_accuracy"] = float(top_k_accuracy_score(y, logits, k=5, labels=labels))
    out["ece"] = expected_calibration_error(probs, y)
    out["loss"] = cross_entropy(logits, y)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, c in enumerate(classes)}
    return out


def gain(head: dict[str, Any], finetuned: dict[str, Any]) -> dict[str, float]:
    """finetuned - head for every scalar metric both have: what fine-tuning bought."""
    return {k: float(finetuned[k] - head[k]) for k in head
            if k in finetuned and isinstance(head[k], (int, float)) and k != "per_class"}


def worst_indices(probs: np.ndarray, y: np.ndarray, k: int) -> list[int]:
    """Indices of the (at most) k misclassified samples with the highest predicted-class probability."""
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(pred != y)
    order = wrong[np.argsort(-conf[wrong], kind="stable")]
    return [int(i) for i in order[:k]]


def confusion_rows(y: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> list[dict[str, str]]:
    """One {actual, predicted} row per sample, as class names: the input of DVC's confusion template."""
    return [{"actual": classes[int(a)], "predicted": classes[int(b)]} for a, b in zip(y, pred, strict=True)]
