"""The export stage's work: the selected model to a verified ONNX file (and int8), with its metadata and drift
reference."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tlops.core import paths
from tlops.core.config import Params
from tlops.core.errors import DataError
from tlops.core.io import atomic_path, read_json, write_json, write_text
from tlops.data.manifest import load_manifest, same_classes, split_items
from tlops.data.target import adapt_paths, load_target
from tlops.evaluate import scoring
from tlops.export.lineage import build_metadata, params_hash, write_metadata
from tlops.export.model_card import model_card
from tlops.export.onnx_export import export_onnx
from tlops.export.verify import benchmark, check_parity, onnx_scores, quantize_int8, score_onnx
from tlops.inputs.images import PreprocessSpec
from tlops.inputs.model_input import load_and_preprocess, preprocess_batches, spec_from_dict
from tlops.inputs.text import TextSpec
from tlops.onnx import drift, metadata


def int8_verdict(fp32_acc: float, int8_acc: float, max_drop: float, metric: str = "accuracy") -> tuple[bool, str]:
    """Keep the int8 model only if its `metric` is at most `max_drop` below fp32's."""
    drop = fp32_acc - int8_acc
    said = f"int8 {metric} {int8_acc:.4f} vs fp32 {fp32_acc:.4f} (drop {drop:+.4f}"
    if drop <= max_drop + 1e-9:
        return True, f"{said} <= {max_drop:g}): kept"
    return False, f"{said} > {max_drop:g}): rejected"


Gate = tuple[list[str], list[str], str]  # (images, true class names, the split's name) the promotion gate scores on


def export_model(params: Params, run_id: str | None, git_commit: str | None, gate: Gate | None = None
                 ) -> dict[str, Any]:
    """Export the fine-tuned model to paths.ONNX (+ sha256, model card, int8); return the export report.

    The file is verified (checker, self-contained, parity) under a temp name and only then renamed into
    place, so a model that fails the parity gate never replaces the last good models/model.onnx.
    """
    from tlops.models.classifier import load_classifier

    manifest = load_manifest(paths.MANIFEST)
    model, info = load_classifier(paths.ADAPT_DIR)  # the adapt stage's: the selected model, adapted or passed through
    classes = same_classes(manifest.classes, info["classes"])
    spec, ex, max_pixels = spec_from_dict(info["preprocess"]), params.export, params.data.max_pixels
    images, truth = labelled_test_images(manifest)
    adapted = info.get("adapt", {})
    meta = build_metadata(classes, spec, info["backbone"], info.get("data_version"), git_commit, run_id,
                          params_hash(params), selected=info.get("selected", "finetuned"),
                          adapt_method=adapted.get("chosen", "none"),
                          target_data_version=adapted.get("target_data_version"))
    about_reference = None
    example = next(preprocess_batches(images[:2], spec, max_pixels)) if isinstance(spec, TextSpec) else None
    served, trust = served_module(model, meta, next(preprocess_batches(images[:2], spec, max_pixels)))
    with atomic_path(paths.ONNX) as tmp:
        export_onnx(served, spec.input_size, tmp, ex.opset, served.outputs, example=example)
        parity = check_parity(tmp, served, preprocess_batches(images, spec, max_pixels), ex.parity_atol)
        held_out = [p for p, _ in split_items(manifest, "val")] + images  # unseen by the weights' fitting
        meta[metadata.DRIFT_REFERENCE], about_reference = drift_reference(tmp, held_out, meta[metadata.ADAPT_METHOD],
                                                                          spec, max_pixels)
        write_metadata(tmp, meta)
    sha = metadata.write_sha256(paths.ONNX)
    metric = scoring.policy(params, scoring.train_labels(manifest), manifest.classes).metric
    scores = onnx_scores(paths.ONNX, images, truth, max_pixels, ("accuracy", metric))
    accuracy, score = scores["accuracy"], scores[metric]
    calibration = calibration_images(manifest, ex.calibration_images)
    int8 = export_int8(params, spec, score, images, truth, calibration, metric)
    gate_images, gate_truth, gate_split = gate or (images, truth, "source test")
    gate_score = score if gate_split == "source test" else score_onnx(paths.ONNX, gate_images, gate_truth,
                                                                       max_pixels, metric)
    report = {"onnx": str(paths.ONNX), "opset": ex.opset, "sha256": sha, "parity": parity,
              "selected": info.get("selected", "finetuned"), "adapt_method": adapted.get("chosen", "none"),
              "metric": metric, "test_score": score, "test_accuracy": accuracy, "test_images": len(images),
              "gate": {"split": gate_split, "images": len(gate_images), "score": gate_score}, "int8": int8,
              "drift_reference": about_reference, **trust}
    if paths.LABEL_AUDIT.exists():
        report["label_audit"] = read_json(paths.LABEL_AUDIT)
    metrics = read_json(paths.METRICS) if paths.METRICS.exists() else {}
    write_text(paths.MODEL_CARD, model_card(info, meta, spec, class_counts(manifest), metrics, report))
    return report


