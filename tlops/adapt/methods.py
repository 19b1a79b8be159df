"""Each adaptation method as a small step over the one fine-tuning machinery."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from tlops.adapt.losses import information_maximisation, mcc_loss, pseudo_labels
from tlops.core.config import Params
from tlops.evaluate import scoring
from tlops.features.working_images import WorkingImages
from tlops.inputs.images import PreprocessSpec, normalize, preprocess
from tlops.inputs.model_input import preprocess_batches
from tlops.models.backbones import layer_groups
from tlops.models.classifier import Classifier
from tlops.onnx.runtime import softmax
from tlops.training.augment import augment, training_view, view_of
from tlops.training.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from tlops.training.epochs import check_finite
from tlops.training.loaders import ImageDataset
from tlops.training.schedule import lr_factor, param_groups, set_trainable, warmup_steps
from tlops.training.trunk import EVAL_VIEW, Rows, Trunk

METHODS = ("adabn", "self_training", "mcc")
TRAINED = ("self_training", "mcc")
EVAL_BATCH = 64
STRONG = {"randaugment": {"num_ops": 2, "magnitude": 9}}  # self-training's strong view, after the training view
_TORCH_RNG = threading.Lock()  # RandAugment draws from torch's global generator: one seeded draw at a time


@dataclass
class Domains:
    """What adaptation works on: the source's labelled training and validation items and the target's unlabeled
    adapt images, each with its working-image store."""

    spec: PreprocessSpec
    source_train: list[tuple[str, int]]
    source_val: list[tuple[str, int]]
    source_images: WorkingImages
    target: list[str]
    target_images: WorkingImages
    trunk: Trunk | None = None  # the frozen groups below the trained top run once per view (as in fine-tuning)


@dataclass
class Candidate:
    """One method's adapted weights and its label-free scores."""

    method: str
    state: dict[str, torch.Tensor]
    probs: np.ndarray  # its predictions on the target adapt images
    source_val: float  # the selection metric on the source validation split
    seconds: float
    resumed_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    pruned_at: int | None = None  # auto's race stopped it after this many epochs (it votes, it is not chosen)
    cut: int | None = None  # its groups below this are the start model's: scored over the cached trunk rows

    @property
    def im(self) -> float:
        """Information maximisation on the target adapt images (reported; auto does not choose by it)."""
        return information_maximisation(self.probs) if len(self.probs) else math.nan


def outputs(model: Classifier, images: Sequence[str], store: WorkingImages,
            device: torch.device = torch.device("cpu")) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, logits) of the model in eval mode over images (evaluation preprocessing)."""
    model.eval()
    feats, logits = [], []
    with torch.inference_mode():
        for batch in preprocess_batches(images, store.spec, store.max_pixels, EVAL_BATCH, load=store.get):
            f = model.backbone(torch.from_numpy(batch).to(device, memory_format=torch.channels_last))
            feats.append(f.float().cpu().numpy())
            logits.append(model.head(f).float().cpu().numpy())
    width = model.head[-1].out_features if isinstance(model.head, nn.Sequential) else 0
    return ((np.concatenate(feats), np.concatenate(logits)) if feats else
            (np.zeros((0, 0), np.float32), np.zeros((0, width), np.float32)))


def unfrozen(params: Params) -> int:
    """How many top groups the training methods train: adapt.unfreeze_groups, default finetune.unfreeze_groups."""
    return params.finetune.unfreeze_groups if params.adapt.unfreeze_groups is None else params.adapt.unfreeze_groups


def trained_cut(model: Classifier, params: Params) -> int:
    """The group the training methods train from: those below it stay frozen."""
    return max(0, len(layer_groups(model.backbone)) - unfrozen(params))


def top_of(d: Domains, cut: int | None) -> nn.Module | None:
    """The part above `cut` when the trunk below it is cached (None: run the whole backbone)."""
    return d.trunk.top(cut) if d.trunk is not None and cut else None


def eval_outputs(model: Classifier, items: Sequence[str], store: WorkingImages, d: Domains, device: torch.device,
                 cut: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """outputs() of the model over images; with `cut`, from the trunk rows below it (evaluation view, computed once
    for every model that shares that trunk) and the top alone."""
    if (top := top_of(d, cut)) is None or not items:
        return outputs(model, items, store, device)
    rows = d.trunk.rows(ImageDataset([(p, -1) for p in items], store), cut, EVAL_VIEW)
    model.eval()
    feats, logits = [], []
    with torch.inference_mode():
        for i in range(0, len(rows), EVAL_BATCH):
            f = top(_rows(rows, range(i, min(i + EVAL_BATCH, len(rows))), device))
            feats.append(f.float().cpu().numpy())
            logits.append(model.head(f).float().cpu().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def _rows(rows: Rows, idx: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(rows.take(idx)).to(device, memory_format=torch.channels_last)


def source_val_score(model: Classifier, d: Domains, metric: str, device: torch.device, cut: int | None = None
                     ) -> float:
    _, logits = eval_outputs(model, [p for p, _ in d.source_val], d.source_images, d, device, cut)
    y = np.array([c for _, c in d.source_val])
    return scoring.score(metric, y, logits.argmax(1), logits.shape[1])


def target_probs(model: Classifier, d: Domains, device: torch.device, cut: int | None = None) -> np.ndarray:
    """The model's predictions (probabilities) on the target adapt images."""
    return softmax(eval_outputs(model, d.target, d.target_images, d, device, cut)[1])


