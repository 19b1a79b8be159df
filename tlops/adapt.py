"""Domain adaptation: the selected model carried to the unlabeled target domain, and the shift measured.

    result = adapt(params, manifest, target_rows)   # models/adapted (+ reports/adapt.json by the stage)

Each method is a small piece over the one model and the one fine-tuning setup (TLlib's layout, not a framework):
  adabn          re-estimate every BatchNorm's statistics on target images; no gradient step
  self_training  pseudo-labels of the target's weak (evaluation) view, kept above adapt.confidence or in the top
                 adapt.class_share of their predicted class and weighted per class (class-balanced), taught on a
                 strong augmentation of the same image (FixMatch-style consistency), beside labelled source batches
  mcc            Minimum Class Confusion on target batches (Jin et al., 2020) added to the source loss
  auto           all three from the same start; among those whose source validation metric drops at most
                 adapt.max_source_drop, and the source-only model, keeps the one that agrees most with their ensemble
                 (the argmax of their mean prediction) on the target adapt images: no target label needed

The training methods train what fine-tuning trains (its top finetune.unfreeze_groups groups and the head, the LRs
decaying by finetune.lr_decay) with BatchNorm frozen. Target labels never reach training: adaptation gets the
paths of the adapt split only; the test split is scored after training (tlops.target.scored_items).
Library code: no MLflow, no Prefect.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from tlops import paths, scoring
from tlops.backbones import layer_groups
from tlops.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from tlops.config import Params
from tlops.data import data_version, split_items
from tlops.devices import resolve_device, torch_threads
from tlops.errors import DataError
from tlops.images import WorkingImages, for_manifest
from tlops.io import atomic_path, sha256_file, sha256_json, write_json
from tlops.loaders import augment, training_view, view_of
from tlops.model import Classifier, load_classifier, save_state
from tlops.preprocess import PreprocessSpec, normalize, preprocess, preprocess_batches
from tlops.runtime import softmax
from tlops.schedule import lr_factor, param_groups, set_trainable, warmup_steps
from tlops.target import adapt_paths, scored_items
from tlops.train import check_finite

log = logging.getLogger(__name__)

METHODS = ("adabn", "self_training", "mcc")
TRAINED = ("self_training", "mcc")
ADAPT_CODE = ("tlops.adapt", "tlops.loaders", "tlops.schedule", "tlops.model", "tlops.checkpoint", "tlops.images",
              "tlops.preprocess", "tlops.target")
EVAL_BATCH = 64


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

    @property
    def im(self) -> float:
        """Information maximisation on the target adapt images (reported; auto does not choose by it)."""
        return information_maximisation(self.probs) if len(self.probs) else math.nan


@dataclass
class AdaptResult:
    model: Classifier
    info: dict  # what models/adapted/model.json holds
    method: str
    chosen: str
    candidates: dict[str, Candidate]
    source_only: Candidate
    domains: Domains
    agreement: dict[str, float] = field(default_factory=dict)  # auto: each admissible model's agreement


# ---------------------------------------------------------------- losses and scores (pure)


def mcc_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Minimum Class Confusion: the share of a batch's (entropy-weighted) predicted mass that two classes share."""
    probs = F.softmax(logits / temperature, dim=1)
    entropy = -(probs * torch.log(probs + 1e-5)).sum(1)
    weight = 1 + torch.exp(-entropy)  # confident predictions count more
    weight = len(probs) * weight / weight.sum()
    confusion = (probs * weight[:, None]).T @ probs
    confusion = confusion / confusion.sum(1, keepdim=True)  # each class's row sums to 1: no class dominates
    return (confusion.sum() - confusion.trace()) / probs.shape[1]


def information_maximisation(probs: np.ndarray) -> float:
    """H(mean prediction) - mean H(prediction), over log(classes): 1 for confident predictions spread evenly over
    every class, 0 or below for uncertain or collapsed ones. Needs no label."""
    eps = 1e-12
    mean = probs.mean(0)
    diversity = -(mean * np.log(mean + eps)).sum()
    confidence = -(probs * np.log(probs + eps)).sum(1).mean()
    return float((diversity - confidence) / math.log(probs.shape[1]))


