"""Prefect task of the finetune stage: backbone + trained head, top layer groups unfrozen at low LRs."""

from __future__ import annotations

from prefect import task

from tlops import devices, history, paths, tracking, train
from tlops.config import load_params
from tlops.data import load_manifest


@task(name="finetune")
def finetune(params_path: str | None = None) -> dict:
    """Fine-tune on the manifest's images; write models/finetuned, checkpoints and the history CSV."""
    params = load_params(params_path)
    with tracking.stage_run("finetune", params) as run:
        run.set_tags(devices.device_tags(devices.resolve_device(params.finetune.device), params.finetune.precision))
        result = train.finetune(params, load_manifest(paths.MANIFEST), paths.HEAD_DIR, on_epoch=lambda row, epoch:
                                run.log_metrics(history.epoch_metrics(row), step=epoch))
        # Named apart from the per-epoch series (val_accuracy, ...) so those keep one point per epoch.
        run.log_metrics({"finetuned_val_accuracy": result.val_accuracy, "head_val_accuracy": result.head_val_accuracy,
                         "resumed_epochs": float(result.resumed_epochs)})
        run.set_tags({"trunk": result.trunk, "world_size": str(result.world_size)})
        run.log_artifact(paths.FINETUNE_INFO, "model")
        run.log_artifact(paths.FINETUNE_HISTORY, "reports")
    print(f"head-only val accuracy: {result.head_val_accuracy:.4f}; fine-tuned val accuracy: {result.val_accuracy:.4f}"
          + (f" (resumed after epoch {result.resumed_epochs})" if result.resumed_epochs else "")
          + f"; frozen trunk: {result.trunk}")
    return {"val_accuracy": result.val_accuracy, "head_val_accuracy": result.head_val_accuracy,
            "resumed_epochs": result.resumed_epochs, "device": result.device}
