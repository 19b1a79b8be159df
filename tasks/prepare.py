"""The prepare stage: data/raw validated, de-duplicated and split stably into the manifest and reports/data.json;
`python -m tasks.prepare` is its dvc.yaml cmd."""

from __future__ import annotations

from prefect import task

from orchestration.prefect_server import run_stage
from tlops.core import paths
from tlops.core.config import load_params
from tlops.data.prepare import prepare_data
from tlops.data.version import current_data_version
from tlops.tracking.runs import stage_run


@task(name="prepare")
def prepare(params_path: str | None = None) -> dict:
    """Prepare data/raw; log its counts, the data version and reports/data.json."""
    params = load_params(params_path)
    with stage_run("prepare", params) as run:
        report = prepare_data(paths.RAW, params.data, paths.MANIFEST, paths.DATA_REPORT)
        version = current_data_version()
        run.set_tags({"data_version": version})
        run.log_metrics({k: float(v) for k, v in report["totals"].items()})
        run.log_artifact(paths.DATA_REPORT)
    return {**report["totals"], "data_version": version}


stage_task = prepare

if __name__ == "__main__":
    run_stage(prepare)