def pseudo_labels(probs: np.ndarray, confidence: float, class_share: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, weights) of class-balanced pseudo-labels: an image counts when its top probability reaches
    `confidence`, or is in the top `class_share` of its predicted class; each class then weighs the same in total
    (weight 0: not used)."""
    pred, conf = probs.argmax(1), probs.max(1)
    keep = conf >= confidence
    for c in np.unique(pred):
        members = np.flatnonzero(pred == c)
        cut = np.quantile(conf[members], 1 - class_share)
        keep[members[conf[members] >= cut]] = True
    counts = np.bincount(pred[keep], minlength=probs.shape[1])
    weights = np.zeros(len(pred), np.float32)
    weights[keep] = scoring.class_weights(counts)[pred[keep]]
    return pred, weights


def domain_shift(source: np.ndarray, target: np.ndarray, seed: int) -> dict[str, float]:
    """How well a classifier tells source from target features, on held-out folds: domain AUC (0.5: no shift) and
    proxy A-distance 2 (1 - 2 err) (0: no shift, 2: fully apart). The larger domain is subsampled to the smaller."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = min(len(source), len(target))
    if n < 5:
        return {"domain_auc": math.nan, "proxy_a_distance": math.nan, "n": n}
    rng = np.random.default_rng(seed)
    X = np.concatenate([source[rng.permutation(len(source))[:n]], target[rng.permutation(len(target))[:n]]])
    y = np.repeat([0, 1], n)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    p = cross_val_predict(clf, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=seed),
                          method="predict_proba")[:, 1]
    err = float(((p > 0.5) != y).mean())
    return {"domain_auc": float(roc_auc_score(y, p)), "proxy_a_distance": 2 * (1 - 2 * err), "n": n}


# ---------------------------------------------------------------- model outputs


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


def source_val_score(model: Classifier, d: Domains, metric: str, device: torch.device) -> float:
    _, logits = outputs(model, [p for p, _ in d.source_val], d.source_images, device)
    y = np.array([c for _, c in d.source_val])
    return scoring.score(metric, y, logits.argmax(1), logits.shape[1])


def target_probs(model: Classifier, d: Domains, device: torch.device) -> np.ndarray:
    """The model's predictions (probabilities) on the target adapt images."""
    return softmax(outputs(model, d.target, d.target_images, device)[1])


# ---------------------------------------------------------------- the methods


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
    """A strong augmentation of an image: its training view, then RandAugment (2 ops, magnitude 9), seeded by
    (seed, view, content) alone like every training view."""
    from torchvision.transforms import RandAugment

    seed = [params.adapt.seed, view, int(sha256[:16], 16)]
    weak = augment(img, spec, params.finetune.augment, np.random.default_rng(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.default_rng(seed).integers(2**62)))
        strong = RandAugment(num_ops=2, magnitude=9)(weak)
    return normalize(np.asarray(strong, dtype=np.uint8), spec)


