"""The adapt stage's report: scores, summary and markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tlops.adapt.losses import domain_shift
from tlops.adapt.methods import eval_outputs
from tlops.adapt.run import AdaptResult
from tlops.core.config import Params
from tlops.data.manifest import split_items
from tlops.data.target import scored_items
from tlops.evaluate import scoring
from tlops.onnx.runtime import softmax


def adaptation_report(result: AdaptResult, params: Params, manifest: Any, target_rows: list, seconds: float
                      ) -> dict[str, Any]:
    """reports/adapt.json: the method and choice, the shift, target and source accuracies of both models, and what
    each candidate scored (target accuracies only when target labels exist; they decided nothing)."""
    out: dict[str, Any] = {"method": result.method, "chosen": result.chosen, "target": None, "shift": None,
                           "target_data_version": result.info["adapt"]["target_data_version"]}
    if not target_rows:
        return out
    d = result.domains
    source, target = d.source_images, d.target_images
    classes = list(result.info["classes"])
    test_paths, test_y, unknown = scored_items(target_rows, classes)
    source_test = split_items(manifest, "test")
    model, chosen = result.model, {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    device = next(model.parameters()).device
    target_paths = [r.path for r in target_rows]
    at = {p: i for i, p in enumerate(target_paths)}
    test_at = [at[p] for p in test_paths]  # the labelled test images among all the target's
    scored: dict[str, dict] = {}
    test_logits: dict[str, np.ndarray] = {}  # by candidate: each model's target test logits, computed once
    for name, candidate in (("source_only", "none"), ("adapted", result.chosen)):
        if candidate in test_logits:  # nothing adapted: the adapted model is the source-only one
            scored[name] = scored["source_only"]
            continue
        scored_as = result.candidates.get(candidate, result.source_only)  # the chosen one, or none
        model.load_state_dict(result.source_only.state if name == "source_only" else chosen)
        s_feats, s_logits = eval_outputs(model, [p for p, _ in source_test], source, d, device, scored_as.cut)
        t_feats, t_logits = eval_outputs(model, target_paths, target, d, device, scored_as.cut)
        test_logits[candidate] = t_logits[test_at]
        scored[name] = {"source": scores(s_logits, [c for _, c in source_test], len(classes)),
                        "target_mean_confidence": float(softmax(t_logits).max(1).mean()) if len(t_logits) else None,
                        "source_mean_confidence": float(softmax(s_logits).max(1).mean())}
        if name == "source_only":
            out["shift"] = {**domain_shift(s_feats, t_feats, params.adapt.seed),
                            "target_mean_confidence": scored[name]["target_mean_confidence"],
                            "source_mean_confidence": scored[name]["source_mean_confidence"]}
        if test_paths:
            scored[name]["target"] = scores(test_logits[candidate], test_y, len(classes))
    out["source"] = {name: s["source"] for name, s in scored.items()}
    out["target_images"] = {"adapt": sum(r.split == "adapt" for r in target_rows), "test": len(test_paths),
                            "unknown_labels": unknown}
    out["adapted_target_mean_confidence"] = scored["adapted"]["target_mean_confidence"]
    if test_paths:
        out["target"] = {"source_only": scored["source_only"]["target"], "adapted": scored["adapted"]["target"],
                         "n_test": len(test_paths)}
        out["target"]["gain"] = out["target"]["adapted"]["accuracy"] - out["target"]["source_only"]["accuracy"]
    out["criterion"] = ("agreement with the ensemble of the source-only model and the methods within "
                        f"adapt.max_source_drop = {params.adapt.max_source_drop:g} of its source validation "
                        f"{result.info['adapt']['metric']}, on the target adapt images" if result.method == "auto"
                        else None)
    out["candidates"] = {}
    for name, c in {"none": result.source_only, **result.candidates}.items():
        row = {"im": c.im, "source_val": c.source_val, "seconds": round(c.seconds, 2),
               "resumed_epochs": c.resumed_epochs, "agreement": result.agreement.get(name),
               "epochs": len(c.history), "pruned_at": c.pruned_at}
        if test_paths:  # for the reader only: computed after the choice, from labels adaptation never saw
            if name not in test_logits:
                model.load_state_dict(c.state)
                test_logits[name] = eval_outputs(model, test_paths, target, d, device, c.cut)[1]
            row["target_accuracy"] = float((test_logits[name].argmax(1) == np.array(test_y)).mean())
        out["candidates"][name] = row
    model.load_state_dict(chosen)
    out["seconds"] = round(seconds, 2)
    return out


def scores(logits: np.ndarray, y: Sequence[int], num_classes: int) -> dict[str, float]:
    """Every tlops.evaluate.scoring metric of logits against labels."""
    return {m: scoring.score(m, np.asarray(y), logits.argmax(1), num_classes) for m in scoring.METRICS}


def flat_metrics(rep: dict[str, Any]) -> dict[str, float]:
    """The report's numbers for MLflow: shift.*, target.*, source.*, candidate.<method>.*."""
    out: dict[str, float] = {}
    for k, v in (rep.get("shift") or {}).items():
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            out[f"shift.{k}"] = float(v)
    for section in ("target", "source"):
        for model_name, scores in (rep.get(section) or {}).items():
            if isinstance(scores, dict):
                out.update({f"{section}.{model_name}.{k}": float(v) for k, v in scores.items()
                            if isinstance(v, (int, float))})
    for name, row in (rep.get("candidates") or {}).items():
        out.update({f"candidate.{name}.{k}": float(v) for k, v in row.items()
                    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))})
    return out


