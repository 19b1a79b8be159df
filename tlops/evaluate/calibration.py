"""Calibrated probabilities: one temperature T, fitted on the validation split by minimising the negative log-likelihood
of softmax(logits / T) (temperature scaling, Guo et al. 2017), kept only when it lowers the validation ECE (else 1.0,
and the report says so). T divides every logit, so the predicted class never changes. Numpy and SciPy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tlops.evaluate.metrics import ECE_BINS, confidence_bins, cross_entropy, expected_calibration_error
from tlops.onnx.runtime import softmax

T_RANGE = (0.05, 20.0)  # a temperature outside this range means the logits carry no usable confidence at all


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 minimising the mean negative log-likelihood of softmax(logits / T) against y (a 1-D convex search
    over log T, bounded to T_RANGE)."""
    from scipy.optimize import minimize_scalar

    z, y = np.asarray(logits, np.float64), np.asarray(y, int)
    found = minimize_scalar(lambda log_t: cross_entropy(z / np.exp(log_t), y), method="bounded",
                            bounds=tuple(np.log(T_RANGE)), options={"xatol": 1e-4})
    return float(np.exp(found.x))


def classwise_ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """The class-wise ECE (Kull et al. 2019): for each class, |frequency - probability| over equal-width bins of that
    class's probability (all samples, not just where it is the top class), weighted by bin size; the mean over
    classes."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y, int)
    errors = []
    for c in range(probs.shape[1]):
        p, hit = probs[:, c], (y == c).astype(np.float64)
        idx = confidence_bins(p, bins)
        errors.append(sum((idx == b).mean() * abs(hit[idx == b].mean() - p[idx == b].mean())
                          for b in range(bins) if (idx == b).any()))
    return float(np.mean(errors))


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """The reliability diagram's bins: mean confidence, accuracy and count of the top-1 predictions in each
    equal-width confidence bin (empty bins left out)."""
    conf, correct = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(np.float64)
    idx = confidence_bins(conf, bins)
    return [{"low": b / bins, "high": (b + 1) / bins, "confidence": float(conf[idx == b].mean()),
             "accuracy": float(correct[idx == b].mean()), "count": int((idx == b).sum())}
            for b in range(bins) if (idx == b).any()]


def calibrate(val_logits: np.ndarray, val_y: np.ndarray, test_logits: np.ndarray, test_y: np.ndarray
              ) -> dict[str, Any]:
    """The temperature for these logits and what it does: ECE (15 bins) and class-wise ECE before and after, on the
    validation split it was fitted on and on the test split."""
    fitted = fit_temperature(val_logits, val_y)

    def scores(logits: np.ndarray, y: np.ndarray, t: float) -> dict[str, float]:
        probs = softmax(np.asarray(logits, np.float64) / t)
        return {"ece": expected_calibration_error(probs, y), "classwise_ece": classwise_ece(probs, y),
                "nll": cross_entropy(np.asarray(logits, np.float64) / t, y)}

    val_before, val_fitted = scores(val_logits, val_y, 1.0), scores(val_logits, val_y, fitted)
    kept = val_fitted["ece"] < val_before["ece"]
    t = fitted if kept else 1.0
    return {"temperature": t, "fitted": fitted, "fitted_on": "val", "bins": ECE_BINS,
            "reason": (f"T = {fitted:.3f} lowers the validation ECE from {val_before['ece']:.4f} to "
                       f"{val_fitted['ece']:.4f}" if kept else
                       f"T = {fitted:.3f} would not lower the validation ECE ({val_before['ece']:.4f} -> "
                       f"{val_fitted['ece']:.4f}): T stays 1.0"),
            "val": {"before": val_before, "after": val_fitted if kept else val_before},
            "test": {"before": scores(test_logits, test_y, 1.0), "after": scores(test_logits, test_y, t)}}