def served_module(model: Any, meta: dict[str, str], example: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """The module the ONNX file is exported from (tlops.export.served): the classifier with the evaluate stage's
    temperature and OOD fit (models/calibration) built in, and an explanation output when one is exact for it; the
    metadata says which (meta is updated), the returned dict what was built in and why."""
    import torch

    from tlops.export.served import Served, explanation_kind

    if not paths.CALIBRATION.exists() or not paths.OOD_FIT.exists():
        raise DataError(f"{paths.CALIBRATION_DIR}: missing; the evaluate stage writes it (run the pipeline)")
    measured = read_json(paths.CALIBRATION)
    with np.load(paths.OOD_FIT) as f:
        fit = {k: f[k] for k in f.files}
    kind, why = explanation_kind(model, torch.from_numpy(np.ascontiguousarray(example)))
    t, ood = float(measured["temperature"]), measured["ood"]
    kept = ood[ood["score"]]
    meta[metadata.TEMPERATURE] = repr(t)
    meta[metadata.OOD] = json.dumps({"score": ood["score"], "threshold": kept["threshold"], "tpr": ood["tpr"],
                                     "test_flagged": kept["test_flagged"], "auroc": kept.get("auroc"),
                                     "far_out": (ood.get("far") or {}).get("set")}, sort_keys=True)
    meta[metadata.EXPLAIN] = kind or f"none: {why}"
    return Served(model, t, fit, kind), {"calibration": measured["calibration"], "ood": json.loads(meta[metadata.OOD]),
                                         "explanation": {"kind": kind or "", "why": why}}


def labelled_test_images(manifest: Any) -> tuple[list[str], list[str]]:
    """(image paths, true class names) of the manifest's test split; DataError if it is empty."""
    items = split_items(manifest, "test")
    return [p for p, _ in items], [manifest.classes[c] for _, c in items]


def input_example(onnx_path: str | os.PathLike, image: str | os.PathLike, max_pixels: int) -> np.ndarray:
    """One image preprocessed as the model's metadata says: (1, 3, S, S) float32, for the registry."""
    spec = metadata.spec_of(metadata.read_metadata(onnx_path))
    return load_and_preprocess(image, spec, max_pixels)[None]


def calibration_images(manifest: Any, n: int) -> list[str]:
    """n training images spread evenly over the manifest (sorted by path, so over every class)."""
    rows = manifest.rows_in("train")
    if not rows:
        return []
    idx = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int))
    return [rows[i].path for i in idx]


def class_counts(manifest: Any) -> dict[str, dict[str, int]]:
    """{class: {train: n, val: n, test: n}} of the manifest."""
    counts = {c: {"train": 0, "val": 0, "test": 0} for c in manifest.classes}
    for r in manifest.rows:
        counts[r.label][r.split] += 1
    return counts


