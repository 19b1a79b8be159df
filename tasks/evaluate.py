"""The evaluate stage: the head alone, the fine-tuned and the adapted model on the test split, side by side, and
where the model errs; `python -m tasks.evaluate` is its dvc.yaml cmd."""

from __future__ import annotations

from prefect import task

from orchestration.prefect_server import run_stage
from tlops.core import paths
from tlops.core.config import load_params
from tlops.evaluate.evaluation import evaluate_models, flat_metrics, summary_lines
from tlops.tracking.runs import stage_run


@task(name="evaluate")
def evaluate(params_path: str | None = None) -> dict:
    """Evaluate; log its metrics, reports and plots; print head-only vs fine-tuned accuracy."""
    params = load_params(params_path)
    with stage_run("evaluate", params) as run:
        report = evaluate_models(params)
        run.log_metrics(flat_metrics(report))
        for path in (paths.METRICS, paths.CONFUSION, paths.HISTORY):
            run.log_artifact(path, "reports")
        run.log_artifacts(paths.PLOTS_DIR, "plots")
    for line in summary_lines(report):
        print(line)
    return {"head_accuracy": report["head"]["accuracy"], "finetuned_accuracy": report["finetuned"]["accuracy"],
            "test_images": report["test_images"]}


stage_task = evaluate

if __name__ == "__main__":
    run_stage(evaluate)
