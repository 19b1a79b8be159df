"""Evaluation on the test split: metrics of the head-only and fine-tuned models, DVC plots and PNGs.

    report = evaluate(params)   # writes reports/metrics.json, confusion.csv, history.csv, plots/*.png

Library code: no MLflow, no Prefect. The stage task logs what `evaluate` returns.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tlops import paths, scoring
from tlops.config import Params
from tlops.data import current_data_version, load_manifest, same_classes, split_items
from tlops.errors import DataError
from tlops.features import load_feature_dataset
from tlops.history import merge_history, read_history, write_history
from tlops.images import for_manifest
from tlops.io import write_bytes, write_json, write_text
from tlops.model import load_classifier, load_head
from tlops.preprocess import PreprocessSpec, preprocess_batches, resize_crop, spec_from_dict
from tlops.runtime import softmax
from tlops.text import TextSpec, load_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import nn

ECE_BINS = 15
CONFUSION_COLUMNS = ["actual", "predicted"]


# ---------------------------------------------------------------- metrics (pure)


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (natural log)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 cannot occur after softmax.
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = idx == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def compute_metrics(logits: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """accuracy, macro_f1, top5_accuracy (more than 5 classes), ece, loss and per-class P/R/F1/support."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, top_k_accuracy_score

    logits, y = np.asarray(logits), np.asarray(y, dtype=int)
    if logits.ndim != 2 or logits.shape[0] != len(y) or logits.shape[1] != len(classes):
        raise ValueError(f"logits {logits.shape} do not match {len(y)} labels x {len(classes)} classes")
    if len(y) == 0:
        raise DataError("the test split is empty: no metrics can be computed")
    probs, pred = softmax(logits), logits.argmax(axis=1)
    labels = list(range(len(classes)))
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": scoring.score("balanced_accuracy", y, pred, len(classes)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
    }
    if len(classes) > 5:
        out["top5_accuracy"] = float(top_k_accuracy_score(y, logits, k=5, labels=labels))
    out["ece"] = expected_calibration_error(probs, y)
    out["loss"] = cross_entropy(logits, y)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, c in enumerate(classes)}
    return out


def gain(head: dict[str, Any], finetuned: dict[str, Any]) -> dict[str, float]:
    """finetuned - head for every scalar metric both have: what fine-tuning bought."""
    return {k: float(finetuned[k] - head[k]) for k in head
            if k in finetuned and isinstance(head[k], (int, float)) and k != "per_class"}


def worst_indices(probs: np.ndarray, y: np.ndarray, k: int) -> list[int]:
    """Indices of the (at most) k misclassified samples with the highest predicted-class probability."""
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(pred != y)
    order = wrong[np.argsort(-conf[wrong], kind="stable")]
    return [int(i) for i in order[:k]]


