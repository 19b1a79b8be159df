"""The adaptation terms and measures: MCC, information maximisation, pseudo-labels, the domain shift."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from tlops.evaluate import scoring


def mcc_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Minimum Class Confusion: the share of a batch's (entropy-weighted) predicted mass that two classes share."""
    probs = F.softmax(logits / temperature, dim=1)
    entropy = -(probs * torch.log(probs + 1e-5)).sum(1)
    weight = 1 + torch.exp(-entropy)  # confident predictions count more
    weight = len(probs) * weight / weight.sum()
    confusion = (probs * weight[:, None]).T @ probs
    confusion = confusion / confusion.sum(1, keepdim=True)  # each class's row sums to 1: no class dominates
    return (confusion.sum() - confusion.trace()) / probs.shape[1]


def information_maximisation(probs: np.ndarray) -> float:
    """H(mean prediction) - mean H(prediction), over log(classes): 1 for confident predictions spread evenly over
    every class, 0 or below for uncertain or collapsed ones. Needs no label."""
    eps = 1e-12
    mean = probs.mean(0)
    diversity = -(mean * np.log(mean + eps)).sum()
    confidence = -(probs * np.log(probs + eps)).sum(1).mean()
    return float((diversity - confidence) / math.log(probs.shape[1]))


def pseudo_labels(probs: np.ndarray, confidence: float, class_share: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, weights) of class-balanced pseudo-labels: an image counts when its top probability reaches
    `confidence`, or is in the top `class_share` of its predicted class; each class then weighs the same in total
    (weight 0: not used)."""
    pred, conf = probs.argmax(1), probs.max(1)
    keep = conf >= confidence
    for c in np.unique(pred):
        members = np.flatnonzero(pred == c)
        cut = np.quantile(conf[members], 1 - class_share)
        keep[members[conf[members] >= cut]] = True
    counts = np.bincount(pred[keep], minlength=probs.shape[1])
    weights = np.zeros(len(pred), np.float32)
    weights[keep] = scoring.class_weights(counts)[pred[keep]]
    return pred, weights


def domain_shift(source: np.ndarray, target: np.ndarray, seed: int) -> dict[str, float]:
    """How well a classifier tells source from target features, on held-out folds: domain AUC (0.5: no shift) and
    proxy A-distance 2 (1 - 2 err) (0: no shift, 2: fully apart). The larger domain is subsampled to the smaller."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = min(len(source), len(target))
    if n < 5:
        return {"domain_auc": math.nan, "proxy_a_distance": math.nan, "n": n}
    rng = np.random.default_rng(seed)
    X = np.concatenate([source[rng.permutation(len(source))[:n]], target[rng.permutation(len(target))[:n]]])
    y = np.repeat([0, 1], n)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    p = cross_val_predict(clf, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=seed),
                          method="predict_proba")[:, 1]
    err = float(((p > 0.5) != y).mean())
    return {"domain_auc": float(roc_auc_score(y, p)), "proxy_a_distance": 2 * (1 - 2 * err), "n": n}
