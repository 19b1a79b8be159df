"""A small HTTP client of the service: /predict for files and texts (`tlops predict --url`, with the service's key
and TLS), and accuracy over a labelled set through HTTP."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx

from tlops.core.errors import ConfigError, TlopsError

BATCH = 32  # files or texts per request


def remote_predict(url: str, images: Sequence[str | os.PathLike] = (), texts: Sequence[str] = (), top_k: int = 5,
                   api_key: str | None = None, ca: str | None = None, client_cert: tuple[str, str] | None = None,
                   timeout: float = 60.0) -> list[dict]:
    """Top-k labels from a running service, in the shape `tlops predict` prints locally: {"image" or "text",
    "model_name", "model_version", "top_k"}, or {"image" or "text", "error", "reason"} when the service refused
    the request holding it. api_key: sent as Authorization: Bearer; ca: the PEM CA that signed the service's
    certificate; client_cert: (certificate, key) PEM files for mutual TLS."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout,
                      verify=_tls_context(ca, client_cert)) as c:
        results: list[dict] = []
        for start in range(0, len(images), BATCH):
            chunk = [str(p) for p in images[start:start + BATCH]]
            files = [("file", (Path(p).name, Path(p).read_bytes(), "application/octet-stream")) for p in chunk]
            results += _answers(_post(c, top_k, files=files), "image", chunk)
        for start in range(0, len(texts), BATCH):
            chunk = list(texts[start:start + BATCH])
            results += _answers(_post(c, top_k, json={"texts": chunk}), "text", chunk)
    return results


def _tls_context(ca: str | None, client_cert: tuple[str, str] | None) -> ssl.SSLContext | bool:
    if ca is None and client_cert is None:
        return True
    try:
        ctx = ssl.create_default_context(cafile=ca)
        if client_cert is not None:
            ctx.load_cert_chain(*client_cert)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS files: cannot load them ({type(e).__name__}: {e})") from None
    return ctx


def _post(c: httpx.Client, top_k: int, **body: object) -> httpx.Response | str:
    """The answer, or the service's error message when it refused the request (an image it could not read)."""
    try:
        r = c.post("/predict", params={"top_k": top_k}, **body)
    except httpx.HTTPError as e:
        raise TlopsError(f"cannot reach {c.base_url} ({type(e).__name__}: {e})") from None
    if r.status_code == 401:
        raise TlopsError(f"{c.base_url} wants its API key: set serve.api_key_env (or --api-key-env)")
    if r.status_code >= 400:
        try:
            return str(r.json().get("error", r.text))
        except ValueError:
            return r.text[:200]
    return r


def _answers(r: httpx.Response | str, kind: str, items: list[str]) -> list[dict]:
    if isinstance(r, str):
        return [{kind: item, "error": r, "reason": "refused"} for item in items]
    answer = r.json()
    return [{kind: item, "model_name": answer["model_name"], "model_version": answer["model_version"],
             "top_k": p["top_k"], **{k: p[k] for k in ("ood_score", "unknown") if k in p}}
            for item, p in zip(items, answer["predictions"])]


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