def summary_lines(rep: dict[str, Any]) -> list[str]:
    """What the stage prints."""
    if rep.get("shift") is None:
        return [f"adapt: method {rep['method']}, no target domain (adapt.target is null): the fine-tuned model "
                "passes through"]
    s = rep["shift"]
    lines = [f"shift: domain AUC {s['domain_auc']:.3f}, proxy A-distance {s['proxy_a_distance']:.2f}, target mean "
             f"confidence {s['target_mean_confidence']:.3f} (source {s['source_mean_confidence']:.3f})",
             f"adapt: method {rep['method']}, chosen {rep['chosen']}"]
    if t := rep.get("target"):
        lines.append(f"target test accuracy: source-only {t['source_only']['accuracy']:.4f}, adapted "
                     f"{t['adapted']['accuracy']:.4f} ({t['gain']:+.4f}, {t['n_test']} images)")
    src = rep["source"]
    lines.append(f"source test accuracy: source-only {src['source_only']['accuracy']:.4f}, adapted "
                 f"{src['adapted']['accuracy']:.4f}")
    return lines


def markdown(rep: dict[str, Any]) -> str:
    """The report as the Prefect artifact shows it: the summary lines, then one row per candidate."""
    lines = ["# Domain adaptation", "", *[f"- {line}" for line in summary_lines(rep)]]
    if rep.get("candidates"):
        lines += ["", "| method | ensemble agreement (target) | IM score (target) | source val | target test accuracy "
                  "| seconds |", "|---|---:|---:|---:|---:|---:|"]
        for name, row in rep["candidates"].items():
            acc, agree = row.get("target_accuracy"), row.get("agreement")
            mark = (" (chosen)" if name == rep["chosen"] else
                    f" (stopped after {row['pruned_at']} epoch(s))" if row.get("pruned_at") else "")
            lines.append(f"| {name}{mark} | {'-' if agree is None else f'{agree:.4f}'} | {row['im']:.4f} | "
                         f"{row['source_val']:.4f} | {'-' if acc is None else f'{acc:.4f}'} | {row['seconds']:.1f} |")
        if rep.get("criterion"):
            lines += ["", f"Chosen by {rep['criterion']}; target labels decided nothing."]
    return "\n".join(lines) + "\n"
