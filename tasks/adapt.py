"""The adapt stage: the selected model carried to the target domain (adapt.target), the shift measured;
`python -m tasks.adapt` is its dvc.yaml cmd."""

from __future__ import annotations

import time

from prefect import task

from orchestration.prefect_server import publish_markdown, run_stage
from tlops.adapt.run import adapt_model
from tlops.adapt.summary import adaptation_report, flat_metrics, markdown, summary_lines
from tlops.core import paths
from tlops.core.config import load_params
from tlops.core.io import write_json
from tlops.data.manifest import load_manifest
from tlops.data.target import load_target
from tlops.tracking.runs import stage_run


@task(name="adapt")
def adapt(params_path: str | None = None) -> dict:
    """Adapt by adapt.method; write models/adapted and reports/adapt.json; log both, publish the report."""
    params = load_params(params_path)
    started = time.perf_counter()
    with stage_run("adapt", params) as run:
        manifest, rows = load_manifest(paths.MANIFEST), load_target(paths.TARGET_MANIFEST)
        result = adapt_model(params, manifest, rows, on_method=lambda c: run.log_metrics(
            {f"{c.method}.im": c.im, f"{c.method}.source_val": c.source_val, f"{c.method}.seconds": c.seconds}))
        report = adaptation_report(result, params, manifest, rows, time.perf_counter() - started)
        write_json(paths.ADAPT_REPORT, report)
        run.set_tags({"adapt.method": result.method, "adapt.chosen": result.chosen,
                      "target_data_version": report["target_data_version"] or ""})
        run.log_metrics(flat_metrics(report))
        run.log_artifact(paths.ADAPT_REPORT, "reports")
        run.log_artifact(paths.ADAPT_INFO, "model")
    publish(report)
    for line in summary_lines(report):
        print(line)
    return {"method": result.method, "chosen": result.chosen,
            "target_accuracy": (report.get("target") or {}).get("adapted", {}).get("accuracy")}


def publish(report: dict) -> None:
    """The adaptation report as a Prefect markdown artifact."""
    publish_markdown(markdown(report), "tlops-adapt",
                     f"domain adaptation: {report['method']} -> {report['chosen']}")


stage_task = adapt

if __name__ == "__main__":
    run_stage(adapt)
