"""Drift of served traffic from what the model was made for: reference statistics at export, scores over a window.

At export the held-out source images (validation + test splits; for an adapted model, the target domain's images)
go through the exported model once. Their predicted-class distribution, mean top-1 confidence and a summary of the
pooled embedding go into the ONNX metadata (`tlops.drift_reference`). The service keeps the last `window` samples
and scores them:

- prediction: Jensen-Shannon divergence (base 2, 0..1) of the window's predicted classes from the reference's;
- confidence: the reference's mean top-1 probability minus the window's (positive = less sure than the reference);
- embedding: how far the window's images sit from where images of their (predicted) class sit in the reference, in
  reference within-class standard deviations. The coordinates: the embedding's top principal directions outside the
  span of the class means, plus the log of the energy outside those directions; each sample less its predicted
  class's reference centre, scaled by the within-class spread. The score is the length of the window's mean
  coordinate, less the sampling noise of the window's mean and of the class centres (so about 0 on in-domain
  traffic, whatever its class mix or the window size). The directions are fitted on one half of the reference images
  and the centres and spreads measured on the other: fitted and measured on the same images, principal directions
  understate the energy outside them and every new image would look shifted.
  `drifted` when it exceeds the threshold, once MIN_WINDOW samples are in.

Torch-free: numpy only, so the serve-only install computes it.
"""

from __future__ import annotations

import base64
import json
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlops.inputs.images import PreprocessSpec
from tlops.inputs.model_input import preprocess_batches
from tlops.onnx import metadata, runtime
from tlops.onnx.runtime import softmax

VERSION = 2
COMPONENTS = 16   # principal directions kept: enough to see a domain shift, few enough to estimate from a test split
MIN_WINDOW = 50   # below this, the embedding score's noise is too large to call drift
SHRINK = 1e-3     # variance floor, as a share of the largest: whitening must not blow up near-empty directions
MIN_CLASS = 3     # held-out images of a class needed to centre it on its own


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, "<f4").tobytes()).decode("ascii")


def _unb64(s: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), "<f4").astype(np.float32).reshape(shape)


def reference(logits: np.ndarray, embeddings: np.ndarray | None, components: int = COMPONENTS) -> dict[str, Any]:
    """The reference statistics of a split's model outputs (logits (N, C), embeddings (N, D))."""
    probs = softmax(logits)
    n, classes = probs.shape
    pred = probs.argmax(1)
    ref: dict[str, Any] = {"version": VERSION, "n": int(n),
                           "classes": (np.bincount(pred, minlength=classes) / max(n, 1)).tolist(),
                           "confidence": float(probs.max(1).mean()) if n else math.nan, "embedding": None}
    if embeddings is not None and n >= 3:
        ref["embedding"] = _embedding_reference(np.asarray(embeddings, np.float64), pred, classes, components)
    return ref


def _embedding_reference(x: np.ndarray, pred: np.ndarray, classes: int, components: int) -> dict[str, Any] | None:
    """Directions fitted on half of the images, their statistics taken on the other half: fitted and scored on the
    same images, principal directions overstate the variance they hold and understate the energy left outside
    them, and new in-domain images would look shifted."""
    n = len(x)
    fit = np.arange(n) % 2 == 0 if n >= 40 else np.ones(n, bool)
    held = ~fit if n >= 40 else fit
    mean = x[fit].mean(0)
    xc = x[fit] - mean
    # The span of the (predicted) class means: where a change of class frequencies moves the mean embedding.
    offsets = np.stack([xc[pred[fit] == c].mean(0) for c in np.unique(pred[fit])])
    _, sv, vt = np.linalg.svd(offsets, full_matrices=False)
    between = vt[sv > 1e-6 * max(sv[0], 1e-30)].T
    rest = xc - (xc @ between) @ between.T
    _, s, vt = np.linalg.svd(rest, full_matrices=False)
    k = int(min(components, int(fit.sum()) - 2, (s > 1e-6 * max(s[0], 1e-30)).sum()))
    if k <= 0:
        return None
    directions = vt[:k].T
    floor = 1e-3 * float((xc ** 2).sum(1).mean())  # so that no energy left (a small embedding) stays finite
    xh = x[held] - mean
    coords = np.column_stack([xh @ directions, _log_residual(xh, between, directions, floor)])
    # Centred per predicted class: how far an image sits from its class's usual place, so that no mix of classes
    # moves the score (a class with under MIN_CLASS held-out images uses the overall centre).
    ph = pred[held]
    centers, counts = np.tile(coords.mean(0), (classes, 1)), np.full(classes, len(coords), np.int64)
    for c in range(classes):
        if (ph == c).sum() >= MIN_CLASS:
            centers[c], counts[c] = coords[ph == c].mean(0), (ph == c).sum()
    within = coords - centers[ph]
    var = within.var(0, ddof=1) if len(within) > 1 else np.ones(k + 1)
    return {"dim": int(x.shape[1]), "k": k, "between": int(between.shape[1]), "n": int(held.sum()),
            "mean": _b64(mean), "class_span": _b64(between), "directions": _b64(directions),
            "centers": _b64(centers), "counts": counts.tolist(), "scale": _b64(np.sqrt(var + SHRINK * var.max())),
            "floor": floor}


def _log_residual(xc: np.ndarray, between: np.ndarray, directions: np.ndarray, floor: float) -> np.ndarray:
    """log of the energy of each centred embedding outside the class span and the principal directions."""
    left = (xc ** 2).sum(1) - ((xc @ between) ** 2).sum(1) - ((xc @ directions) ** 2).sum(1)
    return np.log(np.maximum(left, 0.0) + floor)


def to_json(ref: dict[str, Any]) -> str:
    return json.dumps(ref, separators=(",", ":"))


