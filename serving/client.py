"""A small HTTP client of the service: /predict for files, and accuracy over a labelled set through HTTP."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx


def predict_http(base_url: str, images: Sequence[bytes | str | os.PathLike], top_k: int = 1,
                 client: httpx.Client | None = None, timeout: float = 60.0) -> dict:
    """POST images (bytes or paths) to /predict as one multipart request; the JSON answer, or HTTPStatusError."""
    files = [("file", (Path(im).name if not isinstance(im, bytes) else f"image{i}",
                       im if isinstance(im, bytes) else Path(im).read_bytes(), "application/octet-stream"))
             for i, im in enumerate(images)]
    c = client or httpx.Client(timeout=timeout)
    try:
        r = c.post(f"{base_url.rstrip('/')}/predict", params={"top_k": top_k}, files=files)
        r.raise_for_status()
        return r.json()
    finally:
        if client is None:
            c.close()


def http_accuracy(base_url: str, items: Iterable[tuple[str | os.PathLike, str]], batch_size: int = 16,
                  timeout: float = 60.0) -> dict:
    """Top-1 accuracy of the running service over (image path, true label) pairs, sent batch_size per request.

    For the shared-preprocessing check: over the test split it must equal the evaluate stage's accuracy.
    """
    items = list(items)
    correct = 0
    version = None
    with httpx.Client(timeout=timeout) as c:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            answer = predict_http(base_url, [p for p, _ in chunk], top_k=1, client=c)
            version = answer["model_version"]
            correct += sum(pred["top_k"][0]["label"] == str(label)
                           for pred, (_, label) in zip(answer["predictions"], chunk))
    n = len(items)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else float("nan"), "model_version": version}
