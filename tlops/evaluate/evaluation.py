"""The evaluate stage's work: the head, the fine-tuned and the adapted model on the test split, side by side, with the
text baseline."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tlops.core import paths
from tlops.core.config import Params
from tlops.core.io import atomic_path, write_json
from tlops.data.manifest import load_manifest, same_classes, split_items
from tlops.data.version import current_data_version
from tlops.evaluate import scoring
from tlops.evaluate.metrics import compute_metrics, gain
from tlops.evaluate.plots import plot_confusion, write_plots
from tlops.features.dataset import load_feature_dataset
from tlops.features.working_images import for_manifest
from tlops.inputs.images import PreprocessSpec
from tlops.inputs.model_input import preprocess_batches, spec_from_dict
from tlops.inputs.text import TextSpec, load_text
from tlops.models.classifier import load_classifier
from tlops.models.heads import load_head
from tlops.onnx.runtime import softmax

if TYPE_CHECKING:
    from torch import nn


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


def evaluate_models(params: Params) -> dict[str, Any]:
    """Score the head-only and fine-tuned models on the test split; write metrics, DVC plots and PNGs."""
    manifest = load_manifest(paths.MANIFEST)
    items = split_items(manifest, "test")
    head, head_info = load_head(paths.HEAD_DIR)
    model, info = load_classifier(paths.FINETUNE_DIR, tuned=True)
    classes = same_classes(manifest.classes, head_info["classes"], info["classes"])
    head_logits, head_y = head_test_logits(head, classes)
    head_metrics = compute_metrics(head_logits, head_y, classes)
    policy = scoring.policy(params, scoring.train_labels(manifest), manifest.classes)

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
    trust = measure_trust(params, manifest, classes, spec, load)
    report["calibration"], report["ood"] = trust["calibration"], trust["ood"]
    report["explanation"] = trust["explanation"]
    write_json(paths.METRICS, report)
    write_plots(images, shown[1], shown[0], classes, spec, load, params, trust["test_explanation"])
    return report


def exported_classifier() -> tuple[nn.Module, dict]:
    """The model export exports: the adapt stage's (the selected model, adapted or passed through), else the
    selected fine-tuned or head-only one."""
    return load_classifier(paths.ADAPT_DIR if paths.ADAPT_INFO.exists() else paths.FINETUNE_DIR)


def measure_trust(params: Params, manifest: Any, classes: Sequence[str], spec: PreprocessSpec | TextSpec,
                  load: Any) -> dict[str, Any]:
    """What can be trusted of the exported model's outputs, measured with the very module export builds into the
    ONNX file (tlops.export.served): the calibration temperature (validation split) and ECE before/after, the OOD
    fit (training split), its threshold (validation) and AUROC against a far-out set; written for export into
    models/calibration, with the reliability diagram in reports/plots."""
    import torch

    from tlops.evaluate.calibration import calibrate, reliability
    from tlops.evaluate.far_out import far_out_batches, far_out_name
    from tlops.evaluate.ood import fit_parts, measure
    from tlops.evaluate.plots import plot_reliability
    from tlops.export.served import Served, explanation_kind, served_parts

    model, _ = exported_classifier()
    splits = {name: split_items(manifest, name) for name in ("train", "val", "test")}
    example = next(preprocess_batches([p for p, _ in splits["test"][:2]], spec, params.data.max_pixels, load=load))
    kind, why = explanation_kind(model, torch.from_numpy(example))
    served = Served(model, explain=kind)

    def outputs(items: list[tuple[str, int]]) -> dict[str, np.ndarray]:
        batches = preprocess_batches([p for p, _ in items], spec, params.data.max_pixels, load=load)
        return served_parts(served, batches)

    out = {name: outputs(items) for name, items in splits.items()}
    y = {name: np.array([c for _, c in items], dtype=int) for name, items in splits.items()}
    if params.evaluate.calibrate:
        cal = calibrate(out["val"]["logits"], y["val"], out["test"]["logits"], y["test"])
    else:
        cal = {"temperature": 1.0, "reason": "evaluate.calibrate is false: T stays 1.0"}
    t = cal["temperature"]
    probs_before, probs_after = softmax(out["test"]["logits"]), softmax(out["test"]["logits"] / t)
    plot_reliability(reliability(probs_before, y["test"]), reliability(probs_after, y["test"]), t,
                     paths.PLOTS_DIR / "reliability.png")

    def parts(o: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [o[k] for k in sorted(o) if k.startswith("part_")]

    fit = fit_parts(parts(out["train"]), y["train"], len(classes), parts(out["val"]))
    far_name = far_out_name(params.evaluate.far_out, params.data.source, isinstance(spec, TextSpec))
    far = served_parts(served, far_out_batches(far_name, spec, params.data.max_pixels))
    ood = measure(fit, (parts(out["val"]), out["val"]["logits"] / t), (parts(out["test"]), out["test"]["logits"] / t),
                  (parts(far), far["logits"] / t), far_name)
    paths.CALIBRATION_DIR.mkdir(parents=True, exist_ok=True)
    write_json(paths.CALIBRATION, {"temperature": t, "calibration": cal, "ood": ood,
                                   "explanation": {"kind": kind or "", "why": why}})
    with atomic_path(paths.OOD_FIT) as tmp, open(tmp, "wb") as f:
        np.savez(f, **fit)
    # item by item, so that `tlops tune` can tell a trial's gain over the defaults from the validation split's noise
    with atomic_path(paths.VAL_PREDICTIONS) as tmp, open(tmp, "wb") as f:
        np.savez(f, sha256=np.array([r.sha256 for r in manifest.rows_in("val")]), label=y["val"],
                 predicted=out["val"]["logits"].argmax(axis=1), classes=np.array(list(classes)))
    return {"calibration": cal, "ood": ood, "explanation": {"kind": kind or "", "why": why},
            "test_explanation": out["test"]["explanation"] / t if "explanation" in out["test"] else None}


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
    from tlops.core.io import read_json

    if not paths.ADAPT_INFO.exists() or read_json(paths.ADAPT_INFO).get("adapt", {}).get("chosen", "none") == "none":
        return None
    model, info = load_classifier(paths.ADAPT_DIR)
    same_classes(classes, info["classes"])
    return model, info


def target_metrics(params: Params, classes: Sequence[str], adapted: tuple[nn.Module, dict] | None
                   ) -> dict[str, Any] | None:
    """Metrics of the source-only (selected) and the adapted model on the target's labelled test split, with a
    confusion matrix of each in reports/plots; None without target labels."""
    from tlops.data.target import load_target, scored_items
    from tlops.features.working_images import WorkingImages

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


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of a report as {"head.accuracy": ..., "finetuned.ece": ...} for tracking."""
    out = {}
    cal = report.get("calibration") or {}
    if "test" in cal:
        out["calibration.temperature"] = float(cal["temperature"])
        for when in ("before", "after"):
            for k in ("ece", "classwise_ece"):
                out[f"calibration.test_{k}_{when}"] = float(cal["test"][when][k])
    for score in ("mahalanobis", "mahalanobis_embedding", "energy"):
        for k, v in ((report.get("ood") or {}).get(score) or {}).items():
            out[f"ood.{score}.{k}"] = float(v)
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
