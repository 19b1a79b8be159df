"""Digits drawn over colour photographs: the MNIST -> MNIST-M construction, offline, as a target domain.

    python bench/target_domain.py <folder> [--size 32] [--flat]

Each of scikit-learn's 1797 digits, upscaled to `size` px, is blended with a random patch of scikit-learn's two
sample photographs (|patch - digit| per channel, as MNIST-M is made) and written as <folder>/<digit>/<n>.png (with
--flat, all in one folder: no labels). Nothing here is committed; the folder is generated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def digits_over_photos(out: Path, size: int = 32, flat: bool = False, seed: int = 0) -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return over_photos(np.rint(digits.images * 255 / 16).astype(np.uint8), [str(int(t)) for t in digits.target],
                       out, size, flat, seed)


def fashion_over_photos(out: Path, n: int = 3000, size: int = 32, flat: bool = False, seed: int = 0) -> int:
    """The first n of Fashion-MNIST's test images (never among bench/datasets.fashion's training ones) over photos."""
    from datasets import FASHION_CLASSES, _idx, debian_package

    root = debian_package("dataset-fashion-mnist") / "usr/share/datasets/fashion-mnist"
    images, labels = _idx(root / "t10k-images-idx3-ubyte.gz")[:n], _idx(root / "t10k-labels-idx1-ubyte.gz")[:n]
    return over_photos(images, [FASHION_CLASSES[c] for c in labels], out, size, flat, seed)


def over_photos(images: np.ndarray, labels: list[str], out: Path, size: int, flat: bool, seed: int) -> int:
    """Each grey image, resized to `size` px, as |photo patch - image| per channel (how MNIST-M is made)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        grey = Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC)
        photo = photos[rng.integers(len(photos))]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        patch = photo[y : y + size, x : x + size].astype(np.int16)
        blended = np.abs(patch - np.asarray(grey, np.int16)[..., None]).astype(np.uint8)
        folder = out if flat else out / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(blended).save(folder / f"mnistm_{i:05d}.png")
    return len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--flat", action="store_true", help="no class folders: a target without labels")
    args = ap.parse_args()
    print(f"{digits_over_photos(args.folder, args.size, args.flat)} images in {args.folder}")


if __name__ == "__main__":
    main()
