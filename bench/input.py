"""Real photos in: phone-sized JPEGs through prepare, features and a fine-tuning epoch, the full decode against
decoding once at working size, next to the backbone's own ONNX Runtime throughput on ready tensors.

    python bench/input.py [--images 120] [--size 3200x2240] [--image-size 224]

The JPEGs are generated from scikit-learn's two sample photographs (crops, scaled up to the size, quality 90) in
three classes, in a temporary folder. Target: the features stage at >= 0.25x the backbone's own throughput, and no
image decoded in any fine-tuning epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos, rng = load_sample_images().images, np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % 2]
        h, w = photo.shape[:2]
        ch, cw = int(h * 0.6), int(w * 0.6)
        y, x = rng.integers(0, h - ch), rng.integers(0, w - cw)
        img = Image.fromarray(photo[y : y + ch, x : x + cw]).resize(size, Image.Resampling.BICUBIC)
        d = folder / f"class_{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"photo_{i:04d}.jpg", quality=90)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--size", default="3200x2240")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=None, help="features.num_workers (default: params.yaml's)")
    ap.add_argument("--threads", type=int, default=None, help="features.num_threads (default: params.yaml's)")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))

    import yaml

    import tlops.features.working_images
    from tlops.core import paths
    from tlops.core.config import parse_params
    from tlops.data import manifest, prepare, sources
    from tlops.export.onnx_export import export_onnx
    from tlops.features import dataset, extract
    from tlops.inputs.images import load_image, preprocess
    from tlops.models.backbones import create_backbone
    from tlops.onnx import runtime
    from tlops.training import finetune, head
    from tlops.training.augment import working_spec

    with tempfile.TemporaryDirectory(prefix="tlops-bench-input-") as tmp:
        os.chdir(tmp)
        make_photos(Path("photos"), args.images, size)
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        raw["data"].update(source="imagefolder", path="photos", min_per_class=2)
        raw["model"]["image_size"] = args.image_size
        raw["finetune"]["epochs"] = 2
        for key, value in (("num_workers", args.workers), ("num_threads", args.threads)):
            if value is not None:
                raw["features"][key] = value
        params = parse_params(raw)
        sources.ingest_source(params.data, paths.RAW)
        rows = [str(p) for p in sorted(paths.RAW.rglob("*.jpg"))]

        full_check, _ = timed(lambda: [load_image(p, params.data.max_pixels) for p in rows])
        t_prepare, _ = timed(prepare.prepare_data, paths.RAW, params.data, paths.MANIFEST, paths.DATA_REPORT)
        loaded = manifest.load_manifest()
        bb = create_backbone(params.model.backbone, params.model.weights, params.model.image_size)
        spec = working_spec(bb.spec, params.finetune.augment, params.data)

        # The backbone's own ONNX Runtime throughput on ready tensors, batches as the features stage runs them.
        x = np.stack([preprocess(load_image(rows[i % len(rows)], params.data.max_pixels, spec.decode_size), spec)
                      for i in range(params.features.batch_size)])
        onnx = export_onnx(bb.model, spec.input_size, Path("backbone.onnx"), params.export.opset, output="features")
        sess = runtime.session(onnx, params.features.num_threads, cpu_only=True)
        sess.run(None, {"input": x})
        t_ready, _ = timed(lambda: [sess.run(None, {"input": x}) for _ in range(5)])
        ready = 5 * len(x) / t_ready

        # Before: every image decoded whole, then resized, one after the other, then the backbone.
        def full_decode_path() -> None:
            for i in range(0, len(rows), params.features.batch_size):
                chunk = rows[i : i + params.features.batch_size]
                sess.run(None, {"input": np.stack([preprocess(load_image(p, params.data.max_pixels), spec)
                                                   for p in chunk])})

        t_old, _ = timed(full_decode_path)
        t_features, stats = timed(extract.extract_features, loaded, params, paths.FEATURES_DIR, progress=False)

        decoded: list[str] = []
        original = tlops.features.working_images.decode
        tlops.features.working_images.decode = lambda *a, **k: decoded.append(a[0]) or original(*a, **k)
        per_epoch = []
        head.save_head(head.train_head_grid(dataset.load_feature_dataset(), params.head))
        t_finetune, _ = timed(finetune.finetune_model, params, loaded, paths.HEAD_DIR, on_epoch=lambda row, epoch:
                              per_epoch.append(len(decoded)))
        tlops.features.working_images.decode = original

    n = len(rows)
    print(f"\n{n} JPEGs of {size[0]}x{size[1]} at {args.image_size} px, {os.cpu_count()} cores")
    print(f"prepare: full decode of every file {n / full_check:6.1f} images/s; the prepare stage (decodes at "
          f"working size) {n / t_prepare:6.1f} images/s: {full_check / t_prepare:.2f}x")
    print(f"features: full decode + resize + backbone {n / t_old:6.1f} images/s; the features stage "
          f"{stats['extracted'] / t_features:6.1f} images/s ({stats['decoded']} decoded, {stats['engine']}): "
          f"{t_old / t_features * stats['extracted'] / n:.2f}x")
    print(f"backbone alone on ready tensors (ONNX Runtime): {ready:6.1f} images/s; features stage / backbone = "
          f"{stats['extracted'] / t_features / ready:.3f} (target >= 0.25; full-decode path: {n / t_old / ready:.3f})")
    print(f"finetune, {len(per_epoch)} epochs in {t_finetune:.1f} s: images decoded by the end of each epoch "
          f"{per_epoch} (target: none)")


if __name__ == "__main__":
    main()
