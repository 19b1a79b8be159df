"""Drift of served traffic from the test split: reference statistics at export, scores over a rolling window.

At export the test split goes through the exported model once; its predicted-class distribution, mean top-1
confidence and a low-rank summary of the pooled embedding (mean + the top principal directions, whitened) go into
the ONNX metadata (`tlops.drift_reference`). The service keeps the last `window` samples and scores them:

- prediction: Jensen-Shannon divergence (base 2, 0..1) of the window's predicted classes from the reference's;
- confidence: the reference's mean top-1 probability minus the window's (positive = less sure than on the test set);
- embedding: the shift of the window's mean embedding in reference standard deviations (Mahalanobis distance in the
  whitened principal subspace), bias-corrected for the sampling noise of both means, so it stays near 0 on
  in-domain traffic whatever the window size. `drifted` when it exceeds the threshold, once MIN_WINDOW samples are in.

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

from tlops import onnx_meta, runtime
from tlops.preprocess import PreprocessSpec, preprocess_batches
from tlops.runtime import softmax

VERSION = 1
COMPONENTS = 16   # principal directions kept: enough to see a domain shift, few enough to estimate from a test split
MIN_WINDOW = 50   # below this, the embedding score's noise is too large to call drift
SHRINK = 1e-3     # variance floor, as a share of the largest: whitening must not blow up near-empty directions


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, "<f4").tobytes()).decode("ascii")


def _unb64(s: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), "<f4").astype(np.float32).reshape(shape)


def reference(logits: np.ndarray, embeddings: np.ndarray | None, components: int = COMPONENTS) -> dict[str, Any]:
    """The reference statistics of a labelled split's model outputs (logits (N, C), embeddings (N, D))."""
    probs = softmax(logits)
    n, classes = probs.shape
    ref: dict[str, Any] = {"version": VERSION, "n": int(n),
                           "classes": (np.bincount(probs.argmax(1), minlength=classes) / max(n, 1)).tolist(),
                           "confidence": float(probs.max(1).mean()) if n else math.nan, "embedding": None}
    if embeddings is not None and n >= 3:
        x = np.asarray(embeddings, np.float64)
        mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        var = s ** 2 / (n - 1)
        k = int(min(components, n - 1, (var > 1e-12 * max(var[0], 1e-30)).sum()))
        if k > 0:
            scale = np.sqrt(var[:k] + SHRINK * var[0])
            ref["embedding"] = {"dim": int(x.shape[1]), "k": k, "mean": _b64(mean),
                                "projection": _b64(vt[:k].T / scale)}
    return ref


def to_json(ref: dict[str, Any]) -> str:
    return json.dumps(ref, separators=(",", ":"))


def model_reference(onnx_path: str | os.PathLike, test_images: list[str], adapt_method: str, spec: PreprocessSpec,
                    max_pixels: int) -> tuple[str, dict[str, Any]]:
    """The export stage's tlops.drift_reference: the model's outputs over the traffic it is meant for, and what
    that was. An adapted model is meant for its target domain (the target's adapt images; no labels needed),
    any other for the source test split."""
    images, split = test_images, "source test"
    if adapt_method != "none":
        from tlops.target import adapt_paths, load_target

        if target := adapt_paths(load_target()):
            images, split = target, "target adapt"
    ref = outputs_reference(onnx_path, images, spec, max_pixels)
    return to_json(ref), {"split": split, "images": ref["n"], "components": (ref["embedding"] or {}).get("k", 0),
                          "confidence": ref["confidence"]}


def outputs_reference(onnx_path: str | os.PathLike, images: Sequence[str | Path], spec: PreprocessSpec,
                      max_pixels: int) -> dict[str, Any]:
    """reference() of an exported model (outputs logits + embedding) run over `images`."""
    sess = runtime.session(onnx_path, cpu_only=True)
    logits, embeddings = [], []
    for x in preprocess_batches(images, spec, max_pixels):
        y, e = sess.run([onnx_meta.OUTPUT, onnx_meta.EMBEDDING], {onnx_meta.INPUT: np.ascontiguousarray(x, np.float32)})
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
        self.k = emb["k"] if emb else 0
        self._mean = _unb64(emb["mean"], (emb["dim"],)) if emb else None
        self._proj = _unb64(emb["projection"], (emb["dim"], emb["k"])) if emb else None
        self._pred = np.zeros(window, np.int64)
        self._conf = np.zeros(window, np.float64)
        self._z = np.zeros((window, max(self.k, 1)), np.float64)
        self._has_z = np.zeros(window, bool)
        self.seen = 0
        self._lock = threading.Lock()

    @classmethod
    def from_metadata(cls, meta: dict[str, str], window: int, threshold: float) -> Monitor | None:
        """The monitor for a model's metadata; None when the model carries no reference (exported before)."""
        raw = meta.get(onnx_meta.DRIFT_REFERENCE)
        if not raw:
            return None
        ref = json.loads(raw)
        return cls(ref, window, threshold) if ref.get("version") == VERSION else None

    def observe(self, logits: np.ndarray, embedding: np.ndarray | None) -> None:
        probs = softmax(logits)
        pred, conf = probs.argmax(1), probs.max(1)
        z = None
        if embedding is not None and self._proj is not None and embedding.shape[1] == self._proj.shape[0]:
            z = (np.asarray(embedding, np.float64) - self._mean) @ self._proj
        with self._lock:
            idx = (self.seen + np.arange(len(pred))) % self.window
            self._pred[idx], self._conf[idx] = pred, conf
            self._has_z[idx] = z is not None
            if z is not None:
                self._z[idx] = z
            self.seen += len(pred)

    def scores(self) -> dict[str, Any]:
        """{"window", "prediction", "embedding", "confidence", "threshold", "drifted"} over the samples now held."""
        with self._lock:
            m = min(self.seen, self.window)
            pred, conf = self._pred[:m].copy(), self._conf[:m].copy()
            z = self._z[:m][self._has_z[:m]].copy()
        out: dict[str, Any] = {"window": m, "prediction": None, "embedding": None, "confidence": None,
                               "threshold": self.threshold, "drifted": False}
        if m == 0:
            return out
        ref_classes = np.asarray(self.ref["classes"], np.float64)
        hist = np.bincount(pred, minlength=len(ref_classes))[:len(ref_classes)] / m
        out["prediction"] = js_divergence(hist, ref_classes)
        out["confidence"] = float(self.ref["confidence"] - conf.mean())
        if len(z) and self.k:
            shift = z.mean(0)
            noise = self.k * (1 / len(z) + 1 / max(self.ref["n"], 1))
            out["embedding"] = math.sqrt(max(0.0, float(shift @ shift) - noise))
            out["drifted"] = bool(len(z) >= MIN_WINDOW and out["embedding"] > self.threshold)
        return out
