"""The ingest stage: data.source materialised as data/raw (DVC-tracked); `python -m tasks.ingest` is its dvc.yaml
cmd."""

from __future__ import annotations

from prefect import task

from orchestration.prefect_server import run_stage
from tlops.core import paths
from tlops.core.config import load_params
from tlops.data.sources import ingest_source
from tlops.data.version import current_data_version
from tlops.tracking.runs import stage_run


@task(name="ingest")
def ingest(params_path: str | None = None) -> dict:
    """Write data.source into data/raw/<class>/<file> and record the resulting data version."""
    params = load_params(params_path)
    with stage_run("ingest", params) as run:
        summary = ingest_source(params.data, paths.RAW)
        summary["data_version"] = current_data_version()
        run.set_tags({"data_version": summary["data_version"], "data_source": params.data.source})
        run.log_metrics({"images": summary["images"], "classes": summary["classes"]})
    return summary


stage_task = ingest

if __name__ == "__main__":
    run_stage(ingest)