def adabn(model: Classifier, images: Sequence[str], store: WorkingImages, batch_size: int,
          device: torch.device) -> None:
    """AdaBN: every BatchNorm's running statistics replaced by the target images'."""
    reestimate_bn(model, [[(p, store) for p in images[i:i + batch_size]] for i in range(0, len(images), batch_size)],
                  device)


def mixed_bn(model: Classifier, d: Domains, batch_size: int, device: torch.device) -> None:
    """Every BatchNorm's statistics re-estimated on batches half source training images, half target images: the
    statistics the training methods run with, so neither domain's inputs fall outside them."""
    half = max(1, batch_size // 2)
    source = [p for p, _ in d.source_train]
    pick = np.random.default_rng(0).permutation(len(source))[: len(d.target)]
    batches = [[(source[j], d.source_images) for j in pick[i:i + half]] + [(p, d.target_images)
                                                                           for p in d.target[i:i + half]]
               for i in range(0, len(d.target), half)]
    reestimate_bn(model, batches, device)


def reestimate_bn(model: Classifier, batches: Sequence[Sequence[tuple[str, WorkingImages]]],
                  device: torch.device) -> None:
    """Reset every BatchNorm's running statistics to the cumulative average over the batches (no gradient step)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative: every batch counts the same
        m.train()
    with torch.no_grad():
        for k, batch in enumerate(batches):
            if len(batch) > 1 or k == 0:  # a last batch of one has no variance
                x = np.stack([preprocess(store.get(p), store.spec) for p, store in batch])
                model.backbone(torch.from_numpy(x).to(device, memory_format=torch.channels_last))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
        m.eval()


def strong_view(img: Image.Image, spec: PreprocessSpec, params: Params, view: int, sha256: str) -> np.ndarray:
    """A strong augmentation of an image: its training view, then RandAugment (STRONG), seeded by (seed, view,
    content) alone like every training view."""
    from torchvision.transforms import RandAugment

    seed = [params.adapt.seed, view, int(sha256[:16], 16)]
    weak = augment(img, spec, params.finetune.augment, np.random.default_rng(seed))
    with _TORCH_RNG, torch.random.fork_rng(devices=[]):  # the trunk cache prepares views on several threads
        torch.manual_seed(int(np.random.default_rng(seed).integers(2**62)))
        strong = RandAugment(**STRONG["randaugment"])(weak)
    return normalize(np.asarray(strong, dtype=np.uint8), spec)


@dataclass
class StrongViews(ImageDataset):
    """Target images as self-training's strong views (strong_view) of view `view`, for the trunk cache."""

    params: Params | None = None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return torch.from_numpy(strong_view(self.images.get(path), self.images.spec, self.params, self.view,
                                            self.images.sha256[path])), label


@dataclass(frozen=True)
class TrunkFeed:
    """A training method's step inputs as trunk rows (the groups below `cut` ran once per view): the source's
    training view of the epoch, as fine-tuning saw it (its rows are fine-tuning's own), and the target's view."""

    d: Domains
    params: Params
    cut: int
    top: nn.Module

    def source(self, epoch: int) -> Rows:
        ft = self.params.finetune
        ds = ImageDataset(self.d.source_train, self.d.source_images, ft.augment, ft.seed)
        return self.d.trunk.rows(ds, self.cut, view_of(epoch, ft.views))

    def target(self, method: str, epoch: int) -> Rows:
        ad, ft = self.params.adapt, self.params.finetune
        items = [(p, -1) for p in self.d.target]
        recipe = {**ft.augment.model_dump(mode="json"), "seed": ad.seed}
        if method == "self_training":
            return self.d.trunk.rows(StrongViews(items, self.d.target_images, params=self.params), self.cut, epoch,
                                     {**recipe, **STRONG})
        return self.d.trunk.rows(ImageDataset(items, self.d.target_images, ft.augment, ad.seed), self.cut, epoch,
                                 recipe)


def train_method(method: str, model: Classifier, d: Domains, params: Params, checkpoint_dir: Path,
                 fingerprint: str, device: torch.device, until: int | None = None,
                 known: tuple[int, np.ndarray] | None = None) -> tuple[list[dict], int]:
    """self_training or mcc: adapt.epochs passes over the target adapt images, each step a target batch beside a
    labelled source batch of the same size; returns (history, epochs resumed from a checkpoint).

    until: stop after that many epochs (the schedule stays adapt.epochs long, so a later call resumes from the
    checkpoint exactly as if never stopped); known: (epoch, the target predictions of the model after that epoch),
    already computed by the caller, so self-training's pseudo-labels for the next epoch cost no second pass."""
    ad, ft = params.adapt, params.finetune
    groups = layer_groups(model.backbone)
    top = groups[::-1][: unfrozen(params)]
    opt = torch.optim.AdamW(param_groups(model.head, top, ad.lr, ft.lr_decay, ad.head_lr),
                            weight_decay=ad.weight_decay, fused=True)  # one kernel for every update, as fine-tuning
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    steps = max(1, len(d.target) // ad.batch_size)
    total = ad.epochs * steps
    schedule = partial(lr_factor, total_steps=total, warmup_steps=warmup_steps(ad.warmup_steps, total))
    history, start = [], 0
    torch.manual_seed(ad.seed)  # the head's dropout draws from the global generator (a checkpoint restores it)
    if ckpt := latest_checkpoint(checkpoint_dir, fingerprint):
        history, start = restore_checkpoint(ckpt, model, opt, scaler), ckpt["epoch"]
    target_sha = d.target_images.sha256
    source_sha = d.source_images.sha256
    if ad.batchnorm == "mixed" and start == 0:  # a resumed run restored these statistics with the weights
        mixed_bn(model, d, ad.batch_size, device)
    cut = trained_cut(model, params)
    feed = TrunkFeed(d, params, cut, t) if (t := top_of(d, cut)) is not None else None
    for epoch in range(start, ad.epochs if until is None else min(until, ad.epochs)):
        labels = weights = None
        if method == "self_training":  # this epoch's pseudo-labels, from the weak view of the model so far
            reuse = known is not None and known[0] == epoch and not (ad.batchnorm == "mixed" and epoch == 0)
            probs = known[1] if reuse else target_probs(model, d, device, cut)
            labels, weights = pseudo_labels(probs, ad.confidence, ad.class_share)
        set_trainable(model.backbone, top, len(top), "frozen")
        model.head.train()
        g = torch.Generator().manual_seed(ad.seed + epoch)
        t_order = torch.randperm(len(d.target), generator=g).tolist()
        s_order = torch.randperm(len(d.source_train), generator=g).tolist()
        sums = {"loss": 0.0, "source_loss": 0.0, "target_loss": 0.0}
        view = view_of(epoch, ft.views)  # the source images' augmented view, as fine-tuning's epoch would show it
        rows = (feed.source(epoch), feed.target(method, epoch)) if feed else None
        for k in range(steps):
            step = epoch * steps + k
            t_idx = t_order[k * ad.batch_size:(k + 1) * ad.batch_size]
            s_idx = [s_order[(k * ad.batch_size + j) % len(s_order)] for j in range(len(t_idx))]
            ys = torch.tensor([d.source_train[i][1] for i in s_idx], device=device)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * schedule(step)
            if rows:
                x = torch.cat([_rows(rows[0], s_idx, device), _rows(rows[1], t_idx, device)])
                logits = model.head(feed.top(x))
            else:
                xs = np.stack([training_view(d.source_images.get(d.source_train[i][0]), d.spec, ft.augment, ft.seed,
                                             view, source_sha[d.source_train[i][0]]) for i in s_idx])
                if method == "self_training":
                    xt = np.stack([strong_view(d.target_images.get(d.target[i]), d.spec, params, epoch,
                                               target_sha[d.target[i]]) for i in t_idx])
                else:
                    xt = np.stack([training_view(d.target_images.get(d.target[i]), d.spec, ft.augment, ad.seed,
                                                 epoch, target_sha[d.target[i]]) for i in t_idx])
                logits = model(torch.from_numpy(np.concatenate([xs, xt])).to(device,
                                                                             memory_format=torch.channels_last))
            source_loss = F.cross_entropy(logits[: len(s_idx)], ys, label_smoothing=ft.label_smoothing)
            lt = logits[len(s_idx):]
            if method == "mcc":
                target_loss = mcc_loss(lt, ad.mcc_temperature)
            else:
                w = torch.from_numpy(weights[t_idx]).to(device)
                y = torch.from_numpy(labels[t_idx]).long().to(device)
                target_loss = (F.cross_entropy(lt, y, reduction="none") * w).sum() / max(len(t_idx), 1)
            loss = source_loss + ad.target_weight * target_loss
            check_finite(loss, f"adapt ({method})", epoch + 1, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for key, value in (("loss", loss), ("source_loss", source_loss), ("target_loss", target_loss)):
                sums[key] += float(value.detach()) / steps
        top_lr = opt.param_groups[min(1, len(opt.param_groups) - 1)]["lr"]  # the top backbone group's (else the head's)
        history.append({"method": method, "epoch": epoch + 1, **sums, "lr": top_lr})
        save_checkpoint(checkpoint_dir, model, opt, scaler, epoch + 1, history, fingerprint)
    model.eval()
    return history, start
