""""None of these": how unlike the training data an input is, scored from what the model itself computes.

Two scores are measured (reports/metrics.json `ood`): the class-conditional Mahalanobis distance of the pooled
embedding (Lee et al. 2018: one mean per class, one shared covariance with Ledoit-Wolf shrinkage, fitted on the
training split's embeddings; the distance to the nearest class), and the energy of the logits (Liu et al. 2020,
-logsumexp). The exported model carries the Mahalanobis score: the logits of a softmax classifier are confident about
inputs of no class at all (that is the failure being fixed), while the embedding still sees how far an input lies from
every class it learned; the AUROCs of both are reported side by side. The threshold is the validation split's
95th percentile: 95% of in-distribution inputs pass as known.
"""

from __future__ import annotations

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


def measure(fit: dict[str, np.ndarray], val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
            far: tuple[np.ndarray, np.ndarray] | None, far_name: str | None) -> dict[str, Any]:
    """Both scores on (embedding, logits) of the validation and test splits and of a far-out set: the kept score's
    threshold, the share of the test split it flags, and each score's AUROC against the far-out set."""
    def scores(emb: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        return {"mahalanobis": mahalanobis_score(emb, fit["means"], fit["precision"]), "energy": energy_score(logits)}

    v, t = scores(*val), scores(*test)
    out: dict[str, Any] = {"score": "mahalanobis", "tpr": TPR}
    for name in ("mahalanobis", "energy"):
        cut = threshold(v[name])
        entry = {"threshold": cut, "test_flagged": float((t[name] > cut).mean())}
        if far is not None and len(far[0]):
            f = scores(*far)[name]
            entry.update({"auroc": auroc(t[name], f), "far_flagged": float((f > cut).mean())})
        out[name] = entry
    out["threshold"] = out["mahalanobis"]["threshold"]
    out["far"] = {"set": far_name, "items": int(len(far[0]))} if far is not None else None
    return out