def train_method(method: str, model: Classifier, d: Domains, params: Params, checkpoint_dir: Path,
                 fingerprint: str, device: torch.device) -> tuple[list[dict], int]:
    """self_training or mcc: adapt.epochs passes over the target adapt images, each step a target batch beside a
    labelled source batch of the same size; returns (history, epochs resumed from a checkpoint)."""
    ad, ft = params.adapt, params.finetune
    groups = layer_groups(model.backbone)
    top = groups[::-1][: ft.unfreeze_groups if ad.unfreeze_groups is None else ad.unfreeze_groups]
    opt = torch.optim.AdamW(param_groups(model.head, top, ad.lr, ft.lr_decay, ad.head_lr),
                            weight_decay=ad.weight_decay)
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
    for epoch in range(start, ad.epochs):
        labels = weights = None
        if method == "self_training":  # this epoch's pseudo-labels, from the weak view of the model so far
            _, logits = outputs(model, d.target, d.target_images, device)
            labels, weights = pseudo_labels(softmax(logits), ad.confidence, ad.class_share)
        set_trainable(model.backbone, top, len(top), "frozen")
        model.head.train()
        g = torch.Generator().manual_seed(ad.seed + epoch)
        t_order = torch.randperm(len(d.target), generator=g).tolist()
        s_order = torch.randperm(len(d.source_train), generator=g).tolist()
        sums = {"loss": 0.0, "source_loss": 0.0, "target_loss": 0.0}
        view = view_of(epoch, ft.views)  # the source images' augmented view, as fine-tuning's epoch would show it
        for k in range(steps):
            step = epoch * steps + k
            t_idx = t_order[k * ad.batch_size:(k + 1) * ad.batch_size]
            s_idx = [s_order[(k * ad.batch_size + j) % len(s_order)] for j in range(len(t_idx))]
            xs = np.stack([training_view(d.source_images.get(d.source_train[i][0]), d.spec, ft.augment, ft.seed,
                                         view, source_sha[d.source_train[i][0]]) for i in s_idx])
            ys = torch.tensor([d.source_train[i][1] for i in s_idx], device=device)
            if method == "self_training":
                xt = np.stack([strong_view(d.target_images.get(d.target[i]), d.spec, params, epoch,
                                           target_sha[d.target[i]]) for i in t_idx])
            else:
                xt = np.stack([training_view(d.target_images.get(d.target[i]), d.spec, ft.augment, ad.seed, epoch,
                                             target_sha[d.target[i]]) for i in t_idx])
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * schedule(step)
            logits = model(torch.from_numpy(np.concatenate([xs, xt])).to(device, memory_format=torch.channels_last))
            source_loss = F.cross_entropy(logits[: len(xs)], ys, label_smoothing=ft.label_smoothing)
            lt = logits[len(xs):]
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


# ---------------------------------------------------------------- the stage


def adapt(params: Params, manifest: Any, target_rows: list, model_dir: Path = paths.FINETUNE_DIR,
          out_dir: Path = paths.ADAPT_DIR, checkpoint_dir: Path = paths.ADAPT_CHECKPOINTS,
          source_images_dir: Path = paths.FEATURES_IMAGES, target_images_dir: Path = paths.TARGET_IMAGES,
          on_method: Callable[[Candidate], None] | None = None) -> AdaptResult:
    """Adapt the selected model (model_dir) to the target by adapt.method; write out_dir; return what happened."""
    with torch_threads(params.finetune.num_threads):
        return _adapt(params, manifest, target_rows, Path(model_dir), Path(out_dir), Path(checkpoint_dir),
                      Path(source_images_dir), Path(target_images_dir), on_method)


