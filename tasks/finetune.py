"""The finetune stage: backbone + trained head, the top layer groups unfrozen at small, discriminative learning
rates; `python -m tasks.finetune` is its dvc.yaml cmd."""

from __future__ import annotations

from prefect import task

from orchestration.prefect_server import run_stage
from tlops.core import paths
from tlops.core.config import load_params
from tlops.data.label_issues import dropped_items
from tlops.data.manifest import load_manifest
from tlops.tracking.runs import stage_run
from tlops.training.devices import device_tags, resolve_device
from tlops.training.epochs import epoch_metrics
from tlops.training.finetune import finetune_model
from tlops.tuning.pruning import epoch_reporter


@task(name="finetune")
def finetune(params_path: str | None = None) -> dict:
    """Fine-tune on the manifest's images; write models/finetuned, checkpoints and the history CSV."""
    params = load_params(params_path)
    with stage_run("finetune", params) as run:
        run.set_tags(device_tags(resolve_device(params.finetune.device), params.finetune.precision))
        manifest = load_manifest(paths.MANIFEST).without_training(dropped_items())  # data.label_issues: drop
        report = epoch_reporter()  # a `tlops tune` trial: each epoch's validation metric to the study, which may prune

        def on_epoch(row: dict, epoch: int) -> None:
            run.log_metrics(epoch_metrics(row), step=epoch)
            if report:
                report(row, epoch)

        result = finetune_model(params, manifest, paths.HEAD_DIR, on_epoch=on_epoch)
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


stage_task = finetune

if __name__ == "__main__":
    run_stage(finetune)
