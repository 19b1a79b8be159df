"""The selection metric: the one number by which the head grid, fine-tuning's best epoch and early stopping, the
choice between head-only and fine-tuned, and the promotion gate decide. Numpy only.

evaluate.metric auto is balanced accuracy when the training split is imbalanced (its largest class has more than
data.imbalance_ratio times the images of its smallest), else accuracy: on imbalanced data accuracy cannot see a
class the model never predicts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def imbalance_ratio(labels: Sequence[Any], classes: Sequence[Any] | None = None) -> float:
    """Images of the largest class / images of the smallest, over `classes` (default: those in `labels`): 1.0 for
    balanced data, inf when a class has none."""
    counts = Counter(labels)
    sizes = [counts.get(c, 0) for c in (classes if classes is not None else counts)]
    if not sizes or max(sizes) == 0:
        return 1.0
    return max(sizes) / min(sizes) if min(sizes) else float("inf")


def train_labels(manifest: Any) -> list[str]:
    return [r.label for r in manifest.rows_in("train")]


@dataclass(frozen=True)
class Policy:
    """What the data's balance decides: the selection metric, and whether the training split is imbalanced."""

    metric: str
    imbalanced: bool
    ratio: float

    def weighted(self, setting: bool | str) -> bool:
        """head.class_weighting / finetune.class_weighting resolved: auto weights the loss on imbalanced data."""
        return setting is True or (setting == "auto" and self.imbalanced)


def policy(params: Any, labels: Sequence[Any], classes: Sequence[Any]) -> Policy:
    """The policy of tlops.core.config.Params for a training split's labels over `classes`: evaluate.metric resolved,
    imbalance by data.imbalance_ratio."""
    ratio = imbalance_ratio(labels, classes)
    imbalanced = ratio > params.data.imbalance_ratio
    metric = params.evaluate.metric
    return Policy("balanced_accuracy" if metric == "auto" and imbalanced else
                  "accuracy" if metric == "auto" else metric, imbalanced, ratio)


def score(metric: str, y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """The metric of predicted class indices against true ones, over all num_classes classes."""
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if len(y) == 0:
        return float("nan")
    if metric == "accuracy":
        return float((y == pred).mean())
    present = [c for c in range(num_classes) if (y == c).any()]
    recall = np.array([((pred == c) & (y == c)).sum() / (y == c).sum() for c in present])
    if metric == "balanced_accuracy":
        return float(recall.mean())
    if metric == "macro_f1":
        f1 = []
        for c in range(num_classes):
            tp, fp, fn = ((pred == c) & (y == c)).sum(), ((pred == c) & (y != c)).sum(), ((pred != c) & (y == c)).sum()
            f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        return float(np.mean(f1))
    raise ValueError(f"metric {metric!r} is not one of {METRICS}")


def paired_gain(metric: str, y: np.ndarray, before: np.ndarray, after: np.ndarray, num_classes: int,
                resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """(gain, standard error) of the metric of predictions `after` over `before` on the same items: the standard
    deviation of the gain over bootstrap resamples of the items, each resample scoring both (paired: an item both get
    right, or both wrong, adds no noise, so two close models on a few hundred items are told apart honestly)."""
    y, before, after = (np.asarray(a, dtype=np.int64) for a in (y, before, after))
    gain = score(metric, y, after, num_classes) - score(metric, y, before, num_classes)
    if len(y) < 2:
        return gain, float("inf")
    rng = np.random.default_rng(seed)
    draws = [score(metric, y[i], after[i], num_classes) - score(metric, y[i], before[i], num_classes)
             for i in (rng.integers(0, len(y), len(y)) for _ in range(resamples))]
    return gain, float(np.std(draws, ddof=1))


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency loss weights (a sample weighs 1 on average): a rare class counts as much as a common one."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    return w