def confusion_rows(y: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> list[dict[str, str]]:
    """One {actual, predicted} row per sample, as class names: the input of DVC's confusion template."""
    return [{"actual": classes[int(a)], "predicted": classes[int(b)]} for a, b in zip(y, pred, strict=True)]


# ---------------------------------------------------------------- history (pure)


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


# ---------------------------------------------------------------- plots (matplotlib's Figure: no pyplot state)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # Figure.savefig renders with Agg: no display, no global backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Figure, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes(path, buf.getvalue())


def plot_confusion(y: np.ndarray, pred: np.ndarray, classes: Sequence[str], path: str | Path,
                   title: str | None = None) -> None:
    """Confusion matrix (rows actual, columns predicted) with counts in the cells."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    n = len(classes)
    side = min(4 + 0.45 * n, 24)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="actual",
           title=title or f"Confusion matrix (fine-tuned, {len(y)} test images)")
    ax.set_xticklabels(classes, rotation=90 if n > 10 else 0)
    ax.set_yticklabels(classes)
    if n <= 30:  # beyond that the numbers are unreadable; the colours still tell
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    dark = cm[i, j] > cm.max() / 2
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
    _save(fig, path)


def plot_curves(rows: Sequence[dict[str, Any]], unfreeze: float | None, path: str | Path) -> None:
    """Loss and accuracy of both phases over one epoch axis, the unfreeze point marked."""
    fig = _figure(10, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    for ax, keys, title in ((ax_loss, ("train_loss", "val_loss"), "loss"),
                            (ax_acc, ("train_accuracy", "val_accuracy"), "accuracy")):
        for key in keys:
            ax.plot(epochs, [_num(r.get(key)) for r in rows], marker=".", label=key)
        if unfreeze is not None:
            ax.axvline(unfreeze, color="grey", linestyle="--", label="unfreeze (fine-tuning starts)")
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
    ax_acc.legend(loc="best", fontsize=8)
    ax_loss.legend(loc="best", fontsize=8)
    _save(fig, path)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


@dataclass(frozen=True)
class Mistake:
    """A misclassified test image, for the worst-cases grid."""

    path: str
    actual: str
    predicted: str
    confidence: float


def plot_worst(mistakes: Sequence[Mistake], spec: PreprocessSpec, load: Callable[[str], Image.Image],
               path: str | Path) -> None:
    """Grid of the most confidently wrong test images, as the model saw them, with labels and confidence."""
    cols = max(1, min(4, len(mistakes)))
    grid_rows = max(1, math.ceil(len(mistakes) / cols))
    fig = _figure(2.6 * cols, 2.8 * grid_rows)
    if not mistakes:
        fig.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    for i, m in enumerate(mistakes):
        ax = fig.add_subplot(grid_rows, cols, i + 1)
        ax.imshow(resize_crop(load(m.path), spec))
        ax.set_title(f"true: {m.actual}\npred: {m.predicted} ({m.confidence:.2f})", fontsize=9, color="darkred")
        ax.axis("off")
    _save(fig, path)


# ---------------------------------------------------------------- inference


def torch_logits(model: nn.Module, batches: Iterator[np.ndarray] | Sequence[np.ndarray],
                 device: str = "cpu") -> np.ndarray:
    """Logits of `model` (eval mode) over the batches, as float32 on the CPU."""
    import torch

    model = model.eval().to(device)
    out = []
    with torch.inference_mode():
        for x in batches:
            out.append(model(torch.from_numpy(np.ascontiguousarray(x)).to(device)).float().cpu().numpy())
    width = getattr(model, "num_classes", 0)
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


# ---------------------------------------------------------------- the stage


def evaluate(params: Params) -> dict[str, Any]:
    """Score the head-only and fine-tuned models on the test split; write metrics, DVC plots and PNGs."""
    manifest = load_manifest(paths.MANIFEST)
    items = split_items(manifest, "test")
    head, head_info = load_head(paths.HEAD_DIR)
    model, info = load_classifier(paths.FINETUNE_DIR, tuned=True)
    classes = same_classes(manifest.classes, head_info["classes"], info["classes"])
    head_logits, head_y = head_test_logits(head, classes)
    head_metrics = compute_metrics(head_logits, head_y, classes)
    policy = scoring.policy(params, manifest)

    spec = spec_from_dict(info["preprocess"])
    images, y = [p for p, _ in items], np.array([c for _, c in items], dtype=int)
    # On the CPU on purpose: these are the numbers the exported ONNX model (CPU) must reproduce.
    text = isinstance(spec, TextSpec)
    store = None if text else for_manifest(manifest, spec, params.data.max_pixels)  # decoded by the features stage
    load = store.get if store else None
    logits = torch_logits(model, preprocess_batches(images, spec, params.data.max_pixels, load=load), device="cpu")
    ft_metrics = compute_metrics(logits, y, classes)
    selected = info.get("selected", "finetuned")
    report = {"metric": policy.metric, "selected": selected, "selection": info.get("selection", {}),
              "imbalance_ratio": policy.ratio, "head": head_metrics, "finetuned": ft_metrics,
              "finetune_gain": gain(head_metrics, ft_metrics),
              "exported": head_metrics if selected == "head" else ft_metrics,
              "test_images": len(items), "data_version": current_data_version()}
    shown = (head_logits, head_y) if selected == "head" else (logits, y)  # the plots show the exported model
    adapted = adapted_model(classes)
    if adapted is not None:  # the exported model is the adapted one: score it on the source test split too
        model_a, info_a = adapted
        shown = (torch_logits(model_a, preprocess_batches(images, spec, params.data.max_pixels, load=load)), y)
        report["adapted"] = compute_metrics(shown[0], y, classes)
        report["adapt_gain"] = gain(report["exported"], report["adapted"])
        report["exported"] = report["adapted"]
        report["adapt"] = {k: info_a["adapt"][k] for k in ("method", "chosen")}
    if (target := target_metrics(params, classes, adapted)) is not None:
        report["target"] = target
    if text:
        report["baseline"] = tfidf_baseline(manifest, spec, classes)
    write_json(paths.METRICS, report)
    write_plots(images, shown[1], shown[0], classes, spec, load, params)
    return report


def tfidf_baseline(manifest: Any, spec: TextSpec, classes: Sequence[str]) -> dict[str, Any]:
    """What a text model must beat: TF-IDF (word 1-2 grams) + logistic regression from scikit-learn, trained on the
    same training split (C chosen on validation), scored on the same test split with the same metrics."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    def texts(split: str) -> tuple[list[str], np.ndarray]:
        its = split_items(manifest, split)
        return [load_text(p, spec.max_chars) for p, _ in its], np.array([c for _, c in its], dtype=int)

    (xt, yt), (xv, yv), (xs, ys) = texts("train"), texts("val"), texts("test")
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    Xt = vec.fit_transform(xt)
    fits = [LogisticRegression(C=c, max_iter=2000).fit(Xt, yt) for c in (1.0, 10.0, 100.0)]
    best = max(fits, key=lambda m: (m.score(vec.transform(xv), yv), -m.C))
    proba = np.zeros((len(ys), len(classes)))
    proba[:, best.classes_] = best.predict_proba(vec.transform(xs))
    metrics = compute_metrics(np.log(np.clip(proba, 1e-12, None)), ys, classes)
    return {"model": "tfidf_logreg", "C": best.C, "ngram_range": [1, 2], **{k: metrics[k] for k in (
        "accuracy", "balanced_accuracy", "macro_f1")}}


def adapted_model(classes: Sequence[str]) -> tuple[nn.Module, dict] | None:
    """The adapt stage's model when adaptation changed it (else None: it is the selected fine-tuned model)."""
    from tlops.io import read_json

    if not paths.ADAPT_INFO.exists() or read_json(paths.ADAPT_INFO).get("adapt", {}).get("chosen", "none") == "none":
        return None
    model, info = load_classifier(paths.ADAPT_DIR)
    same_classes(classes, info["classes"])
    return model, info


def target_metrics(params: Params, classes: Sequence[str], adapted: tuple[nn.Module, dict] | None
                   ) -> dict[str, Any] | None:
    """Metrics of the source-only (selected) and the adapted model on the target's labelled test split, with a
    confusion matrix of each in reports/plots; None without target labels."""
    from tlops.images import WorkingImages
    from tlops.target import load_target, scored_items

    if not paths.TARGET_MANIFEST.exists():
        return None
    rows = load_target(paths.TARGET_MANIFEST)
    test_paths, test_y, unknown = scored_items(rows, list(classes))
    if not test_paths:
        return None
    source_only, info = load_classifier(paths.FINETUNE_DIR)
    spec = PreprocessSpec.from_dict(info["preprocess"])
    store = WorkingImages(paths.TARGET_IMAGES, spec, params.data.max_pixels, {r.path: r.sha256 for r in rows})
    y = np.array(test_y, dtype=int)
    out: dict[str, Any] = {"n_test": len(test_paths), "unknown_labels": unknown}
    logits = None
    for name, model in (("source_only", source_only), ("adapted", adapted[0] if adapted else None)):
        if model is not None:  # nothing adapted: the adapted model is the source-only one, already scored
            logits = torch_logits(model, preprocess_batches(test_paths, spec, params.data.max_pixels, load=store.get))
        out[name] = compute_metrics(logits, y, classes)
        plot_confusion(y, logits.argmax(1), classes, paths.PLOTS_DIR / f"target_confusion_{name}.png",
                       title=f"Target test, {name.replace('_', '-')} model ({len(y)} images)")
    out["gain"] = gain(out["source_only"], out["adapted"])
    return out


def head_test_logits(head: nn.Module, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the head-only model = the trained head on the cached test features."""
    ds = load_feature_dataset()
    same_classes(classes, ds.classes)
    X, y = ds.split("test")
    X = np.asarray(X, dtype=np.float32)
    logits = torch_logits(head, (X[i : i + 4096] for i in range(0, len(X), 4096)))
    return logits, np.asarray(y, dtype=int)


def write_plots(images: Sequence[str], y: np.ndarray, logits: np.ndarray, classes: Sequence[str],
                spec: PreprocessSpec | TextSpec, load: Callable[[str], Image.Image] | None, params: Params) -> None:
    """confusion.csv + history.csv for `dvc plots`, and confusion/curves/worst PNGs."""
    probs, pred = softmax(logits), logits.argmax(axis=1)
    write_csv(paths.CONFUSION, confusion_rows(y, pred, classes), CONFUSION_COLUMNS)
    rows, unfreeze = merge_history(read_history(paths.HEAD_HISTORY), read_history(paths.FINETUNE_HISTORY))
    write_history(rows, paths.HISTORY)
    plot_confusion(y, pred, classes, paths.PLOTS_DIR / "confusion.png")
    plot_curves(rows, unfreeze, paths.PLOTS_DIR / "curves.png")
    worst = [Mistake(str(images[i]), classes[y[i]], classes[pred[i]], float(probs[i].max()))
             for i in worst_indices(probs, y, params.evaluate.worst_k)]
    if isinstance(spec, TextSpec):
        write_text(paths.PLOTS_DIR / "worst.md", worst_texts_markdown(worst, spec))
        plot_worst_texts(worst, spec, paths.PLOTS_DIR / "worst.png")
    else:
        plot_worst(worst, spec, load, paths.PLOTS_DIR / "worst.png")


WORST_CHARS = 300  # of each misclassified text shown in worst.md


def worst_texts_markdown(mistakes: Sequence[Mistake], spec: TextSpec) -> str:
    """The most confidently wrong test texts as a markdown table: true, predicted, confidence, the text, its file."""
    lines = ["# Most confident errors (test split)", "",
             "| # | true | predicted | confidence | text | file |", "|---|---|---|---|---|---|"]
    for i, m in enumerate(mistakes, start=1):
        shown = load_text(m.path, spec.max_chars)
        shown = shown if len(shown) <= WORST_CHARS else shown[:WORST_CHARS].rstrip() + " …"
        cell = shown.replace("|", "\\|")
        lines.append(f"| {i} | {m.actual} | {m.predicted} | {m.confidence:.2f} | {cell} | {m.path} |")
    if not mistakes:
        lines.append("| | | | | no misclassified test texts | |")
    return "\n".join(lines) + "\n"


def plot_worst_texts(mistakes: Sequence[Mistake], spec: TextSpec, path: str | Path) -> None:
    """worst.png for texts: one line per mistake (labels, confidence, the text's start), so dvc plots shows it too."""
    import textwrap

    fig = _figure(11, 0.5 + 0.55 * max(1, len(mistakes)))
    if not mistakes:
        fig.text(0.5, 0.5, "no misclassified test texts", ha="center", va="center")
    for i, m in enumerate(mistakes):
        snippet = textwrap.shorten(load_text(m.path, spec.max_chars), 110, placeholder=" …")
        fig.text(0.01, 1 - (i + 0.8) / (len(mistakes) + 0.5), f"true {m.actual} / pred {m.predicted} "
                 f"({m.confidence:.2f}): {snippet}", fontsize=8, color="darkred", family="monospace")
    _save(fig, path)


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of a report as {"head.accuracy": ..., "finetuned.ece": ...} for tracking."""
    out = {}
    for section in ("head", "finetuned", "finetune_gain", "adapted", "adapt_gain", "exported"):
        for k, v in report.get(section, {}).items():
            if isinstance(v, (int, float)):
                out[f"{section}.{k}"] = float(v)
    for name in ("source_only", "adapted", "gain"):
        for k, v in (report.get("target") or {}).get(name, {}).items():
            if isinstance(v, (int, float)):
                out[f"target.{name}.{k}"] = float(v)
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    """What the stage prints: head-only vs fine-tuned test accuracy."""
    h, f, m = report["head"], report["finetuned"], report.get("metric", "accuracy")
    n = report["test_images"]
    return [f"test accuracy, head only:  {h['accuracy']:.4f}  ({m} {h[m]:.4f}, {n} images)",
            f"test accuracy, fine-tuned: {f['accuracy']:.4f}  ({m} {f[m]:.4f}, "
            f"{report['finetune_gain']['accuracy']:+.4f} from fine-tuning)",
            f"selected by validation {m}: {report.get('selected', 'finetuned')}",
            *([f"test accuracy, adapted ({report['adapt']['chosen']}): {report['adapted']['accuracy']:.4f}"]
              if "adapted" in report else []),
            *([f"target test accuracy: source-only {t['source_only']['accuracy']:.4f}, adapted "
               f"{t['adapted']['accuracy']:.4f} ({t['n_test']} images)"] if (t := report.get("target")) else [])]
