"""Feature-extraction benchmark: the features stage's extraction path against ONNX Runtime, same batches.

    python bench/extraction.py [--sizes 96,224] [--images 128] [--batch 32] [--rounds 3] [--threads N]

EfficientNet-Lite0 with its packaged ImageNet weights, on scikit-learn's digits preprocessed with the
backbone's own spec. Contenders, run in turn on the very same float32 batches, round after round (so
load from other processes hits all of them alike):
  stage        tlops.features.make_runner(engine="auto"): what `features` runs on this machine
  onnxruntime  the reference: tlops.export.export_onnx + tlops.onnx.runtime.session (what serving runs)
  torch        the stage's PyTorch path: inference_mode + channels_last (used on CUDA, or as fallback)
  eager        plain PyTorch: NCHW, no_grad, as a tutorial would write it
Prints images/s (median and best over rounds) and stage / onnxruntime. Target: >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tlops.core.config import load_params

BACKBONE = "efficientnet_lite0"


def digit_batches(spec, n: int, batch: int) -> list[np.ndarray]:
    """n digits (8x8 grey, upscaled by the backbone's preprocessing) as float32 NCHW batches."""
    from sklearn.datasets import load_digits

    from tlops.inputs.images import preprocess_uint8

    imgs = np.rint(load_digits().images[:n] * (255 / 16)).astype(np.uint8)
    x = np.stack([preprocess_uint8(img, spec) for img in imgs])
    return [x[i : i + batch] for i in range(0, len(x), batch)]


def contenders(bb, threads: int | None, example: np.ndarray, tmp: Path) -> dict[str, Callable]:
    import torch

    from tlops.export import onnx_export
    from tlops.features.frozen import make_runner, torch_runner
    from tlops.onnx import runtime

    stage, engine = make_runner(bb, "auto", threads, example=example)
    onnx_path = onnx_export.export_onnx(bb.model, bb.spec.input_size, tmp / f"{bb.name}-{bb.spec.input_size}.onnx", 17)
    sess = runtime.session(onnx_path, threads, cpu_only=True)
    name = sess.get_inputs()[0].name

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return bb.model(torch.from_numpy(x)).numpy()

    return {f"stage ({engine})": stage, "onnxruntime": lambda x: sess.run(None, {name: x})[0],
            "torch (channels_last)": torch_runner(bb, torch.device("cpu")), "eager": eager}


def measure(runs: dict[str, Callable], batches: list[np.ndarray], rounds: int) -> dict[str, list[float]]:
    """images/s of each contender per round; contenders take turns within a round."""
    n = sum(len(b) for b in batches)
    for run in runs.values():  # warm-up: first-call allocations and kernel selection
        run(batches[0])
    speeds: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            t = time.perf_counter()
            for b in batches:
                run(b)
            speeds[k].append(n / (time.perf_counter() - t))
    return speeds


def bench_size(size: int, args: argparse.Namespace, tmp: Path) -> float:
    import torch

    from tlops.models.backbones import create_backbone

    bb = create_backbone(BACKBONE, image_size=size)
    batches = digit_batches(bb.spec, args.images, args.batch)
    runs = contenders(bb, args.threads, batches[0][:4], tmp)
    speeds = measure(runs, batches, args.rounds)
    print(f"\n{BACKBONE} @ {size} px, batch {args.batch}, {sum(len(b) for b in batches)} images x {args.rounds} rounds,"
          f" torch threads {torch.get_num_threads()}")
    for k, v in speeds.items():
        print(f"  {k:24s} {np.median(v):8.1f} images/s median   {max(v):8.1f} best")
    stage = next(k for k in speeds if k.startswith("stage"))
    ratio = float(np.median(speeds[stage]) / np.median(speeds["onnxruntime"]))
    print(f"  stage / onnxruntime      {ratio:8.2f}   (target >= 0.8)   "
          f"eager / onnxruntime {np.median(speeds['eager']) / np.median(speeds['onnxruntime']):.2f}")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="comma-separated input sizes (default: params image size,224)")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: features.num_threads)")
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    args.threads = args.threads or params.features.num_threads
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [params.model.image_size or 224, 224]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        ratios = [bench_size(s, args, Path(tmp)) for s in dict.fromkeys(sizes)]
    print(f"\nload average {os.getloadavg()[0]:.1f} at end; worst stage / onnxruntime ratio {min(ratios):.2f}")


if __name__ == "__main__":
    main()