def _adapt(params: Params, manifest: Any, target_rows: list, model_dir: Path, out_dir: Path, checkpoint_dir: Path,
           source_images_dir: Path, target_images_dir: Path,
           on_method: Callable[[Candidate], None] | None) -> AdaptResult:
    ad = params.adapt
    checkpoint_dir.mkdir(parents=True, exist_ok=True)  # a DVC output even when nothing is trained
    model, info = load_classifier(model_dir)
    device = resolve_device(params.finetune.device)
    model.to(device, memory_format=torch.channels_last)  # oneDNN's and cuDNN's fast layout, as fine-tuning runs
    if info["preprocess"].get("kind") == "text":  # adaptation reads images (params refuse a method for text)
        passed = {**info, "adapt": {"method": "none", "chosen": "none", "target": None, "target_data_version": None,
                                    "metric": scoring.policy(params, manifest).metric}}
        save_adapted(model, passed, model_dir, out_dir, changed=False)
        return AdaptResult(model, passed, "none", "none", {},
                           Candidate("none", {}, np.zeros((0, 0), np.float32), math.nan, 0.0), None)
    d = domains(params, manifest, target_rows, info, source_images_dir, target_images_dir)
    if ad.method != "none" and not d.target:
        raise DataError(f"adapt.method {ad.method}: the target domain has no image to adapt on (adapt split of "
                        f"{paths.TARGET_MANIFEST} is empty)")
    metric = scoring.policy(params, manifest).metric
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    source_only = Candidate("none", start, target_probs(model, d, device), source_val_score(model, d, metric, device),
                            0.0)
    methods = METHODS if ad.method == "auto" else () if ad.method == "none" else (ad.method,)
    base = fingerprint(params, manifest, target_rows, model_dir)
    candidates = {}
    for method in methods:
        model.load_state_dict(start)
        t0 = time.perf_counter()
        history, resumed = [], 0
        if method == "adabn":
            adabn(model, d.target, d.target_images, ad.batch_size, device)
        else:
            history, resumed = train_method(method, model, d, params, checkpoint_dir / method,
                                            sha256_json({"base": base, "method": method}), device)
        candidates[method] = Candidate(method, {k: v.detach().clone() for k, v in model.state_dict().items()},
                                       target_probs(model, d, device), source_val_score(model, d, metric, device),
                                       time.perf_counter() - t0, resumed, history)
        if on_method:
            on_method(candidates[method])
    chosen, agreement = (choose(source_only, candidates, ad.max_source_drop) if ad.method == "auto" else
                         (ad.method, {}))
    model.load_state_dict(source_only.state if chosen == "none" else candidates[chosen].state)
    model.eval()
    target_version = data_version(Path("."), paths.TARGET) if paths.TARGET.is_dir() and ad.target else None
    adapted_info = {**info, "adapt": {"method": ad.method, "chosen": chosen, "target": ad.target,
                                      "target_data_version": target_version, "metric": metric}}
    save_adapted(model, adapted_info, model_dir, out_dir, changed=chosen != "none")
    return AdaptResult(model, adapted_info, ad.method, chosen, candidates, source_only, d, agreement)


def choose(source_only: Candidate, candidates: dict[str, Candidate], max_source_drop: float
           ) -> tuple[str, dict[str, float]]:
    """auto's rule, and each admissible model's score: the admissible models are the source-only one and the methods
    whose source validation metric fell at most max_source_drop; the one that agrees most with their ensemble on the
    target wins (a tie keeps the source-only model).

    Why not a confidence score such as information maximisation: MCC and self-training optimise confidence on the
    target themselves, so it rewards the objective rather than accuracy (on digits over photographs it chose MCC,
    16 points below self-training). The ensemble's errors are partly independent across methods, so agreeing with it
    tracks accuracy; with few admissible models it says little, and then the source-only model wins ties."""
    admissible = [source_only, *(c for c in candidates.values()
                                 if c.source_val >= source_only.source_val - max_source_drop - 1e-9)]
    agreement = ensemble_agreement(admissible)
    best = max(admissible, key=lambda c: (agreement[c.method], c is source_only))
    return best.method, agreement


def ensemble_agreement(models: Sequence[Candidate]) -> dict[str, float]:
    """Each model's share of target images on which its prediction is the argmax of all the models' mean prediction."""
    vote = np.mean([c.probs for c in models], axis=0).argmax(1)
    return {c.method: float((c.probs.argmax(1) == vote).mean()) for c in models}


def domains(params: Params, manifest: Any, target_rows: list, info: dict, source_images_dir: Path,
            target_images_dir: Path) -> Domains:
    """The source splits and the target adapt images, with their working images (target ones decoded once)."""
    spec = PreprocessSpec.from_dict(info["preprocess"])
    max_pixels = params.data.max_pixels
    source = for_manifest(manifest, spec, max_pixels, source_images_dir)
    target = WorkingImages(target_images_dir, spec, max_pixels, {r.path: r.sha256 for r in target_rows}, writer=True)
    target.ensure([r.path for r in target_rows], params.features.num_workers)
    return Domains(spec, split_items(manifest, "train"), split_items(manifest, "val"), source,
                   adapt_paths(target_rows), target)


def fingerprint(params: Params, manifest: Any, target_rows: list, model_dir: Path) -> str:
    """What a resumed adaptation must share with the interrupted one: params, the start model, both data, the code.

    The target rows enter without their labels: a label must not decide anything about training, resuming included.
    """
    import importlib

    return sha256_json({
        "adapt": params.adapt.model_dump(mode="json", exclude={"method", "target", "test_fraction"}),
        "finetune": params.finetune.model_dump(mode="json"),
        "max_pixels": params.data.max_pixels,
        "model": sha256_file(Path(model_dir) / paths.FINETUNE_WEIGHTS.name),
        "source": [str(r) for r in manifest.rows],
        "target": sorted(r.sha256 for r in target_rows if r.split == "adapt"),
        "code": {m: sha256_file(importlib.import_module(m).__file__) for m in ADAPT_CODE},
    })


