"""Prefect task of the ingest stage: materialise data.source as data/raw (DVC-tracked)."""

from __future__ import annotations

from prefect import task

from tlops import data, paths, tracking
from tlops.config import load_params


@task(name="ingest")
def ingest(params_path: str | None = None) -> dict:
    """Write data.source into data/raw/<class>/<image> and record the resulting data version."""
    params = load_params(params_path)
    with tracking.stage_run("ingest", params) as run:
        summary = data.ingest(params.data, paths.RAW)
        summary["data_version"] = data.current_data_version()
        run.set_tags({"data_version": summary["data_version"], "data_source": params.data.source})
        run.log_metrics({"images": summary["images"], "classes": summary["classes"]})
    return summary
