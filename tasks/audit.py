"""The audit stage: the training labels checked from the cached features (the head trained on K folds, confident
learning on its out-of-fold probabilities) before they teach the model; `python -m tasks.audit` is its dvc.yaml
cmd. It never runs the backbone."""

from __future__ import annotations

from prefect import task

from orchestration.prefect_server import publish_markdown, run_stage
from tlops.core import paths
from tlops.core.config import load_params
from tlops.core.io import write_json, write_text
from tlops.data.label_issues import COLUMNS
from tlops.data.manifest import load_manifest
from tlops.evaluate.plots import plot_worst_texts, write_csv
from tlops.features.dataset import load_feature_dataset
from tlops.features.working_images import for_manifest
from tlops.inputs.images import PreprocessSpec
from tlops.tracking.runs import stage_run
from tlops.training.label_audit import find_suspects, write_audit


@task(name="audit")
def audit(params_path: str | None = None) -> dict:
    """Flag suspected label errors; write reports/label_issues.csv, reports/label_audit.json and the top suspects."""
    params = load_params(params_path)
    mode = params.data.label_issues
    with stage_run("audit", params) as run:
        if mode == "off":  # the outputs exist all the same, empty, so the stages after it read one thing
            write_csv(paths.LABEL_ISSUES, [], COLUMNS)
            report = {"mode": "off", "flagged": {"train": 0, "val": 0, "test": 0}, "dropped": 0}
            write_json(paths.LABEL_AUDIT, report)
            paths.LABEL_ISSUES_DIR.mkdir(parents=True, exist_ok=True)
            write_text(paths.LABEL_ISSUES_DIR / "suspects.md", "# Label audit off (data.label_issues: off)\n")
            plot_worst_texts([], params.data.max_chars, paths.LABEL_ISSUES_DIR / "grid.png")
        else:
            ds = load_feature_dataset(paths.FEATURES_DATASET)
            suspects, summary = find_suspects(ds, params)
            if ds.meta["spec"].get("kind") == "text":  # texts are shown as text: no tokenizer needed
                spec, load = None, None
            else:
                spec = PreprocessSpec.from_dict(ds.meta["spec"])
                load = for_manifest(load_manifest(paths.MANIFEST), spec, params.data.max_pixels).get
            report = write_audit(suspects, summary, mode, spec, load, params.data.max_chars)
            run.log_metrics({"audit.flagged_train": report["flagged"]["train"], "audit.dropped": report["dropped"],
                             "audit.out_of_fold_accuracy": report["out_of_fold_accuracy"]})
            run.log_artifact(paths.LABEL_ISSUES, "reports")
            run.log_artifact(paths.LABEL_ISSUES_DIR / "grid.png", "reports/label_issues")
            run.log_artifact(paths.LABEL_ISSUES_DIR / "suspects.md", "reports/label_issues")
            publish(report)
        run.log_artifact(paths.LABEL_AUDIT, "reports")
    flagged = report["flagged"]
    print(f"label audit ({mode}): {flagged['train']} training items flagged"
          + (f", {report['dropped']} left out of training" if report["dropped"] else "")
          + f"; {flagged['val']} validation and {flagged['test']} test items reported")
    return report


def publish(report: dict) -> None:
    """The top suspects as a Prefect markdown artifact."""
    publish_markdown((paths.LABEL_ISSUES_DIR / "suspects.md").read_text(encoding="utf-8"), "tlops-label-audit",
                     f"label audit: {report['flagged']['train']} training items flagged")


stage_task = audit

if __name__ == "__main__":
    run_stage(audit)
