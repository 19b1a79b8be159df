"""The ingest_target stage: the target-domain folder (adapt.target) copied, validated and split, for adaptation;
`python -m tasks.ingest_target` is its dvc.yaml cmd."""

from __future__ import annotations

from prefect import task

from orchestration.prefect_server import run_stage
from tlops.core import paths
from tlops.core.config import load_params
from tlops.data.target_ingest import ingest_target_folder
from tlops.data.version import data_version
from tlops.tracking.runs import stage_run


@task(name="ingest_target")
def ingest_target(params_path: str | None = None) -> dict:
    """Copy and validate the target-domain images; log their counts and data version."""
    params = load_params(params_path)
    with stage_run("ingest_target", params) as run:
        report = ingest_target_folder(params)
        version = data_version(folder=paths.TARGET)
        run.set_tags({"target_data_version": version, "adapt.target": params.adapt.target or ""})
        run.log_metrics({f"target.{k}": float(v) for k, v in report["totals"].items()})
        run.log_artifact(paths.TARGET_REPORT)
    t = report["totals"]
    if params.adapt.target:
        print(f"target domain: {t['images']} images ({t['adapt']} adapt, {t['test']} test, {t['labelled']} labelled), "
              f"{t['quarantined']} quarantined")
    return {**t, "target_data_version": version}


stage_task = ingest_target

if __name__ == "__main__":
    run_stage(ingest_target)