def save_adapted(model: Classifier, info: dict, model_dir: Path, out_dir: Path, changed: bool) -> None:
    """out_dir/model.safetensors + model.json; unchanged (method none, or auto keeping the source-only model), the
    weights are the very file fine-tuning wrote."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / paths.ADAPT_WEIGHTS.name
    if changed:
        save_state(model.state_dict(), weights)
    else:
        with atomic_path(weights) as tmp:
            shutil.copyfile(Path(model_dir) / paths.FINETUNE_WEIGHTS.name, tmp)
    write_json(out_dir / paths.ADAPT_INFO.name, {**info, "weights_sha256": sha256_file(weights)})


# ---------------------------------------------------------------- the report


def report(result: AdaptResult, params: Params, manifest: Any, target_rows: list, seconds: float) -> dict[str, Any]:
    """reports/adapt.json: the method and choice, the shift, target and source accuracies of both models, and what
    each candidate scored (target accuracies only when target labels exist; they decided nothing)."""
    out: dict[str, Any] = {"method": result.method, "chosen": result.chosen, "target": None, "shift": None,
                           "target_data_version": result.info["adapt"]["target_data_version"]}
    if not target_rows:
        return out
    device = torch.device("cpu")
    source, target = result.domains.source_images, result.domains.target_images
    classes = list(result.info["classes"])
    test_paths, test_y, unknown = scored_items(target_rows, classes)
    source_test = split_items(manifest, "test")
    model = copy.deepcopy(result.model).to(device)
    target_paths = [r.path for r in target_rows]
    at = {p: i for i, p in enumerate(target_paths)}
    test_at = [at[p] for p in test_paths]  # the labelled test images among all the target's
    scored: dict[str, dict] = {}
    test_logits: dict[str, np.ndarray] = {}  # by candidate: each model's target test logits, computed once
    for name, candidate in (("source_only", "none"), ("adapted", result.chosen)):
        if candidate in test_logits:  # nothing adapted: the adapted model is the source-only one
            scored[name] = scored["source_only"]
            continue
        model.load_state_dict(result.source_only.state if name == "source_only" else result.model.state_dict())
        s_feats, s_logits = outputs(model, [p for p, _ in source_test], source, device)
        t_feats, t_logits = outputs(model, target_paths, target, device)
        test_logits[candidate] = t_logits[test_at]
        scored[name] = {"source": scores(s_logits, [c for _, c in source_test], len(classes)),
                        "target_mean_confidence": float(softmax(t_logits).max(1).mean()) if len(t_logits) else None,
                        "source_mean_confidence": float(softmax(s_logits).max(1).mean())}
        if name == "source_only":
            out["shift"] = {**domain_shift(s_feats, t_feats, params.adapt.seed),
                            "target_mean_confidence": scored[name]["target_mean_confidence"],
                            "source_mean_confidence": scored[name]["source_mean_confidence"]}
        if test_paths:
            scored[name]["target"] = scores(test_logits[candidate], test_y, len(classes))
    out["source"] = {name: s["source"] for name, s in scored.items()}
    out["target_images"] = {"adapt": sum(r.split == "adapt" for r in target_rows), "test": len(test_paths),
                            "unknown_labels": unknown}
    out["adapted_target_mean_confidence"] = scored["adapted"]["target_mean_confidence"]
    if test_paths:
        out["target"] = {"source_only": scored["source_only"]["target"], "adapted": scored["adapted"]["target"],
                         "n_test": len(test_paths)}
        out["target"]["gain"] = out["target"]["adapted"]["accuracy"] - out["target"]["source_only"]["accuracy"]
    out["criterion"] = ("agreement with the ensemble of the source-only model and the methods within "
                        f"adapt.max_source_drop = {params.adapt.max_source_drop:g} of its source validation "
                        f"{result.info['adapt']['metric']}, on the target adapt images" if result.method == "auto"
                        else None)
    out["candidates"] = {}
    for name, c in {"none": result.source_only, **result.candidates}.items():
        row = {"im": c.im, "source_val": c.source_val, "seconds": round(c.seconds, 2),
               "resumed_epochs": c.resumed_epochs, "agreement": result.agreement.get(name)}
        if test_paths:  # for the reader only: computed after the choice, from labels adaptation never saw
            if name not in test_logits:
                model.load_state_dict(c.state)
                test_logits[name] = outputs(model, test_paths, target, device)[1]
            row["target_accuracy"] = float((test_logits[name].argmax(1) == np.array(test_y)).mean())
        out["candidates"][name] = row
    out["seconds"] = round(seconds, 2)
    return out


def scores(logits: np.ndarray, y: Sequence[int], num_classes: int) -> dict[str, float]:
    """Every tlops.scoring metric of logits against labels."""
    return {m: scoring.score(m, np.asarray(y), logits.argmax(1), num_classes) for m in scoring.METRICS}


def flat_metrics(rep: dict[str, Any]) -> dict[str, float]:
    """The report's numbers for MLflow: shift.*, target.*, source.*, candidate.<method>.*."""
    out: dict[str, float] = {}
    for k, v in (rep.get("shift") or {}).items():
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            out[f"shift.{k}"] = float(v)
    for section in ("target", "source"):
        for model_name, scores in (rep.get(section) or {}).items():
            if isinstance(scores, dict):
                out.update({f"{section}.{model_name}.{k}": float(v) for k, v in scores.items()
                            if isinstance(v, (int, float))})
    for name, row in (rep.get("candidates") or {}).items():
        out.update({f"candidate.{name}.{k}": float(v) for k, v in row.items()
                    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))})
    return out


