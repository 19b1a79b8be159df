"""Fine-tuning: the head's backbone unfrozen group by group with discriminative learning rates, checkpointed every
epoch, resumable, data-parallel over ranks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tlops.core import paths
from tlops.core.config import FinetuneParams, Params
from tlops.core.errors import DataError
from tlops.core.io import sha256_file, write_json
from tlops.data.manifest import split_items
from tlops.data.version import current_data_version
from tlops.evaluate import scoring
from tlops.evaluate.scoring import score
from tlops.features.working_images import for_manifest
from tlops.inputs.images import PreprocessSpec
from tlops.inputs.text import TextSpec
from tlops.models.backbones import create_backbone
from tlops.models.classifier import Classifier
from tlops.models.heads import load_head, save_state
from tlops.training import distributed
from tlops.training.augment import view_of, working_spec
from tlops.training.checkpoint import latest_checkpoint, restore_checkpoint, run_fingerprint, save_checkpoint
from tlops.training.devices import amp_dtype, resolve_device, torch_threads
from tlops.training.epochs import (
    OnEpoch,
    check_finite,
    class_weight_tensor,
    evaluate_logits,
    history_row,
    write_history,
)
from tlops.training.loaders import (
    ImageDataset,
    TextDataset,
    batches_of,
    epoch_order,
    eval_loader,
    text_dataset,
    train_dataset,
    train_loader,
)
from tlops.training.schedule import lr_factor, param_groups, set_trainable, small_data_scale, unfrozen_at, warmup_steps
from tlops.training.trunk import EVAL_VIEW, Trunk

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    model: Classifier  # the selected model: fine-tuned at its best epoch, or the frozen base with the head
    info: dict  # what model.json holds
    history: list[dict]
    val_accuracy: float  # of the best fine-tuning epoch
    val_loss: float
    head_val_accuracy: float
    device: str
    resumed_epochs: int  # epochs restored from a checkpoint; 0 for a fresh start
    trunk: str  # how the frozen trunk ran: "cached", or why it did not
    selected: str = "finetuned"  # finetuned | head: which of the two is better on validation (and exported)
    world_size: int = 1  # processes that trained it (finetune.processes)


@dataclass
class Setup:
    """Everything the fine-tuning loop works on, built from params before the first epoch."""

    model: Classifier
    backbone: Any  # tlops.models.backbones.Backbone
    spec: PreprocessSpec | TextSpec  # the working spec: what model.json records and every consumer decodes by
    top: list[nn.Module]  # the groups that may train, top first
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    device: torch.device
    train_set: ImageDataset | TextDataset
    val_set: ImageDataset | TextDataset
    classes: list[str]
    head_info: dict
    fingerprint: str
    trunk: Trunk | None  # None: every step runs the whole backbone (why: trunk_reason)
    trunk_reason: str
    metric: str  # the selection metric (tlops.evaluate.scoring)
    loss_weight: torch.Tensor | None  # class weights of the loss on an imbalanced training split
    initial: dict[str, torch.Tensor]  # the frozen base + head before fine-tuning: the head-only model
    world: distributed.World = distributed.World()  # this process's rank among finetune.processes


def finetune_model(params: Params, manifest: Any, head_dir: str | Path = paths.HEAD_DIR,
             out_dir: str | Path = paths.FINETUNE_DIR, checkpoint_dir: str | Path = paths.CHECKPOINT_DIR,
             on_epoch: OnEpoch | None = None, history_path: str | Path = paths.FINETUNE_HISTORY,
             images_dir: str | Path = paths.FEATURES_IMAGES) -> FinetuneResult:
    """Fine-tune backbone + trained head on the manifest's images; write model.safetensors + model.json.

    The run keeps its best epoch by the validation metric (not its last) and stops after finetune.patience epochs
    without a better one; then the better on validation of that and the head-only model is `selected`.
    Resumes from the newest checkpoint in checkpoint_dir made with the same params, head and data.
    """
    ft = params.finetune
    n = distributed.processes(ft.processes, ft.device)
    if n > 1 and distributed.world().size == 1:
        return _launch(n, params, manifest, Path(head_dir), Path(out_dir), Path(checkpoint_dir), on_epoch,
                       Path(history_path), Path(images_dir))
    with torch_threads(ft.num_threads):
        return _finetune(params, manifest, head_dir, Path(out_dir), Path(checkpoint_dir), on_epoch, history_path,
                         Path(images_dir))


def _launch(n: int, params: Params, manifest: Any, head_dir: Path, out_dir: Path, checkpoint_dir: Path,
            on_epoch: OnEpoch | None, history_path: Path, images_dir: Path) -> FinetuneResult:
    """finetune.processes ranks under torch.distributed.run; this process reports rank 0's epochs and result."""
    summary = distributed.launch(rank_main, (params, manifest, head_dir, out_dir, checkpoint_dir, history_path,
                                             images_dir), n, params.finetune.device)
    if on_epoch:
        start = summary["resumed_epochs"]
        for i, row in enumerate(summary["history"][start:], start + 1):
            on_epoch({**row, "step": i}, row["epoch"])
    from tlops.models.classifier import load_classifier

    model, info = load_classifier(out_dir)
    return FinetuneResult(model, info, summary["history"], summary["val_accuracy"], summary["val_loss"],
                          summary["head_val_accuracy"], summary["device"], summary["resumed_epochs"], summary["trunk"],
                          summary["selected"], world_size=n)


