"""Frozen-base training vs the naive recipe, on the same digits, with the same head for the same epochs.

frozen-base: the features stage (backbone once over every image) + head epochs on the cached features.
naive:       the Keras-tutorial recipe: backbone (frozen, eval mode) + head trained as one PyTorch model, so
             the backbone runs forward on every image in every epoch (eager PyTorch, channels_last).
naive, same engine: the naive recipe but through the features stage's own runner (ONNX Runtime on CPU),
             so that ratio isolates caching from the engine.

    python bench/training.py [--images N] [--epochs 10] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from torch.nn import functional as F

from tlops.core import paths
from tlops.core.config import Params, load_params
from tlops.data import manifest, prepare, sources
from tlops.data.manifest import Manifest
from tlops.features.dataset import load_feature_dataset
from tlops.features.extract import extract_with
from tlops.features.frozen import make_runner
from tlops.inputs.model_input import load_and_preprocess
from tlops.models.backbones import create_backbone
from tlops.models.heads import build_head
from tlops.training.devices import torch_threads
from tlops.training.head import train_head_grid


def digits_subset(params: Params, images: int) -> Manifest:
    """The embedded digits, ingested and prepared in the cwd; the first `images` train rows + a quarter as many val."""
    sources.ingest_source(params.data.model_copy(update={"source": "digits"}))
    prepare.prepare_data(paths.RAW, params.data, paths.MANIFEST, paths.DATA_REPORT)
    m = manifest.load_manifest()
    if images <= 0:
        return Manifest(rows=m.rows_in("train") + m.rows_in("val"), classes=m.classes)
    rows = m.rows_in("train")[:images] + m.rows_in("val")[: max(1, images // 4)]
    return Manifest(rows=rows, classes=m.classes)


def frozen_base(bb, manifest: Manifest, params: Params) -> tuple[float, float, str]:
    """(extract seconds, head seconds, engine): the features stage, then the head on its cache."""
    t = time.perf_counter()
    stats = extract_with(bb, manifest, params, paths.FEATURES_DIR, progress=False)
    extract = time.perf_counter() - t
    t = time.perf_counter()
    train_head_grid(load_feature_dataset(), params.head)
    return extract, time.perf_counter() - t, stats["engine"]


def eager_runner(bb):
    """The tutorial's frozen base: the PyTorch model itself, eval mode, no gradients, channels_last."""
    model = bb.model.eval().requires_grad_(False).to(memory_format=torch.channels_last)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()

    return run


def naive(bb, manifest: Manifest, params: Params, same_engine: bool) -> float:
    """Seconds for head epochs where every batch goes through the frozen backbone again (runner build included)."""
    t = time.perf_counter()
    hp = params.head
    run = make_runner(bb, "auto", params.features.num_threads)[0] if same_engine else eager_runner(bb)
    train = [(r.path, manifest.label_index(r.label)) for r in manifest.rows_in("train")]
    val = [(r.path, manifest.label_index(r.label)) for r in manifest.rows_in("val")]
    torch.manual_seed(hp.seed)
    head = build_head(hp.kind, bb.num_features, len(manifest.classes), hp.hidden, hp.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=hp.lrs[0], weight_decay=hp.weight_decays[0])
    rng = np.random.default_rng(hp.seed)

    def features(items: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.stack([load_and_preprocess(p, bb.spec, params.data.max_pixels) for p, _ in items])
        return torch.from_numpy(run(x)), torch.tensor([label for _, label in items])

    for _ in range(hp.epochs):
        head.train()
        order = rng.permutation(len(train))
        for i in range(0, len(train), hp.batch_size):
            x, y = features([train[j] for j in order[i : i + hp.batch_size]])
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        head.eval()
        with torch.inference_mode():  # validation each epoch, as the frozen-base head does
            for i in range(0, len(val), hp.batch_size):
                x, y = features(val[i : i + hp.batch_size])
                F.cross_entropy(head(x), y)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=0, help="train images (val: a quarter as many); 0: all")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    base = load_params(args.params)
    # One grid point and no early stop, so both recipes train the same head for exactly --epochs epochs.
    head = base.head.model_copy(update={"epochs": args.epochs, "lrs": base.head.lrs[:1],
                                        "weight_decays": base.head.weight_decays[:1], "patience": args.epochs + 1})
    params = base.model_copy(update={"head": head})
    with tempfile.TemporaryDirectory(prefix="tlops-bench-") as tmp:
        os.chdir(tmp)
        manifest = digits_subset(params, args.images)
        bb = create_backbone(params.model.backbone, params.model.weights, params.model.image_size)
        with torch_threads(params.features.num_threads):
            extract, fit, engine = frozen_base(bb, manifest, params)
            tutorial = naive(bb, manifest, params, same_engine=False)
            same = naive(bb, manifest, params, same_engine=True)
    n_train, n_val = len(manifest.rows_in("train")), len(manifest.rows_in("val"))
    fast = extract + fit
    print(f"training benchmark: {n_train} train + {n_val} val digits at {bb.spec.input_size} px, {bb.name} "
          f"on {engine}, {args.epochs} head epochs, {torch.get_num_threads()} threads")
    print(f"  frozen-base (extract once + {args.epochs} epochs on the cache): {fast:7.2f} s "
          f"(extract {extract:.2f} s, head {fit:.2f} s)")
    print(f"  naive (backbone forward on every image every epoch):      {tutorial:7.2f} s  "
          f"ratio {tutorial / fast:.1f}x (target >= 8x)")
    print(f"  naive through the stage's own {engine} runner:         {same:7.2f} s  "
          f"ratio {same / fast:.1f}x (caching alone)")


if __name__ == "__main__":
    main()