def summary_lines(rep: dict[str, Any]) -> list[str]:
    """What the stage prints."""
    if rep.get("shift") is None:
        return [f"adapt: method {rep['method']}, no target domain (adapt.target is null): the fine-tuned model "
                "passes through"]
    s = rep["shift"]
    lines = [f"shift: domain AUC {s['domain_auc']:.3f}, proxy A-distance {s['proxy_a_distance']:.2f}, target mean "
             f"confidence {s['target_mean_confidence']:.3f} (source {s['source_mean_confidence']:.3f})",
             f"adapt: method {rep['method']}, chosen {rep['chosen']}"]
    if t := rep.get("target"):
        lines.append(f"target test accuracy: source-only {t['source_only']['accuracy']:.4f}, adapted "
                     f"{t['adapted']['accuracy']:.4f} ({t['gain']:+.4f}, {t['n_test']} images)")
    src = rep["source"]
    lines.append(f"source test accuracy: source-only {src['source_only']['accuracy']:.4f}, adapted "
                 f"{src['adapted']['accuracy']:.4f}")
    return lines


def markdown(rep: dict[str, Any]) -> str:
    """The report as the Prefect artifact shows it: the summary lines, then one row per candidate."""
    lines = ["# Domain adaptation", "", *[f"- {line}" for line in summary_lines(rep)]]
    if rep.get("candidates"):
        lines += ["", "| method | ensemble agreement (target) | IM score (target) | source val | target test accuracy "
                  "| seconds |", "|---|---:|---:|---:|---:|---:|"]
        for name, row in rep["candidates"].items():
            acc, agree = row.get("target_accuracy"), row.get("agreement")
            mark = " (chosen)" if name == rep["chosen"] else ""
            lines.append(f"| {name}{mark} | {'-' if agree is None else f'{agree:.4f}'} | {row['im']:.4f} | "
                         f"{row['source_val']:.4f} | {'-' if acc is None else f'{acc:.4f}'} | {row['seconds']:.1f} |")
        if rep.get("criterion"):
            lines += ["", f"Chosen by {rep['criterion']}; target labels decided nothing."]
    return "\n".join(lines) + "\n"
