"""Feature extraction: the frozen backbone over every manifest item once, cached by content, written as the features
.npz the head trains on."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlops.core import paths
from tlops.core.config import Params
from tlops.core.errors import DataError
from tlops.core.io import atomic_path, sha256_bytes, sha256_json
from tlops.data.manifest import Manifest
from tlops.features.frozen import Runner, make_runner
from tlops.features.working_images import WorkingImages, for_manifest
from tlops.inputs.images import PreprocessSpec, preprocess
from tlops.inputs.text import TextSpec, load_text
from tlops.models.backbones import Backbone, create_backbone
from tlops.training.augment import training_view, working_spec
from tlops.training.devices import torch_threads

log = logging.getLogger(__name__)
PRECISION = "fp32"  # part of every key: features from another precision are other features


@dataclass(frozen=True)
class Item:
    """One feature row to produce: an image, and which view of it (0 = the image itself)."""

    path: str
    sha256: str
    label: int
    split: str
    view: int
    key: str


def extract_features(manifest: Manifest, params: Params, out_dir: Path = paths.FEATURES_DIR,
                     progress: bool = True, engine: str = "auto") -> dict:
    """Features of every manifest image (and augmented train views) into out_dir; only uncached rows run."""
    bb = create_backbone(params.model.backbone, params.model.weights, params.model.image_size,
                         max_tokens=params.model.max_tokens)
    return extract_with(bb, manifest, params, Path(out_dir), progress, engine)


def extract_with(bb: Backbone, manifest: Manifest, params: Params, out_dir: Path, progress: bool = True,
                 engine: str = "auto") -> dict:
    """extract_features with a given backbone (which is left as it was: eval mode, weights untouched)."""
    if bb.modality == "text":
        return extract_texts(bb, manifest, params, out_dir, progress, engine)
    start = time.perf_counter()
    spec = working_spec(bb.spec, params.finetune.augment, params.data)
    cache_dir = out_dir / paths.FEATURES_CACHE.relative_to(paths.FEATURES_DIR)
    images = for_manifest(manifest, spec, params.data.max_pixels, out_dir / paths.FEATURES_IMAGES.name, writer=True)
    items = manifest_items(manifest, params, extractor_id(bb, spec))
    cached = read_cache(cache_dir, {it.key for it in items})
    todo = list({it.key: it for it in items if it.key not in cached}.values())  # an image once, however often listed
    used, seconds, decoded = "none", 0.0, 0
    if todo:
        t = time.perf_counter()
        engine_used: list[str] = []

        def runner() -> Runner:
            run, name = make_runner(bb.model, spec.input_size, engine, params.features.num_threads,
                                    example=_batch(todo[:4], images, params), opset=params.export.opset,
                                    atol=params.export.parity_atol)
            engine_used.append(name)
            return run

        with torch_threads(params.features.num_threads):
            new = run_batches(runner, todo, images, params, bb.num_features, progress)  # decodes what it lacks
        used = engine_used[0]
        decoded = images.flush()  # the one decode of each image, kept for fine-tuning and evaluation
        seconds = time.perf_counter() - t
        write_shard(cache_dir, [it.key for it in todo], new)
        cached.update(zip((it.key for it in todo), new, strict=True))
    decoded += images.ensure([r.path for r in manifest.rows], params.features.num_workers)  # a lost or older store
    meta = {"backbone": bb.name, "weights_id": bb.weights_id, "spec": spec.to_dict(),
            "num_features": bb.num_features, "precision": PRECISION,
            "augment_views": params.features.augment_views,
            "augment": params.finetune.augment.model_dump(mode="json"), "augment_seed": params.finetune.seed}
    write_dataset(out_dir / paths.FEATURES_DATASET.relative_to(paths.FEATURES_DIR), items, cached,
                  manifest.classes, meta, bb.num_features)
    return {"extracted": len(todo), "cached": len(items) - len(todo), "total": len(items), "decoded": decoded,
            "seconds": round(time.perf_counter() - start, 3),
            "images_per_s": round(len(todo) / seconds, 1) if seconds else 0.0, "engine": used,
            "backbone": bb.name, "weights_id": bb.weights_id}


def extract_texts(bb: Backbone, manifest: Manifest, params: Params, out_dir: Path, progress: bool = True,
                  engine: str = "auto") -> dict:
    """The text side of extract_with: each manifest text once (no augmented views), by content hash; the texts
    run sorted by length, so that a batch pads little."""
    start = time.perf_counter()
    spec = working_spec(bb.spec, params.finetune.augment, params.data)
    cache_dir = out_dir / paths.FEATURES_CACHE.relative_to(paths.FEATURES_DIR)
    items = manifest_items(manifest, params, extractor_id(bb, spec), views=0)
    cached = read_cache(cache_dir, {it.key for it in items})
    todo = list({it.key: it for it in items if it.key not in cached}.values())
    used, seconds = "none", 0.0
    if todo:
        t = time.perf_counter()
        try:
            ids = spec.encode([load_text(it.path, spec.max_chars) for it in todo])
        except FileNotFoundError as e:
            raise DataError(f"{e.filename} is in the manifest but not on disk; rerun the prepare stage") from None
        order = np.argsort([len(x) for x in ids], kind="stable")
        size = params.features.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        with torch_threads(params.features.num_threads):
            run, used = make_runner(bb.model, spec.input_size, engine, params.features.num_threads,
                                    example=spec.pad([ids[i] for i in batches[-1][:4]]), opset=params.export.opset,
                                    atol=params.export.parity_atol)
            new = np.empty((len(todo), bb.num_features), np.float32)
            from tqdm.auto import tqdm

            for b in tqdm(batches, desc="features", unit="batch", disable=not progress):
                new[b] = run(spec.pad([ids[i] for i in b]))
        seconds = time.perf_counter() - t
        write_shard(cache_dir, [it.key for it in todo], new)
        cached.update(zip((it.key for it in todo), new, strict=True))
    meta = {"backbone": bb.name, "weights_id": bb.weights_id, "spec": spec.identity(),
            "num_features": bb.num_features, "precision": PRECISION, "augment_views": 0}
    write_dataset(out_dir / paths.FEATURES_DATASET.relative_to(paths.FEATURES_DIR), items, cached,
                  manifest.classes, meta, bb.num_features)
    return {"extracted": len(todo), "cached": len(items) - len(todo), "total": len(items), "decoded": 0,
            "seconds": round(time.perf_counter() - start, 3),
            "texts_per_s": round(len(todo) / seconds, 1) if seconds else 0.0, "engine": used,
            "backbone": bb.name, "weights_id": bb.weights_id}


def extractor_id(bb: Backbone, spec: PreprocessSpec | TextSpec) -> dict:
    """What makes a feature what it is, apart from the item: network, weights, preprocessing, precision."""
    return {"backbone": bb.name, "weights_id": bb.weights_id, "spec": spec.identity(), "precision": PRECISION}


def feature_key(extractor: dict, image_sha256: str, view: int = 0, augment: dict | None = None) -> str:
    """The content address of one feature row; augment (the view's recipe and seed) only for view > 0."""
    return sha256_json({"extractor": extractor, "image": image_sha256, "view": view,
                        "augment": augment if view else None})


def manifest_items(manifest: Manifest, params: Params, extractor: dict, views: int | None = None) -> list[Item]:
    """Every row to produce: each image as view 0, then features.augment_views (or `views`) views of each train
    image."""
    recipe = {**params.finetune.augment.model_dump(mode="json"), "seed": params.finetune.seed}
    extra = params.features.augment_views if views is None else views
    items = []
    for r in manifest.rows:
        views = 1 + (extra if r.split == "train" else 0)
        label = manifest.label_index(r.label)
        items += [Item(r.path, r.sha256, label, r.split, v, feature_key(extractor, r.sha256, v, recipe))
                  for v in range(views)]
    return items


def _input(item: Item, images: WorkingImages, params: Params) -> np.ndarray:
    """The model input of one item: the eval preprocessing, or augmented view k, drawn as fine-tuning's view k is."""
    img = images.get(item.path)
    if item.view == 0:
        return preprocess(img, images.spec)
    return training_view(img, images.spec, params.finetune.augment, params.finetune.seed, item.view, item.sha256)


def _batch(items: list[Item], images: WorkingImages, params: Params, pool: ThreadPoolExecutor | None = None
           ) -> np.ndarray:
    try:
        arrays = pool.map(lambda it: _input(it, images, params), items) if pool else [
            _input(it, images, params) for it in items]
        return np.stack(list(arrays))
    except FileNotFoundError as e:
        raise DataError(f"{e.filename} is in the manifest but not on disk; rerun the prepare stage") from None


def run_batches(runner: Callable[[], Runner], items: list[Item], images: WorkingImages, params: Params, width: int,
                progress: bool) -> np.ndarray:
    """(len(items), width) float32 features, features.batch_size images at a time. The next batch is prepared
    (decoded when new, resized, augmented) by features.num_workers threads while the current one runs; `runner()`
    builds the engine (export, parity check) first."""
    from tqdm.auto import tqdm

    size = params.features.batch_size
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    out = np.empty((len(items), width), dtype=np.float32)
    with (ThreadPoolExecutor(max_workers=params.features.num_workers or os.cpu_count() or 1) as pool,
          ThreadPoolExecutor(max_workers=1) as ahead,
          tqdm(total=len(items), desc="features", unit="img", disable=not progress) as bar):
        run = runner()  # first: exporting beside the decoding threads costs both more than it saves (2 cores)
        upcoming = ahead.submit(_batch, chunks[0], images, params, pool) if chunks else None
        for k, chunk in enumerate(chunks):
            x = upcoming.result()
            if k + 1 < len(chunks):
                upcoming = ahead.submit(_batch, chunks[k + 1], images, params, pool)
            out[k * size : k * size + len(chunk)] = run(x)
            bar.update(len(chunk))
    return out


def read_cache(cache_dir: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    """key -> feature row for the wanted keys found in any shard of the cache."""
    found: dict[str, np.ndarray] = {}
    for shard in sorted(Path(cache_dir).glob("*.npz")):
        try:
            with np.load(shard) as z:
                keys, feats = z["keys"], z["features"]
        except (OSError, ValueError, KeyError) as e:  # a damaged shard costs a re-extraction, not the stage
            log.warning("features: ignoring unreadable cache shard %s (%s)", shard, e)
            continue
        for i in np.flatnonzero(np.isin(keys, list(wanted))):
            found[str(keys[i])] = feats[i]
    return found


def write_shard(cache_dir: Path, keys: list[str], features: np.ndarray) -> Path:
    """One cache shard, named by its content, written atomically."""
    path = Path(cache_dir) / f"shard-{sha256_bytes(chr(10).join(keys).encode())[:16]}.npz"
    _savez(path, keys=np.asarray(keys, dtype=str), features=np.asarray(features, dtype=np.float32))
    return path


def write_dataset(path: Path, items: list[Item], rows: dict[str, np.ndarray], classes: list[str], meta: dict,
                  width: int) -> None:
    """features/dataset.npz: the rows of `items`, in order, with labels, splits, hashes, views and meta."""
    feats = np.stack([rows[it.key] for it in items]) if items else np.empty((0, width), np.float32)
    _savez(path, features=feats.astype(np.float32, copy=False),
           labels=np.asarray([it.label for it in items], dtype=np.int64),
           splits=np.asarray([it.split for it in items], dtype=str),
           sha256=np.asarray([it.sha256 for it in items], dtype=str),
           views=np.asarray([it.view for it in items], dtype=np.int64),
           paths=np.asarray([it.path for it in items], dtype=str),
           classes=np.asarray(classes, dtype=str), meta=np.asarray(json.dumps(meta, sort_keys=True)))


def _savez(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no .npz suffix
        np.savez(f, **arrays)
