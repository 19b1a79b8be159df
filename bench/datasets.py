"""Public labelled image sets that are available offline, written as <class>/<image> folders (never committed).

    python bench/datasets.py <name> <folder>      # name: fashion | clipart | digits15 | clipart3x30 | digits_imbalanced

fashion      Fashion-MNIST (Debian's dataset-fashion-mnist): 400 of each of the 10 clothing classes, 28x28 grey
clipart      Open Clip Art Library (Debian's openclipart-png): the 7 object categories with >= 140 drawings
digits15     scikit-learn's digits, the first 15 of each class (about 10 each for training)
clipart3x30  3 clip-art categories x 30 drawings (about 20 each for training)
digits_imbalanced  nine digit classes x 100 and one (the 9) x 12

The Debian packages are fetched with `apt-get download` into ~/.cache/tlops-datasets and unpacked with dpkg -x.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CACHE = Path.home() / ".cache" / "tlops-datasets"
FASHION_CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot"]
CLIPART_CLASSES = ["animals", "food", "office", "people", "recreation", "tools", "transportation"]


def debian_package(name: str) -> Path:
    """The unpacked tree of a Debian package, downloaded once."""
    root = CACHE / name
    if not root.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", name], cwd=CACHE, check=True, capture_output=True)
        deb = next(CACHE.glob(f"{name}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        deb.unlink()
    return root


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion(out: Path, per_class: int = 400) -> None:
    root = debian_package("dataset-fashion-mnist") / "usr/share/datasets/fashion-mnist"
    images, labels = _idx(root / "train-images-idx3-ubyte.gz"), _idx(root / "train-labels-idx1-ubyte.gz")
    for c, name in enumerate(FASHION_CLASSES):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            Image.fromarray(images[i]).save(out / name / f"{i:05d}.png")


def clipart(out: Path, classes: list[str] = CLIPART_CLASSES, per_class: int | None = None) -> None:
    root = debian_package("openclipart-png") / "usr/share/openclipart/png"
    for name in classes:
        files = sorted((root / name).rglob("*.png"))[:per_class]
        (out / name).mkdir(parents=True, exist_ok=True)
        for f in files:  # nested sub-categories flattened into the class folder
            shutil.copyfile(f, out / name / "_".join(f.relative_to(root / name).parts))


def wordnet(out: Path, per_class: int = 400) -> None:
    """WordNet 3.0 noun glosses (Debian's wordnet-base) as texts, <lexname>/<offset>.txt (bench/wordnet.py)."""
    from bench.wordnet import write_glosses

    write_glosses(next(debian_package("wordnet-base").rglob("data.noun")), out, per_class)


def digits(out: Path, per_class: dict[int, int]) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    for c, n in per_class.items():
        (out / str(c)).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(d.target == c)[:n]:
            Image.fromarray(pixels[i]).save(out / str(c) / f"digit_{i:05d}.png")


BUILDERS = {
    "fashion": fashion,
    "clipart": clipart,
    "digits15": lambda out: digits(out, dict.fromkeys(range(10), 15)),
    "clipart3x30": lambda out: clipart(out, ["animals", "food", "transportation"], 30),
    "digits_imbalanced": lambda out: digits(out, {**dict.fromkeys(range(9), 100), 9: 12}),
}


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in BUILDERS:
        sys.exit(__doc__)
    out = Path(sys.argv[2])
    if out.exists():
        sys.exit(f"{out} exists; give a new folder")
    BUILDERS[sys.argv[1]](out)
    print(f"{sys.argv[1]}: {sum(1 for _ in out.rglob('*.png'))} images in {out}")


if __name__ == "__main__":
    main()