def outputs_reference(onnx_path: str | os.PathLike, images: Sequence[str | Path], spec: PreprocessSpec,
                      max_pixels: int) -> dict[str, Any]:
    """reference() of an exported model (outputs logits + embedding) run over `images`."""
    sess = runtime.session(onnx_path, cpu_only=True)
    logits, embeddings = [], []
    for x in preprocess_batches(images, spec, max_pixels):
        y, e = sess.run([metadata.OUTPUT, metadata.EMBEDDING], {metadata.INPUT: runtime.as_input(x)})
        logits.append(y)
        embeddings.append(e)
    if not logits:
        raise ValueError("no images to compute the drift reference on")
    return reference(np.concatenate(logits), np.concatenate(embeddings))


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions, base 2 (0: equal, 1: disjoint)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return max(0.0, (kl(p) + kl(q)) / 2)


class Monitor:
    """The last `window` samples' predicted class, top-1 confidence and projected embedding; thread-safe."""

    def __init__(self, ref: dict[str, Any], window: int, threshold: float) -> None:
        self.ref, self.window, self.threshold = ref, window, threshold
        emb = ref.get("embedding")
        self.k = emb["k"] + 1 if emb else 0  # the principal directions and the residual energy
        if emb:
            d = emb["dim"]
            self._mean = _unb64(emb["mean"], (d,)).astype(np.float64)
            self._between = _unb64(emb["class_span"], (d, emb["between"])).astype(np.float64)
            self._directions = _unb64(emb["directions"], (d, emb["k"])).astype(np.float64)
            classes = len(ref["classes"])
            self._centers = _unb64(emb["centers"], (classes, self.k)).astype(np.float64)
            self._counts = np.asarray(emb["counts"], np.float64)
            self._scale = _unb64(emb["scale"], (self.k,)).astype(np.float64)
            self._floor = emb["floor"]
        self._pred = np.zeros(window, np.int64)
        self._conf = np.zeros(window, np.float64)
        self._z = np.zeros((window, max(self.k, 1)), np.float64)
        self._has_z = np.zeros(window, bool)
        self._scored = np.zeros(window, bool)   # the model gave an OOD verdict for this sample
        self._unknown = np.zeros(window, bool)
        self.seen = 0
        self._lock = threading.Lock()

    @classmethod
    def from_metadata(cls, meta: dict[str, str], window: int, threshold: float) -> Monitor | None:
        """The monitor for a model's metadata; None when the model carries no reference (exported before)."""
        raw = meta.get(metadata.DRIFT_REFERENCE)
        if not raw:
            return None
        ref = json.loads(raw)
        return cls(ref, window, threshold) if ref.get("version") == VERSION else None

    def observe(self, logits: np.ndarray, embedding: np.ndarray | None, unknown: np.ndarray | None = None) -> None:
        """Add a batch's (calibrated) logits, embeddings and, when the model scores them, which inputs were unknown
        (OOD score above its threshold)."""
        probs = softmax(logits)
        pred, conf = probs.argmax(1), probs.max(1)
        z = None
        if embedding is not None and self.k and embedding.shape[1] == self._mean.shape[0]:
            z = self.coordinates(embedding, pred)
        with self._lock:
            idx = (self.seen + np.arange(len(pred))) % self.window
            self._pred[idx], self._conf[idx] = pred, conf
            self._has_z[idx] = z is not None
            if z is not None:
                self._z[idx] = z
            self._scored[idx] = unknown is not None
            self._unknown[idx] = False if unknown is None else unknown
            self.seen += len(pred)

    def coordinates(self, embedding: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """Embeddings (N, D) and their predicted classes -> (N, k + 1): the principal coordinates outside the class
        span and the log residual energy, each less its predicted class's reference centre, in units of the
        reference's within-class spread."""
        xc = np.asarray(embedding, np.float64) - self._mean
        coords = np.column_stack([xc @ self._directions,
                                  _log_residual(xc, self._between, self._directions, self._floor)])
        return (coords - self._centers[pred]) / self._scale

    def scores(self) -> dict[str, Any]:
        """{"window", "prediction", "embedding", "confidence", "unknown", "threshold", "drifted"} over the samples
        now held."""
        with self._lock:
            m = min(self.seen, self.window)
            pred, conf = self._pred[:m].copy(), self._conf[:m].copy()
            has = self._has_z[:m].copy()
            z, zpred = self._z[:m][has].copy(), pred[has]
            scored, unknown = self._scored[:m].copy(), self._unknown[:m].copy()
        out: dict[str, Any] = {"window": m, "prediction": None, "embedding": None, "confidence": None,
                               "unknown": None, "threshold": self.threshold, "drifted": False}
        if m == 0:
            return out
        if scored.any():  # the share of the window the model called unknown (about 5% on in-domain traffic)
            out["unknown"] = float(unknown[scored].mean())
        ref_classes = np.asarray(self.ref["classes"], np.float64)
        hist = np.bincount(pred, minlength=len(ref_classes))[:len(ref_classes)] / m
        out["prediction"] = js_divergence(hist, ref_classes)
        out["confidence"] = float(self.ref["confidence"] - conf.mean())
        if len(z) and self.k:
            shift = z.mean(0)
            # the sampling noise of both means: the window's, and each class centre's weighted by its share
            share = np.bincount(zpred, minlength=len(self._counts)) / len(z)
            noise = self.k * (1 / len(z) + float((share ** 2 / self._counts).sum()))
            out["embedding"] = math.sqrt(max(0.0, float(shift @ shift) - noise))
            out["drifted"] = bool(len(z) >= MIN_WINDOW and out["embedding"] > self.threshold)
        return out
