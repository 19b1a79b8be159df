"""Prefect task of the export stage: verified ONNX file, registry version `candidate`, promotion gate."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import task

from tlops import drift, onnx_meta, paths, registry, target, tracking
from tlops import export as exporting
from tlops.config import Params, load_params
from tlops.data import load_manifest
from tlops.io import write_json


@task(name="export")
def export(params_path: str | None = None) -> dict:
    """Export + verify the model, register it as `candidate`, move `champion` if it wins; write reports/export.json."""
    params = load_params(params_path)
    with tracking.stage_run("export", params) as run:
        gate = target.gate_split(load_manifest(paths.MANIFEST))  # the target's test split when it has labels, else None
        report = exporting.export_model(params, run.run_id, tracking.git_commit(), gate, drift.model_reference)
        version = register(params, report, run.run_id)
        report["promotion"] = promote(params, version, report["gate"]["score"], run.run_id, report["metric"], gate)
        report["registered"] = {"name": params.export.registered_model, "version": version}
        write_json(paths.EXPORT_REPORT, report)
        run.log_metrics(exporting.flat_metrics(report))
        run.set_tags({"sha256": report["sha256"], "registered_version": version, "selected": report["selected"],
                      "selection_metric": report["metric"]})
        for path in (paths.ONNX_SHA256, paths.MODEL_CARD, paths.EXPORT_REPORT):
            run.log_artifact(path, "export")
        run.log_artifacts(paths.INT8_DIR, "export/int8")
    print(f"exported {paths.ONNX} (sha256 {report['sha256'][:12]}): {report['promotion']['reason']}")
    return {"version": version, "sha256": report["sha256"], "promoted": report["promotion"]["promoted"],
            "test_accuracy": report["test_accuracy"]}


def register(params: Params, report: dict[str, Any], run_id: str) -> str:
    """Log models/model.onnx with mlflow.onnx under export.registered_model; it becomes `candidate`."""
    images, _ = exporting.labelled_test_images(load_manifest(paths.MANIFEST))
    example = exporting.input_example(paths.ONNX, images[0], params.data.max_pixels)
    meta = onnx_meta.read_metadata(paths.ONNX)
    return registry.log_onnx_model(paths.ONNX, example, params.export.registered_model, run_id=run_id,
                                   metadata={k.removeprefix(onnx_meta.PREFIX): v for k, v in meta.items()
                                             if k != onnx_meta.DRIFT_REFERENCE})  # ~100 kB of numbers: in the file


@contextmanager
def promotion_lock(model: str, timeout_s: float = 1800) -> Iterator[None]:
    """A server-side lock around the promotion gate: a Prefect global concurrency limit of 1 named after the
    registered model, on the Prefect server every worker talks to, so two runs finishing at once never both compare
    against the same champion and then both move the alias. Without a configured Prefect API (one machine, a
    temporary server) runs are serialised by the workspace lock already."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        yield
        return
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limit = f"tlops-promotion-{model}"
    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(limit)
            if found.limit != 1 or not found.active:  # someone widened or paused it: a lock admits one
                client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(limit=1, active=True))
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass
    with concurrency(limit, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield


def promote(params: Params, version: str, accuracy: float, run_id: str, metric: str = "accuracy",
            gate: exporting.Gate | None = None) -> dict[str, Any]:
    """The promotion gate: candidate vs current champion on today's test split; tags the decision everywhere."""
    name = params.export.registered_model
    with promotion_lock(name):  # read champion, compare, move the alias: one run at a time against a shared registry
        champion = registry.get_alias_version(name, registry.CHAMPION)
        path = registry.download_model_file(name, champion) if champion else None
        candidate = registry.download_model_file(name, version)  # the registered copy: what `champion` would serve
        decision = exporting.promotion(params, version, accuracy, candidate, path, champion, metric, gate)
        if decision["promoted"]:
            registry.set_alias(name, registry.CHAMPION, version)
    tags = {"promotion.promoted": decision["promoted"], "promotion.reason": decision["reason"],
            "promotion.metric": metric, "promotion.candidate_score": accuracy,
            "promotion.champion_score": decision["champion_score"], "promotion.champion_version": champion,
            "promotion.split": decision.get("split", "source test")}
    registry.set_version_tags(name, version, tags)
    tracking.set_run_tags(run_id, tags)
    return decision