def rank_main(params: Params, manifest: Any, head_dir: Path, out_dir: Path, checkpoint_dir: Path, history_path: Path,
              images_dir: Path, backend: str) -> dict | None:
    """One rank of a distributed fine-tuning run (torch.distributed.run's entry point); rank 0 returns the result."""
    import torch.distributed as dist

    w = distributed.init(backend)
    try:
        threads = params.finetune.num_threads or max(1, (torch.get_num_threads() or 1) // w.size)
        with torch_threads(threads):
            r = _finetune(params, manifest, head_dir, out_dir, checkpoint_dir, None, history_path, images_dir, w)
        if not w.main:
            return None
        return {"history": r.history, "val_accuracy": r.val_accuracy, "val_loss": r.val_loss,
                "head_val_accuracy": r.head_val_accuracy, "device": r.device, "resumed_epochs": r.resumed_epochs,
                "trunk": r.trunk, "selected": r.selected}
    finally:
        dist.destroy_process_group()


def _finetune(params: Params, manifest: Any, head_dir: str | Path, out_dir: Path, checkpoint_dir: Path,
              on_epoch: OnEpoch | None, history_path: str | Path, images_dir: Path,
              world: distributed.World = distributed.World()) -> FinetuneResult:
    ft = params.finetune
    s = setup(params, manifest, head_dir, images_dir, checkpoint_dir, world)
    # optimizer steps per epoch: global batches of processes x batch_size, each rank training on its slice
    steps = len(batches_of(list(range(len(s.train_set))), ft.batch_size * world.size))
    total = ft.epochs * steps
    schedule = partial(lr_factor, total_steps=total, warmup_steps=warmup_steps(ft.warmup_steps, total))
    history, start, best = [], 0, None
    if ckpt := latest_checkpoint(checkpoint_dir, s.fingerprint):
        distributed.check_checkpoint_world(ckpt, world.size)
        history, start = restore_checkpoint(ckpt, s.model, s.opt, s.scaler), ckpt["epoch"]
        best = ckpt["best"]
        if world.size > 1:  # the checkpoint holds rank 0's random state: each rank draws its own again
            torch.manual_seed(ft.seed + world.rank + 1000 * start)
    first = int(s.head_info["epochs"]) + 1  # history continues the head's epoch axis
    for epoch in range(start, ft.epochs):
        if best is not None and best["stale"] >= ft.patience:
            break  # early stopping: finetune.patience epochs without a better validation metric
        # Freeze/unfreeze: the top n groups train (n grows with a gradual schedule), the rest stays frozen.
        n = unfrozen_at(epoch, len(s.top), ft.unfreeze_every)
        set_trainable(s.model.backbone, s.top, n, ft.batchnorm)
        s.model.head.train()
        # The epoch's inputs: trunk outputs computed ahead (the frozen groups never run again), or images
        # through the whole backbone.
        train_batches, val_batches, forward = epoch_feed(s, ft, epoch, len(s.backbone.groups) - n)
        train_loss, train_acc = train_epoch(s, train_batches, forward, ft, epoch, epoch * steps, schedule)
        val_loss, val_acc, val_metric = evaluate(s.model, val_batches, s.device, s.amp, forward, s.metric,
                                                 len(s.classes))
        if world.size > 1:  # one set of numbers decides the best epoch and early stopping on every rank
            val_loss, val_acc, val_metric = distributed.from_main(val_loss, val_acc, val_metric)
        lr = s.opt.param_groups[0]["lr"]
        history.append(history_row(first + epoch, "finetune", train_loss, train_acc, val_loss, val_acc, lr))
        best = keep_best(best, {"epoch": first + epoch, "val_metric": val_metric, "val_loss": val_loss,
                                "val_accuracy": val_acc}, s.model)
        if world.main:  # every rank holds the same weights: one writes them
            save_checkpoint(checkpoint_dir, s.model, s.opt, s.scaler, epoch + 1, history, s.fingerprint, best=best,
                            world_size=world.size)
        distributed.barrier()
        if on_epoch:  # step: the fine-tuning epoch (1, 2, ...), val_metric: the selection metric (tlops tune's)
            on_epoch({**history[-1], "step": epoch + 1, "val_metric": val_metric}, history[-1]["epoch"])
        del train_batches, val_batches  # this epoch's trunk rows go before the next epoch's are read
    s.model.load_state_dict(best["state"])  # the best epoch, not the last
    head = {"val_metric": float(s.head_info["val_metric"]), "val_loss": float(s.head_info["val_loss"])}
    # Unfreeze only if it helps: fine-tuning must beat the head-only model on the validation metric, not tie it.
    selected = "finetuned" if best["val_metric"] > head["val_metric"] else "head"
    selection = {"metric": s.metric, "head": head, "finetuned": {k: best[k] for k in ("epoch", "val_metric",
                                                                                      "val_loss")}}
    info = save_finetuned(s, params, history, out_dir, history_path, selected, selection) if world.main else {}
    distributed.barrier()
    if selected == "head":
        s.model.load_state_dict(s.initial)
    return FinetuneResult(s.model.eval(), info, history, best["val_accuracy"], best["val_loss"],
                          float(s.head_info["val_accuracy"]), str(s.device), start,
                          s.trunk_reason if s.trunk is None else "cached", selected)


def keep_best(best: dict | None, row: dict, model: nn.Module) -> dict:
    """The best epoch so far by (validation metric, -validation loss), with its weights and the epochs since."""
    if best is None or (row["val_metric"], -row["val_loss"]) > (best["val_metric"], -best["val_loss"]):
        return {**row, "stale": 0, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    return {**best, "stale": best["stale"] + 1}


def setup(params: Params, manifest: Any, head_dir: str | Path, images_dir: Path = paths.FEATURES_IMAGES,
          checkpoint_dir: Path = paths.CHECKPOINT_DIR, world: distributed.World = distributed.World()) -> Setup:
    """Backbone + trained head on the device, every parameter group of the optimizer, the image datasets."""
    ft = params.finetune
    device = resolve_device(ft.device)
    if world.size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    backbone = create_backbone(params.model.backbone, weights=params.model.weights, image_size=params.model.image_size,
                               max_tokens=params.model.max_tokens)
    spec = working_spec(backbone.spec, ft.augment, params.data)
    head, head_info = load_head(head_dir)
    classes = check_compatible(backbone, head_info, manifest)
    # channels_last is oneDNN's and cuDNN's fast layout for convolutions, on CPU too.
    model = Classifier(backbone.model, head).to(device, memory_format=torch.channels_last)
    if world.size > 1 and ft.batchnorm == "train":  # BatchNorm statistics over the global batch
        if device.type != "cuda":
            raise DataError("finetune.batchnorm: train with finetune.processes > 1 needs CUDA (SyncBatchNorm); on "
                            "CPU use batchnorm: frozen or one process")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    top = backbone.groups[::-1][: ft.unfreeze_groups]
    scale = small_data_scale(len(manifest.rows_in("train")))
    # fused: one kernel for every parameter's update (on 2 CPU cores 6x faster than the per-tensor loop)
    opt = torch.optim.AdamW(param_groups(head, top, ft.lr * scale, ft.lr_decay, ft.head_lr * scale),
                            weight_decay=ft.weight_decay, fused=True)
    amp = amp_dtype(device, ft.precision)
    policy = scoring.policy(params, scoring.train_labels(manifest), manifest.classes)
    train_items = split_items(manifest, "train")
    labels = torch.tensor([c for _, c in train_items])
    loss_weight = class_weight_tensor(labels, len(classes)).to(device) if policy.weighted(ft.class_weighting) else None
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(ft.seed + world.rank)  # dropout and drop-path draw from the global generator, per rank
    if isinstance(spec, TextSpec):
        train_set, val_set = text_dataset(train_items, spec), text_dataset(split_items(manifest, "val"), spec)
        trunk, reason = None, "a text encoder's layers take padded token sequences of every length: nothing to cache"
    else:
        images = for_manifest(manifest, spec, params.data.max_pixels, images_dir)
        train_set, val_set = train_dataset(train_items, images, ft), ImageDataset(split_items(manifest, "val"), images)
        trunk, reason = Trunk.for_params(params, backbone, spec, checkpoint_dir / paths.TRUNK_CACHE.name)
        if world.size > 1:
            trunk, reason = None, "distributed: each rank runs the whole backbone on its slice of the batch"
    if trunk is None:
        log.info("finetune: every step runs the whole backbone: %s", reason)
    return Setup(
        model=model, backbone=backbone, spec=spec, top=top, opt=opt, amp=amp, device=device,
        scaler=torch.amp.GradScaler("cuda", enabled=amp == torch.float16),
        train_set=train_set, val_set=val_set,
        classes=classes, head_info=head_info, fingerprint=run_fingerprint(params, manifest, head_dir),
        trunk=trunk, trunk_reason=reason, metric=policy.metric, loss_weight=loss_weight, initial=initial,
        world=world)


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Forward = Callable[[torch.Tensor], torch.Tensor]


def epoch_feed(s: Setup, ft: FinetuneParams, epoch: int, cut: int) -> tuple[Batches, Batches, Forward]:
    """(training batches, validation batches, the forward that takes them) of an epoch whose frozen groups are
    those below `cut`: with the trunk cache, trunk outputs and the top alone; else images and the whole model."""
    if s.trunk is not None and (top := s.trunk.top(cut)) is not None:
        view = view_of(epoch, ft.views)
        train = s.trunk.rows(s.train_set, cut, view)
        val = s.trunk.rows(s.val_set, cut, EVAL_VIEW)
        batches = batches_of(epoch_order(len(s.train_set), ft, epoch), ft.batch_size)
        labels = torch.tensor([c for _, c in s.train_set.items])
        val_labels = torch.tensor([c for _, c in s.val_set.items])
        train_batches = ((torch.from_numpy(train.take(b)), labels[b]) for b in batches)
        val_batches = ((torch.from_numpy(val.take(range(i, min(i + ft.batch_size, len(val))))),
                        val_labels[i : i + ft.batch_size]) for i in range(0, len(val), ft.batch_size))
        return train_batches, val_batches, lambda t: s.model.head(top(t))
    return (train_loader(s.train_set, ft, epoch, s.device, s.world), eval_loader(s.val_set, ft, s.device),
            s.model)


def save_finetuned(s: Setup, params: Params, history: list[dict], out_dir: Path, history_path: str | Path,
                   selected: str, selection: dict) -> dict:
    """model.safetensors (the selected model), the fine-tuned weights beside it when the head was selected, then
    model.json naming them and their sha256, then the history CSV; returns model.json."""
    weights = out_dir / paths.FINETUNE_WEIGHTS.name
    save_state(s.model.state_dict() if selected == "finetuned" else s.initial, weights)
    tuned = out_dir / paths.FINETUNED_WEIGHTS.name
    if selected == "head":  # kept so evaluate can say what fine-tuning reached
        save_state(s.model.state_dict(), tuned)
    else:
        tuned.unlink(missing_ok=True)
    info = {**model_info(params, s.backbone, s.spec, s.classes, s.head_info, history), "selected": selected,
            "selection": selection, "weights_sha256": sha256_file(weights),
            "class_weighted": s.loss_weight is not None}
    write_json(out_dir / paths.FINETUNE_INFO.name, info)
    write_history(history, history_path)
    return info


def train_epoch(s: Setup, batches: Batches, forward: Forward, ft: FinetuneParams, epoch: int, step: int,
                schedule: Callable[[int], float]) -> tuple[float, float]:
    """One pass over the training batches, every group's LR set per step; returns (mean loss, accuracy)."""
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in batches:
        x, y = to_device(x, y, s.device)
        for group in s.opt.param_groups:
            group["lr"] = group["base_lr"] * schedule(step)
        with torch.autocast(s.device.type, dtype=s.amp or torch.float32, enabled=s.amp is not None):
            logits = forward(x)
        if s.world.size > 1:
            # The global batch's mean over the ranks' slices: each rank's sum over the (class-weighted) total of
            # the whole global batch, times the rank count that the gradient average divides by again.
            total = s.loss_weight[y].sum() if s.loss_weight is not None else torch.tensor(float(len(y)))
            (total,) = distributed.all_sum(float(total))
            loss = F.cross_entropy(logits.float(), y, weight=s.loss_weight, label_smoothing=ft.label_smoothing,
                                   reduction="sum") * (s.world.size / total)
        else:
            loss = F.cross_entropy(logits.float(), y, weight=s.loss_weight, label_smoothing=ft.label_smoothing)
        check_finite(loss, "finetune", epoch + 1, step)
        s.opt.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        distributed.all_reduce_gradients([p for g in s.opt.param_groups for p in g["params"]], s.world.size)
        s.scaler.step(s.opt)
        s.scaler.update()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        step += 1
    loss_sum, correct, seen = distributed.all_sum(loss_sum, correct, seen) if s.world.size > 1 else (
        loss_sum, correct, seen)
    return loss_sum / seen, correct / seen


def evaluate(model: nn.Module, batches: Batches, device: torch.device, amp: torch.dtype | None = None,
             forward: Forward | None = None, metric: str = "accuracy", num_classes: int = 0
             ) -> tuple[float, float, float]:
    """(mean cross-entropy, accuracy, `metric`) of forward (default: model) over batches with model in eval mode;
    restores the previous modes."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    logits, labels = [], []
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for x, y in batches:
            x, y = to_device(x, y, device)
            logits.append((forward or model)(x).float())
            labels.append(y)
    for m, training in modes.items():
        m.train(training)
    logits_all, y_all = torch.cat(logits), torch.cat(labels)
    loss, acc = evaluate_logits(logits_all, y_all)
    value = score(metric, y_all.cpu().numpy(), logits_all.argmax(1).cpu().numpy(), num_classes or logits_all.shape[1])
    return loss, acc, value


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the device in channels_last; non_blocking pairs with the loader's pinned memory on CUDA."""
    cuda = device.type == "cuda"
    layout = torch.channels_last if x.dim() == 4 else torch.contiguous_format
    return x.to(device, non_blocking=cuda, memory_format=layout), y.to(device, non_blocking=cuda)


def check_compatible(backbone: Any, head_info: dict, manifest: Any) -> list[str]:
    """The head must fit the backbone's feature width and the manifest's classes; returns the classes."""
    if head_info["in_features"] != backbone.num_features:
        raise DataError(f"models/head expects {head_info['in_features']} features, backbone {backbone.name} gives "
                        f"{backbone.num_features}: rerun features and train_head with the same model params")
    classes = list(manifest.classes)
    if list(head_info["classes"]) != classes:
        raise DataError(f"models/head was trained on classes {head_info['classes']}, the manifest has {classes}: "
                        "rerun features and train_head on this data")
    return classes


def model_info(params: Params, backbone: Any, spec: PreprocessSpec | TextSpec, classes: list[str], head_info: dict,
               history: list[dict]) -> dict:
    """model.json: everything export and serving need to rebuild and feed the model."""
    return {
        "backbone": backbone.name,
        "num_features": backbone.num_features,
        "classes": classes,
        "head": {k: head_info[k] for k in ("kind", "hidden", "dropout")},
        "preprocess": spec.to_dict(),
        "weights_id": backbone.weights_id,
        "encoder_config": backbone.encoder_config,  # text: the encoder's config.json (None for images)
        "data_version": current_data_version(),
        "image_size": spec.input_size,
        "head_epochs": int(head_info["epochs"]),
        "epochs": len(history),
        "head_val_accuracy": float(head_info["val_accuracy"]),
        "params": {"model": params.model.model_dump(mode="json"), "finetune": params.finetune.model_dump(mode="json")},
    }
