"""Prefect task of the evaluate stage: head-only vs fine-tuned on the test split, metrics and plots."""

from __future__ import annotations

from prefect import task

from tlops import evaluate as evaluation
from tlops import paths, tracking
from tlops.config import load_params


@task(name="evaluate")
def evaluate(params_path: str | None = None) -> dict:
    """Run tlops.evaluate.evaluate; log its metrics, reports and plots; print head-only vs fine-tuned accuracy."""
    params = load_params(params_path)
    with tracking.stage_run("evaluate", params) as run:
        report = evaluation.evaluate(params)
        run.log_metrics(evaluation.flat_metrics(report))
        for path in (paths.METRICS, paths.CONFUSION, paths.HISTORY):
            run.log_artifact(path, "reports")
        run.log_artifacts(paths.PLOTS_DIR, "plots")
    for line in evaluation.summary_lines(report):
        print(line)
    return {"head_accuracy": report["head"]["accuracy"], "finetuned_accuracy": report["finetuned"]["accuracy"],
            "test_images": report["test_images"]}
