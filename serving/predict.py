"""`tlops predict`: classify image files (or texts) locally with the ONNX model, same preprocessing as the service."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from serving.served_model import LoadedModel, ModelSource, predictions
from tlops.core.errors import ConfigError
from tlops.inputs.images import ImageError
from tlops.inputs.model_input import load_and_preprocess
from tlops.inputs.text import TextError, decode_text, load_text

BATCH = 32


def predict_files(model_path: str | os.PathLike, images: Sequence[str | os.PathLike], top_k: int = 5,
                  max_pixels: int = 40_000_000, threads: int | None = None) -> list[dict]:
    """Top-k labels per image, in input order; an unusable image gets an `error` entry instead.

    `model_path` is a file or models:/<name>@<alias>; the file must match its recorded sha256
    (ConfigError when missing, ModelIntegrityError when it does not verify).
    Each result: {"image", "model_name", "model_version", "top_k": [{"label", "index", "probability"}]}
    or {"image", "error", "reason"}.
    """
    model = ModelSource(str(model_path)).load(threads=threads)
    if model.is_text:
        return predict_texts(model, [(str(f), None) for f in images], top_k)
    results: list[dict] = [{} for _ in images]
    ok: list[tuple[int, np.ndarray]] = []
    for i, image in enumerate(images):
        try:
            ok.append((i, load_and_preprocess(image, model.spec, max_pixels)))
        except ImageError as e:
            results[i] = {"image": str(image), "error": str(e), "reason": e.reason}
        except OSError as e:
            results[i] = {"image": str(image), "error": f"cannot read {image}: {e.strerror or e}",
                          "reason": "unreadable"}
    for start in range(0, len(ok), BATCH):
        chunk = ok[start:start + BATCH]
        for (i, _), result in zip(chunk, _results(model, np.stack([x for _, x in chunk]), top_k), strict=True):
            results[i] = {"image": str(images[i]), **result}
    return results


def predict_text_strings(model_path: str | os.PathLike, texts: Sequence[str], files: Sequence[str | os.PathLike] = (),
                         top_k: int = 5, threads: int | None = None) -> list[dict]:
    """Top-k labels of each text given on the command line, then of each text file, with a text model."""
    model = ModelSource(str(model_path)).load(threads=threads)
    if not model.is_text:
        raise ConfigError(f"--text needs a text model; {model_path} reads images (give image files instead)")
    return predict_texts(model, [(t, t) for t in texts] + [(str(f), None) for f in files], top_k)


def predict_texts(model: LoadedModel, items: Sequence[tuple[str, str | None]], top_k: int) -> list[dict]:
    """(shown as, the text or None to read the file `shown as`) -> {"text", "top_k"...} or {"text", "error",
    "reason"}, in order; tokenised as the service and training do (tlops.inputs.text)."""
    results: list[dict] = [{} for _ in items]
    ok: list[tuple[int, np.ndarray]] = []
    for i, (name, text) in enumerate(items):
        try:
            if text is None:
                clean = load_text(name, model.spec.max_chars)
            else:  # a command-line argument: bytes that were not UTF-8 arrive as lone surrogates
                clean = decode_text(text.encode("utf-8", "surrogateescape"), "--text", model.spec.max_chars)[0]
            ok.append((i, model.spec.ids(clean)))
        except TextError as e:
            results[i] = {"text": name, "error": str(e), "reason": e.reason}
        except OSError as e:
            results[i] = {"text": name, "error": f"cannot read {name}: {e.strerror or e}", "reason": "unreadable"}
    for start in range(0, len(ok), BATCH):
        chunk = ok[start:start + BATCH]
        for (i, _), result in zip(chunk, _results(model, model.spec.pad([x for _, x in chunk]), top_k), strict=True):
            results[i] = {"text": items[i][0], **result}
    return results


def _results(model: LoadedModel, x: np.ndarray, k: int) -> list[dict]:
    """One batch through the model as the service runs it (serving.served_model.predictions)."""
    return [{"model_name": model.name, "model_version": model.version, **answer}
            for answer in predictions(model, model.run(x), k)]


def results_json(results: list[dict]) -> str:
    return json.dumps(results, indent=2)


def results_table(results: list[dict]):
    """A rich Table: one row per image and label, the best label first."""
    from rich.table import Table

    version = next((r["model_version"] for r in results if "model_version" in r), "?")
    table = Table(title=f"predictions (model version {version})")
    what = "text" if any("text" in r for r in results) else "image"
    for col, justify in ((what, "left"), ("rank", "right"), ("label", "left"), ("probability", "right")):
        table.add_column(col, justify=justify)
    for r in results:
        shown = r[what] if len(r[what]) <= 60 else r[what][:57] + "..."
        if "error" in r:
            table.add_row(shown, "", f"[red]{r['reason']}[/red]", r["error"].split(": ", 1)[-1])
            continue
        if r.get("unknown"):
            shown += " [yellow](unknown: unlike the training data)[/yellow]"
        for rank, t in enumerate(r["top_k"], 1):
            table.add_row(shown if rank == 1 else "", str(rank), t["label"], f"{t['probability']:.4f}",
                          end_section=rank == len(r["top_k"]))
    return table


def print_predictions(results: list[dict], as_json: bool = False) -> None:
    """Print results as a table (or JSON) on stdout."""
    if as_json:
        print(results_json(results))
        return
    from rich.console import Console

    Console().print(results_table(results))
