""""None of these": how unlike the training data an input is, scored from what the model itself computes.

Three scores are measured (reports/metrics.json `ood`): the class-conditional Mahalanobis distance (Lee et al. 2018:
one mean per class, one shared covariance with Ledoit-Wolf shrinkage, fitted on the training split; the distance to
the nearest class) of the pooled embedding alone (`mahalanobis_embedding`); the same at two depths, the embedding and
the pooled stride-16 stage of an image backbone, each scaled by its spread on the validation split, the larger
counting (`mahalanobis`, Lee et al.'s feature ensemble in its simplest form); and the energy of the logits (Liu et
al. 2020, -logsumexp). The exported model carries `mahalanobis`: the logits of a softmax classifier are confident
about inputs of no class at all (that is the failure being fixed), and the last stage pools away the texture and
scale that tell a blurry 8x8 digit from a 28x28 garment (Fashion-MNIST's model against digits: AUROC 0.89 from the
embedding alone, 0.99 with the stride-16 stage). The threshold is the validation split's 95th percentile: 95% of
in-distribution inputs pass as known.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

TPR = 0.95  # in-distribution inputs that pass as known, on the validation split


def normalised(embedding: np.ndarray) -> np.ndarray:
    """Embeddings on the unit sphere: their direction, not their norm, carries the class (the norm grows with
    contrast and size), so the distance is the same for a faint and a strong image of one class."""
    e = np.asarray(embedding, np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def fit_mahalanobis(embedding: np.ndarray, y: np.ndarray, classes: int) -> dict[str, np.ndarray]:
    """Class means and the shared precision matrix of normalised training embeddings (Ledoit-Wolf shrinkage keeps it
    well conditioned when there are fewer images than dimensions)."""
    from sklearn.covariance import LedoitWolf

    e, y = normalised(embedding), np.asarray(y, int)
    means = np.stack([e[y == c].mean(axis=0) if (y == c).any() else e.mean(axis=0) for c in range(classes)])
    centred = e - means[y]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    return {"means": means.astype(np.float32), "precision": precision.astype(np.float32)}


def mahalanobis_score(embedding: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each normalised embedding to its nearest class mean: higher is more unusual.
    Computed as the served graph does (tlops.export.served): whitened by the precision's Cholesky factor, then plain
    squared distances (the expanded quadratic form loses its digits to cancellation in float32)."""
    whiten = np.linalg.cholesky(np.asarray(precision, np.float64))
    z, centres = normalised(embedding) @ whiten, np.asarray(means, np.float64) @ whiten
    return ((z[:, None, :] - centres[None]) ** 2).sum(axis=2).min(axis=1)


def energy_score(logits: np.ndarray) -> np.ndarray:
    """The energy -logsumexp(logits) of each input: higher is more unusual."""
    z = np.asarray(logits, np.float64)
    top = z.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))


def threshold(val_scores: np.ndarray, tpr: float = TPR) -> float:
    """The score below which `tpr` of the validation split's (in-distribution) inputs fall."""
    return float(np.quantile(np.asarray(val_scores, np.float64), tpr))


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Area under the ROC curve of telling `outside` (positives) from `inside` by the score."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def scale(val_scores: np.ndarray) -> tuple[float, float]:
    """A part's centre and spread on the validation split (median, and 95th percentile less median): what puts
    scores of different parts on one scale before the larger counts."""
    d = np.asarray(val_scores, np.float64)
    return float(np.median(d)), max(float(np.quantile(d, TPR) - np.median(d)), 1e-6)


def fit_parts(train: list[np.ndarray], y: np.ndarray, classes: int, val: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One Mahalanobis fit per part (train: each part's training features), and each part's centre and spread on
    the validation split (median, and 95th percentile less median), which put the parts on one scale."""
    fit: dict[str, np.ndarray] = {}
    centre, spread = [], []
    for i, (t, v) in enumerate(zip(train, val, strict=True)):
        part = fit_mahalanobis(t, y, classes)
        fit[f"means_{i}"], fit[f"precision_{i}"] = part["means"], part["precision"]
        c, s = scale(mahalanobis_score(v, part["means"], part["precision"]))
        centre.append(c)
        spread.append(s)
    fit["centre"], fit["spread"] = np.asarray(centre, np.float32), np.asarray(spread, np.float32)
    return fit


def combine(scores: list[np.ndarray], centre: Sequence[float], spread: Sequence[float]) -> np.ndarray:
    """The largest of the parts' scores, each less its validation centre and over its spread (see scale)."""
    return np.max([(s - c) / w for s, c, w in zip(scores, centre, spread, strict=True)], axis=0)


def combined_score(fit: dict[str, np.ndarray], parts: list[np.ndarray]) -> np.ndarray:
    """The largest of the parts' scaled distances: what the served graph computes as ood_score."""
    return combine([mahalanobis_score(p, fit[f"means_{i}"], fit[f"precision_{i}"]) for i, p in enumerate(parts)],
                   fit["centre"], fit["spread"])


def measure(fit: dict[str, np.ndarray], val: tuple[list[np.ndarray], np.ndarray],
            test: tuple[list[np.ndarray], np.ndarray], far: tuple[list[np.ndarray], np.ndarray] | None,
            far_name: str | None) -> dict[str, Any]:
    """The scores on (parts, calibrated logits) of the validation and test splits and of a far-out set: each
    score's threshold, the share of the test split it flags, and its AUROC against the far-out set; the kept one's
    threshold on top."""
    def scores(parts: list[np.ndarray], logits: np.ndarray) -> dict[str, np.ndarray]:
        return {"mahalanobis": combined_score(fit, parts),
                "mahalanobis_embedding": mahalanobis_score(parts[0], fit["means_0"], fit["precision_0"]),
                "energy": energy_score(logits)}

    v, t = scores(*val), scores(*test)
    f = scores(*far) if far is not None and len(far[1]) else None
    out: dict[str, Any] = {"score": "mahalanobis", "tpr": TPR, "parts": len(val[0])}
    for name in ("mahalanobis", "mahalanobis_embedding", "energy"):
        cut = threshold(v[name])
        entry = {"threshold": cut, "test_flagged": float((t[name] > cut).mean())}
        if f is not None:
            entry.update({"auroc": auroc(t[name], f[name]), "far_flagged": float((f[name] > cut).mean())})
        out[name] = entry
    out["threshold"] = out["mahalanobis"]["threshold"]
    out["far"] = {"set": far_name, "items": int(len(far[1]))} if far is not None else None
    return out
