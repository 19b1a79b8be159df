"""The promotion rule, in one place: the exported model is registered as `candidate`, scored against the `champion`
on the same split, and becomes champion only if it beats it by evaluate.promote_min_delta (or there is none)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from tlops.core import paths
from tlops.core.config import Params
from tlops.data.manifest import load_manifest
from tlops.export.package import Gate, input_example, labelled_test_images
from tlops.export.verify import score_onnx
from tlops.onnx import metadata
from tlops.tracking import registry
from tlops.tracking.runs import set_run_tags


def decide_promotion(candidate_acc: float, champion_acc: float | None, min_delta: float,
                     metric: str = "accuracy") -> tuple[bool, str]:
    """Promote when there is no champion, or when the candidate is strictly better AND better by >= min_delta.

    "Strictly better" makes min_delta = 0 mean "any improvement": re-exporting an identical model (equal
    accuracy) never moves the alias back and forth. A tiny epsilon absorbs float error in k/n accuracies.
    """
    eps = 1e-9
    if champion_acc is None or math.isnan(champion_acc):
        return True, f"no champion yet: candidate ({metric} {candidate_acc:.4f}) becomes champion"
    delta = candidate_acc - champion_acc
    if delta > eps and delta >= min_delta - eps:
        return True, (f"candidate {metric} {candidate_acc:.4f} beats champion {champion_acc:.4f} by {delta:+.4f} "
                      f"(>= {min_delta:g})")
    need = "any improvement" if min_delta == 0 else f"an improvement of at least {min_delta:g}"
    return False, (f"candidate {metric} {candidate_acc:.4f} vs champion {champion_acc:.4f} ({delta:+.4f}): "
                   f"needs {need}")


def promotion(params: Params, candidate_version: str, candidate_score: float, candidate_path: str | os.PathLike,
              champion_path: str | os.PathLike | None, champion_version: str | None,
              metric: str = "accuracy", gate: Gate | None = None) -> dict[str, Any]:
    """Score the champion (if any) by `metric` on the gate's split (default: the source test split) exactly like the
    candidate was, and decide.

    A champion of another task (other labels, or another kind of input) is no rival: it is not scored, the
    candidate is not promoted over it, and the reason says so.
    """
    min_delta = params.evaluate.promote_min_delta
    images, truth, split = gate or (*labelled_test_images(load_manifest(paths.MANIFEST)), "source test")
    decision = {"metric": metric, "min_delta": min_delta, "candidate_version": candidate_version,
                "candidate_score": candidate_score, "champion_version": champion_version,
                "champion_score": None, "comparable": True, "split": split}
    if champion_path is not None:
        mine, theirs = (metadata.task_of(metadata.read_metadata(p)) for p in (candidate_path, champion_path))
        if mine != theirs:
            reason = (f"not compared: champion v{champion_version} is a model of another task "
                      f"({metadata.describe_task(theirs)}) than the candidate ({metadata.describe_task(mine)}); the "
                      f"champion stays. Give this task its own export.registered_model (now "
                      f"{params.export.registered_model!r}) to track its champion")
            return {**decision, "promoted": False, "comparable": False, "reason": reason,
                    "champion_after": champion_version}
        decision["champion_score"] = score_onnx(champion_path, images, truth, params.data.max_pixels, metric)
    promote, reason = decide_promotion(candidate_score, decision["champion_score"], min_delta, metric)
    reason = f"{reason} (on the {split} split, {len(images)} images)"
    return {**decision, "promoted": promote, "reason": reason,
            "champion_after": candidate_version if promote else champion_version}


def register(params: Params, report: dict[str, Any], run_id: str) -> str:
    """Log models/model.onnx with mlflow.onnx under export.registered_model; it becomes `candidate`."""
    images, _ = labelled_test_images(load_manifest(paths.MANIFEST))
    example = input_example(paths.ONNX, images[0], params.data.max_pixels)
    meta = metadata.read_metadata(paths.ONNX)
    return registry.log_onnx_model(paths.ONNX, example, params.export.registered_model, run_id=run_id,
                                   metadata={k.removeprefix(metadata.PREFIX): v for k, v in meta.items()
                                             if k != metadata.DRIFT_REFERENCE})  # ~100 kB of numbers: in the file


def promote(params: Params, version: str, score: float, run_id: str, metric: str = "accuracy",
            gate: Gate | None = None, lock: Callable[[str], AbstractContextManager] = lambda _: nullcontext()
            ) -> dict[str, Any]:
    """The gate: candidate vs current champion on today's test split, the alias moved if it wins, the decision tagged
    on the version and the run. `lock(model)` guards read-compare-move when several workers share the registry."""
    name = params.export.registered_model
    with lock(name):  # read champion, compare, move the alias: one run at a time against a shared registry
        champion = registry.get_alias_version(name, registry.CHAMPION)
        path = registry.download_model_file(name, champion) if champion else None
        candidate = registry.download_model_file(name, version)  # the registered copy: what `champion` would serve
        decision = promotion(params, version, score, candidate, path, champion, metric, gate)
        if decision["promoted"]:
            registry.set_alias(name, registry.CHAMPION, version)
    tags = {"promotion.promoted": decision["promoted"], "promotion.reason": decision["reason"],
            "promotion.metric": metric, "promotion.candidate_score": score,
            "promotion.champion_score": decision["champion_score"], "promotion.champion_version": champion,
            "promotion.split": decision.get("split", "source test")}
    registry.set_version_tags(name, version, tags)
    set_run_tags(run_id, tags)
    return decision
