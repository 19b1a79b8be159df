"""Prefect task of the prepare stage: validate data/raw, split it stably, write the manifest and data report."""

from __future__ import annotations

from prefect import task

from tlops import data, paths, tracking
from tlops.config import load_params


@task(name="prepare")
def prepare(params_path: str | None = None) -> dict:
    """Run tlops.data.prepare on data/raw; log its counts, the data version and reports/data.json."""
    params = load_params(params_path)
    with tracking.stage_run("prepare", params) as run:
        report = data.prepare(paths.RAW, params.data, paths.MANIFEST, paths.DATA_REPORT)
        version = data.current_data_version()
        run.set_tags({"data_version": version})
        run.log_metrics({k: float(v) for k, v in report["totals"].items()})
        run.log_artifact(paths.DATA_REPORT)
    return {**report["totals"], "data_version": version}
