"""Far-out inputs that ship offline, for measuring "none of these": inputs of no class the model knows.

evaluate.far_out auto picks one the training data is not made of: for images scikit-learn's handwritten digits (for a
model of digits: crops of scikit-learn's two sample photographs), for texts the docstrings of Python's standard
library (sentences about code, for a model of any other kind of text); `digits`, `photos`, `docstrings` name one, and
a folder names files of your own.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from tlops.core.errors import ConfigError
from tlops.core.folders import visible_files
from tlops.inputs.images import PreprocessSpec, load_image, preprocess
from tlops.inputs.text import TextError, TextSpec

ITEMS = 200
STDLIB_MODULES = ("argparse", "json", "collections", "pathlib", "subprocess", "logging", "csv", "shutil", "datetime",
                  "functools", "itertools", "unittest", "email", "http.client", "tarfile", "zipfile", "sqlite3")


def far_out_name(choice: str, source: str, text: bool) -> str:
    if choice != "auto":
        return choice
    return "docstrings" if text else ("photos" if source == "digits" else "digits")


def far_out_batches(choice: str, spec: PreprocessSpec | TextSpec, max_pixels: int, batch: int = 64
                    ) -> Iterator[np.ndarray]:
    """The far-out set's model inputs, in batches (ConfigError naming evaluate.far_out for an unknown choice)."""
    if isinstance(spec, TextSpec):
        texts = _docstrings() if choice == "docstrings" else _texts(Path(choice), spec)
        for start in range(0, len(texts), batch):
            yield spec.batch(texts[start:start + batch])
        return
    images = (_digits() if choice == "digits" else _photo_crops() if choice == "photos" else
              [load_image(p, max_pixels, spec.decode_size, spec.rule) for p in _files(Path(choice))])
    for start in range(0, len(images), batch):
        yield np.stack([preprocess(img, spec) for img in images[start:start + batch]])


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"evaluate.far_out {str(folder)!r}: not auto, digits, photos, docstrings or a folder")
    return visible_files(folder)[:ITEMS]


def _digits() -> list[Image.Image]:
    from sklearn.datasets import load_digits

    grey = load_digits().images[:ITEMS]  # 0..16
    return [Image.fromarray((g * 255 / 16).astype(np.uint8)).convert("RGB").resize((64, 64)) for g in grey]


def _photo_crops() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    crops = []
    for i in range(ITEMS):
        photo = photos[i % len(photos)]
        side = int(rng.integers(48, 160))
        top, left = (int(rng.integers(0, d - side)) for d in photo.shape[:2])
        crops.append(Image.fromarray(photo[top:top + side, left:left + side]))
    return crops


def _docstrings() -> list[str]:
    import importlib

    sentences: list[str] = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(v for _, v in inspect.getmembers(module) if inspect.isclass(v) or inspect.isfunction(v))]:
            doc = inspect.getdoc(obj) or ""
            sentences += [s.strip() for s in re.split(r"(?<=\.)\s+", " ".join(doc.split())) if len(s.split()) >= 6]
    return list(dict.fromkeys(sentences))[:ITEMS]  # each once, in a fixed order


def _texts(folder: Path, spec: TextSpec) -> list[str]:
    out = []
    for path in _files(folder):
        try:
            out.append(spec.clean(path.read_text(encoding="utf-8")))
        except (TextError, UnicodeDecodeError):
            continue
    return out
