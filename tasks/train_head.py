"""Prefect task of the train_head stage: the new head on cached features (frozen base), best of a small grid."""

from __future__ import annotations

from prefect import task

from tlops import history, paths, scoring, tracking, train
from tlops.config import load_params
from tlops.data import load_manifest
from tlops.features import load_feature_dataset


@task(name="train_head")
def train_head(params_path: str | None = None) -> dict:
    """Train the head on features/dataset.npz; write models/head and reports/head_history.csv."""
    params = load_params(params_path)
    with tracking.stage_run("train_head", params) as run:
        ds = load_feature_dataset(paths.FEATURES_DATASET)
        policy = scoring.policy(params, load_manifest(paths.MANIFEST))
        result = train.train_head(ds, params.head, on_epoch=lambda row, epoch: run.log_metrics(
            history.epoch_metrics(row), step=epoch), metric=policy.metric,
            class_weighted=policy.weighted(params.head.class_weighting))
        train.save_head(result)
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
