"""The train_head stage: a new head trained on the cached features while the backbone stays frozen;
`python -m tasks.train_head` is its dvc.yaml cmd."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from orchestration.prefect_server import run_stage
from tlops.core import paths
from tlops.core.config import Params, load_params
from tlops.data.label_issues import dropped_items
from tlops.evaluate.scoring import Policy, policy
from tlops.features.dataset import FeatureDataset, load_feature_dataset
from tlops.tracking.runs import stage_run
from tlops.training.epochs import epoch_metrics
from tlops.training.head import save_head, train_head_grid


def head_inputs(params: Params, dataset: Path = paths.FEATURES_DATASET) -> tuple[FeatureDataset, Policy]:
    """The cached features the head trains on (data.label_issues: drop leaves flagged items out) and the selection
    policy (metric, class weighting) its grid goes by; `tlops tune`'s head trials read the same (`dataset`: the
    features at another input size)."""
    ds = load_feature_dataset(dataset).without_training(dropped_items())
    return ds, policy(params, ds.image_labels("train"), ds.classes)


@task(name="train_head")
def train_head(params_path: str | None = None) -> dict:
    """Train the head on features/dataset.npz; write models/head and reports/head_history.csv."""
    params = load_params(params_path)
    with stage_run("train_head", params) as run:
        ds, selection = head_inputs(params)
        result = train_head_grid(ds, params.head, on_epoch=lambda row, epoch: run.log_metrics(
            epoch_metrics(row), step=epoch), metric=selection.metric,
            class_weighted=selection.weighted(params.head.class_weighting))
        save_head(result)
        run.set_tags({"device": "cpu", "backbone": result.backbone.get("backbone", ""),
                      "head.best_lr": result.lr, "head.best_weight_decay": result.weight_decay,
                      "selection_metric": result.metric, "class_weighted": result.class_weighted})
        run.log_metrics({"head_val_accuracy": result.val_accuracy, "head_val_loss": result.val_loss,
                         f"head_val_{result.metric}": result.val_metric, "head_epochs": float(result.epochs)})
        run.log_artifact(paths.HEAD_INFO, "head")
        run.log_artifact(paths.HEAD_HISTORY, "reports")
    print(f"head-only val accuracy: {result.val_accuracy:.4f} "
          f"(lr {result.lr:g}, weight decay {result.weight_decay:g}, {result.epochs} epochs)")
    return {"head_val_accuracy": result.val_accuracy, "lr": result.lr, "weight_decay": result.weight_decay,
            "epochs": result.epochs}


stage_task = train_head

if __name__ == "__main__":
    run_stage(train_head)
