"""The export stage: the selected model as a verified ONNX file (and int8), registered as `candidate`, promoted to
`champion` when it wins; `python -m tasks.export` is its dvc.yaml cmd."""

from __future__ import annotations

from prefect import task

from orchestration.prefect_server import run_stage
from orchestration.promotion_lock import promotion_lock
from tlops.core import paths
from tlops.core.config import load_params
from tlops.core.io import write_json
from tlops.data.manifest import load_manifest
from tlops.data.target import gate_split
from tlops.export.package import export_model, flat_metrics
from tlops.export.promotion import promote, register
from tlops.tracking.runs import git_commit, stage_run


@task(name="export")
def export(params_path: str | None = None) -> dict:
    """Export + verify the model, register it as `candidate`, move `champion` if it wins; write reports/export.json."""
    params = load_params(params_path)
    with stage_run("export", params) as run:
        gate = gate_split(load_manifest(paths.MANIFEST))  # the target's test split when it has labels, else None
        report = export_model(params, run.run_id, git_commit(), gate)
        version = register(params, report, run.run_id)
        report["promotion"] = promote(params, version, report["gate"]["score"], run.run_id, report["metric"], gate,
                                      lock=promotion_lock)
        report["registered"] = {"name": params.export.registered_model, "version": version}
        write_json(paths.EXPORT_REPORT, report)
        run.log_metrics(flat_metrics(report))
        run.set_tags({"sha256": report["sha256"], "registered_version": version, "selected": report["selected"],
                      "selection_metric": report["metric"]})
        for path in (paths.ONNX_SHA256, paths.MODEL_CARD, paths.EXPORT_REPORT):
            run.log_artifact(path, "export")
        run.log_artifacts(paths.INT8_DIR, "export/int8")
    print(f"exported {paths.ONNX} (sha256 {report['sha256'][:12]}): {report['promotion']['reason']}")
    return {"version": version, "sha256": report["sha256"], "promoted": report["promotion"]["promoted"],
            "test_accuracy": report["test_accuracy"]}


stage_task = export

if __name__ == "__main__":
    run_stage(export)
