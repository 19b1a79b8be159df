"""Prefect task of the ingest_target stage: adapt.target as data/target (DVC-tracked), validated, split adapt|test."""

from __future__ import annotations

from prefect import task

from tlops import data, paths, target, tracking
from tlops.config import load_params


@task(name="ingest_target")
def ingest_target(params_path: str | None = None) -> dict:
    """Copy and validate the target-domain images; log their counts and data version."""
    params = load_params(params_path)
    with tracking.stage_run("ingest_target", params) as run:
        report = target.ingest_target(params)
        version = data.data_version(folder=paths.TARGET)
        run.set_tags({"target_data_version": version, "adapt.target": params.adapt.target or ""})
        run.log_metrics({f"target.{k}": float(v) for k, v in report["totals"].items()})
        run.log_artifact(paths.TARGET_REPORT)
    t = report["totals"]
    if params.adapt.target:
        print(f"target domain: {t['images']} images ({t['adapt']} adapt, {t['test']} test, {t['labelled']} labelled), "
              f"{t['quarantined']} quarantined")
    return {**t, "target_data_version": version}