def export_int8(params: Params, spec: PreprocessSpec, fp32_acc: float, images: Sequence[str],
                truth: Sequence[str], calibration: Sequence[str], metric: str = "accuracy") -> dict[str, Any]:
    """Quantize paths.ONNX to paths.INT8_ONNX if export.int8; keep it only if its `metric` (fp32's is fp32_acc)
    stays within export.int8_max_drop.

    paths.INT8_DIR always ends up holding quantization.json, which says what happened and why.
    """
    ex, max_pixels = params.export, params.data.max_pixels
    for stale in (paths.INT8_ONNX, metadata.sidecar_path(paths.INT8_ONNX)):
        stale.unlink(missing_ok=True)
    if not ex.int8:
        result = {"enabled": False, "kept": False, "reason": "export.int8 is false"}
    elif not calibration:
        result = {"enabled": True, "kept": False, "reason": "no training images to calibrate on"}
    else:
        text = isinstance(spec, TextSpec)
        quantize_int8(paths.ONNX, paths.INT8_ONNX,
                      None if text else preprocess_batches(calibration, spec, max_pixels, batch=16))
        int8_acc = score_onnx(paths.INT8_ONNX, images, truth, max_pixels, metric)
        keep, reason = int8_verdict(fp32_acc, int8_acc, ex.int8_max_drop, metric)
        x = next(preprocess_batches(images[:32], spec, max_pixels, batch=32))
        how = {"format": "dynamic", "per_channel": True} if text else {
            "format": "QDQ", "per_channel": True, "calibration_images": len(calibration)}
        result = {"enabled": True, "kept": keep, "reason": reason, **how, "metric": metric, "fp32_score": fp32_acc,
                  "int8_score": int8_acc, "drop": fp32_acc - int8_acc, "max_drop": ex.int8_max_drop,
                  "speed": {"fp32": benchmark(paths.ONNX, x), "int8": benchmark(paths.INT8_ONNX, x)}}
        if keep:
            result["sha256"] = metadata.write_sha256(paths.INT8_ONNX)
            result["path"] = str(paths.INT8_ONNX)
        else:
            paths.INT8_ONNX.unlink()
    write_json(paths.INT8_DIR / "quantization.json", result)
    return result


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The export report's numbers for tracking: parity, ONNX accuracy, int8 accuracy and speed, promotion."""
    int8, promo = report.get("int8", {}), report.get("promotion", {})
    out = {"parity.agreement": report["parity"]["agreement"], "parity.max_abs_diff": report["parity"]["max_abs_diff"],
           "onnx.test_accuracy": report["test_accuracy"], f"onnx.test_{report['metric']}": report["test_score"]}
    for key in ("int8_score", "drop"):
        if key in int8:
            out[f"int8.{key}"] = int8[key]
    for precision, speed in int8.get("speed", {}).items():
        out[f"{precision}.latency_ms"] = speed["latency_ms"]
        out[f"{precision}.throughput_ips"] = speed["throughput_ips"]
    if "promoted" in promo:
        out["promotion.promoted"] = float(promo["promoted"])
        if promo.get("champion_score") is not None:
            out["promotion.champion_score"] = promo["champion_score"]
    return {k: float(v) for k, v in out.items()}


def drift_reference(onnx_path: str | os.PathLike, held_out: list[str], adapt_method: str, spec: PreprocessSpec,
                    max_pixels: int) -> tuple[str, dict[str, Any]]:
    """The export stage's tlops.drift_reference: the model's outputs over the traffic it is meant for, and what
    that was. An adapted model is meant for its target domain (the target's adapt images; no labels needed),
    any other for the source images its weights were not fitted to (validation + test splits)."""
    images, split = held_out, "source val+test"
    if adapt_method != "none":
        if target := adapt_paths(load_target()):
            images, split = target, "target adapt"
    ref = drift.outputs_reference(onnx_path, images, spec, max_pixels)
    return drift.to_json(ref), {"split": split, "images": ref["n"], "components": (ref["embedding"] or {}).get("k", 0),
                          "confidence": ref["confidence"]}
