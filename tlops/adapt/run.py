"""The adapt stage's work: every method tried, the one that helps chosen by a label-free score, the adapted model
saved."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlops.adapt.methods import (
    METHODS,
    TRAINED,
    Candidate,
    Domains,
    adabn,
    source_val_score,
    target_probs,
    train_method,
    trained_cut,
)
from tlops.core import paths
from tlops.core.config import Params
from tlops.core.errors import DataError
from tlops.core.imports import code_fingerprint
from tlops.core.io import atomic_path, sha256_file, sha256_json, write_json
from tlops.data.manifest import split_items
from tlops.data.target import adapt_paths
from tlops.data.version import data_version
from tlops.evaluate import scoring
from tlops.features.working_images import WorkingImages, for_manifest
from tlops.inputs.images import PreprocessSpec
from tlops.models.backbones import Backbone, layer_groups
from tlops.models.classifier import Classifier, load_classifier
from tlops.models.heads import save_state
from tlops.training.devices import resolve_device, torch_threads
from tlops.training.trunk import Trunk

ADAPT_CODE = "tlops.adapt.run"  # its import graph is the code an adaptation checkpoint was written by


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


def adapt_model(params: Params, manifest: Any, target_rows: list, model_dir: Path = paths.FINETUNE_DIR,
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
    checkpoint_dir.mkdir(parents=True, exist_ok=True)  # a DVC output even when nothing is trained: a hidden note
    (checkpoint_dir / ".checkpoints").write_text("one folder per adaptation method trained, epochs inside\n")
    model, info = load_classifier(model_dir)
    device = resolve_device(params.finetune.device)
    model.to(device, memory_format=torch.channels_last)  # oneDNN's and cuDNN's fast layout, as fine-tuning runs
    if info["preprocess"].get("kind") == "text":  # adaptation reads images (params refuse a method for text)
        passed = {**info, "adapt": {"method": "none", "chosen": "none", "target": None, "target_data_version": None,
                                    "metric": scoring.policy(params, scoring.train_labels(manifest),
                                                             manifest.classes).metric}}
        save_adapted(model, passed, model_dir, out_dir, changed=False)
        return AdaptResult(model, passed, "none", "none", {},
                           Candidate("none", {}, np.zeros((0, 0), np.float32), math.nan, 0.0), None)
    d = domains(params, manifest, target_rows, info, source_images_dir, target_images_dir)
    if ad.method != "none" and not d.target:
        raise DataError(f"adapt.method {ad.method}: the target domain has no image to adapt on (adapt split of "
                        f"{paths.TARGET_MANIFEST} is empty)")
    metric = scoring.policy(params, scoring.train_labels(manifest), manifest.classes).metric
    # The training methods train the top groups over the frozen rest, as fine-tuning does: that trunk runs once per
    # image and view (its rows of the source are fine-tuning's own), each step runs the top alone.
    backbone = Backbone(info["backbone"], model.backbone, model.backbone.num_features, d.spec,
                        layer_groups(model.backbone), info["weights_id"])
    d.trunk, _ = Trunk.for_params(params, backbone, d.spec, checkpoint_dir / paths.TRUNK_CACHE.name,
                                  batchnorm="frozen", read_also=[paths.TRUNK_CACHE])
    cut = trained_cut(model, params)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    source_only = Candidate("none", start, target_probs(model, d, device, cut),
                            source_val_score(model, d, metric, device, cut), 0.0, cut=cut)
    methods = METHODS if ad.method == "auto" else () if ad.method == "none" else (ad.method,)
    base = fingerprint(params, manifest, target_rows, model_dir)
    candidates = {}
    for method in (m for m in methods if m not in TRAINED):  # adabn: no training, statistics only
        model.load_state_dict(start)
        t0 = time.perf_counter()
        adabn(model, d.target, d.target_images, ad.batch_size, device)
        candidates[method] = Candidate(method, {k: v.detach().clone() for k, v in model.state_dict().items()},
                                       target_probs(model, d, device), source_val_score(model, d, metric, device),
                                       time.perf_counter() - t0)
        if on_method:
            on_method(candidates[method])
    racers = [m for m in methods if m in TRAINED]
    candidates |= race(racers, model, start, source_only, candidates, d, params, checkpoint_dir, base, metric, device,
                       on_method, cut)
    finished = {m: c for m, c in candidates.items() if c.pruned_at is None}
    voters = [c for c in candidates.values() if c.pruned_at is not None]
    chosen, agreement = (choose(source_only, finished, ad.max_source_drop, voters) if ad.method == "auto" else
                         (ad.method, {}))
    model.load_state_dict(source_only.state if chosen == "none" else candidates[chosen].state)
    model.eval()
    target_version = data_version(Path("."), paths.TARGET) if paths.TARGET.is_dir() and ad.target else None
    adapted_info = {**info, "adapt": {"method": ad.method, "chosen": chosen, "target": ad.target,
                                      "target_data_version": target_version, "metric": metric}}
    save_adapted(model, adapted_info, model_dir, out_dir, changed=chosen != "none")
    return AdaptResult(model, adapted_info, ad.method, chosen, candidates, source_only, d, agreement)


def race(racers: Sequence[str], model: Classifier, start: dict, source_only: Candidate,
         untrained: dict[str, Candidate], d: Domains, params: Params, checkpoint_dir: Path, base: str, metric: str,
         device: torch.device, on_method: Callable[[Candidate], None] | None, cut: int | None = None
         ) -> dict[str, Candidate]:
    """The training methods as a successive-halving race: each trains adapt.race_min_epochs, the better half by the
    label-free score (rank_racers) trains on, twice as long each round, and the last one to adapt.epochs; a stopped
    one keeps its predictions and state so far (pruned_at). One racer (a method by name) simply trains to the end.

    A method continues from its own checkpoint with the schedule of the full run, so the winner's weights are the
    ones it gets trained alone; its predictions after each round are its next pseudo-labels (self-training), and the
    source-only model's predictions are its first. cut: score over the cached trunk below it (the groups trained
    from)."""
    ad = params.adapt
    out: dict[str, Candidate] = {}
    known = {m: (0, source_only.probs) for m in racers}
    alive, rung = list(racers), ad.race_min_epochs or ad.epochs
    while alive:
        until = ad.epochs if len(alive) == 1 else min(rung, ad.epochs)
        for method in alive:
            model.load_state_dict(start)
            t0 = time.perf_counter()
            history, resumed = train_method(method, model, d, params, checkpoint_dir / method,
                                            sha256_json({"base": base, "method": method}), device, until,
                                            known[method])
            probs = target_probs(model, d, device, cut)
            known[method] = (until, probs)
            before = out.get(method)
            out[method] = Candidate(method, {k: v.detach().clone() for k, v in model.state_dict().items()}, probs,
                                    source_val_score(model, d, metric, device, cut),
                                    time.perf_counter() - t0 + (before.seconds if before else 0.0),
                                    before.resumed_epochs if before else resumed, history, cut=cut)
        if until >= ad.epochs:
            break
        ranked = rank_racers(source_only, [*untrained.values(), *out.values()], alive, ad.max_source_drop)
        for method in ranked[(len(alive) + 1) // 2:]:  # halved (rounded up): of two, one goes on
            out[method].pruned_at = until
        alive, rung = ranked[: (len(alive) + 1) // 2], rung * 2
    for c in out.values() if on_method else ():
        on_method(c)
    return out


def rank_racers(source_only: Candidate, models: Sequence[Candidate], racers: Sequence[str], max_source_drop: float
                ) -> list[str]:
    """The racers, best first, by choose()'s rule applied to the models as they stand: admissible ones (source
    validation within max_source_drop) by their agreement with the ensemble of every admissible model."""
    agreement = ensemble_agreement(admissible(source_only, models, max_source_drop))
    return sorted(racers, key=lambda m: -agreement.get(m, -1.0))


def admissible(source_only: Candidate, models: Sequence[Candidate], max_source_drop: float) -> list[Candidate]:
    """The source-only model and those whose source validation metric fell at most max_source_drop below it."""
    return [source_only, *(c for c in models if c.source_val >= source_only.source_val - max_source_drop - 1e-9)]


def choose(source_only: Candidate, candidates: dict[str, Candidate], max_source_drop: float,
           voters: Sequence[Candidate] = ()) -> tuple[str, dict[str, float]]:
    """auto's rule, and each admissible model's score: the admissible models are the source-only one and the methods
    whose source validation metric fell at most max_source_drop; the one that agrees most with their ensemble on the
    target wins (a tie keeps the source-only model). Voters (methods the race stopped) join the ensemble when
    admissible but are not chosen.

    Why not a confidence score such as information maximisation: MCC and self-training optimise confidence on the
    target themselves, so it rewards the objective rather than accuracy (on digits over photographs it chose MCC,
    16 points below self-training). The ensemble's errors are partly independent across methods, so agreeing with it
    tracks accuracy; with few admissible models it says little, and then the source-only model wins ties."""
    models = admissible(source_only, [*candidates.values(), *voters], max_source_drop)
    agreement = ensemble_agreement(models)
    best = max((c for c in models if all(c is not v for v in voters)),
               key=lambda c: (agreement[c.method], c is source_only))
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

    return sha256_json({
        "adapt": params.adapt.model_dump(mode="json", exclude={"method", "target", "test_fraction",
                                                               "race_min_epochs"}),
        "finetune": params.finetune.model_dump(mode="json"),
        "max_pixels": params.data.max_pixels,
        "model": sha256_file(Path(model_dir) / paths.FINETUNE_WEIGHTS.name),
        "source": [str(r) for r in manifest.rows],
        "target": sorted(r.sha256 for r in target_rows if r.split == "adapt"),
        "code": code_fingerprint(ADAPT_CODE),
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
