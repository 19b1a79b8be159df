"""data.source materialised as data/raw/<class>/<file>: the embedded digits, a folder, a CSV of texts, a torchvision
dataset; DICOM files renamed by their content."""

from __future__ import annotations

import csv
import difflib
import inspect
import io
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlops.core import paths
from tlops.core.config import DataParams
from tlops.core.errors import ConfigError, DataError
from tlops.core.folders import replaced_dir, visible_files
from tlops.core.io import sha256_bytes, write_json
from tlops.data.manifest import DICOM_SOURCES
from tlops.data.version import forget_data_version

TORCHVISION_ROOT = paths.STATE_DIR / "torchvision"  # download root when data.path is not set

# Datasets whose constructor takes `split=` (torchvision cannot tell us the allowed values); every part is
# ingested because prepare makes its own split. Datasets with `train=` get both halves; others their default.
TORCHVISION_SPLITS = {
    "Country211": ("train", "valid", "test"),
    "DTD": ("train", "val", "test"),
    "FGVCAircraft": ("train", "val", "test"),
    "Flowers102": ("train", "val", "test"),
    "Food101": ("train", "test"),
    "GTSRB": ("train", "test"),
    "OxfordIIITPet": ("trainval", "test"),
    "StanfordCars": ("train", "test"),
    "STL10": ("train", "test"),
    "SVHN": ("train", "test"),
}


def ingest_source(params: DataParams, out_dir: Path = paths.RAW) -> dict:
    """Materialise data.source as out_dir/<class>/<image>, swapping the whole folder in at the end."""
    writer = _source_writer(params, Path(out_dir))
    forget_data_version()
    with replaced_dir(Path(out_dir)) as tmp:
        writer(tmp)
    files = [f.relative_to(out_dir) for f in visible_files(Path(out_dir))]
    classes = {f.parts[0] for f in files if len(f.parts) > 1}
    return {"source": params.source, "images": len(files), "classes": len(classes)}


def _source_writer(params: DataParams, out_dir: Path) -> Callable[[Path], None]:
    """The function that writes params' source into a folder; config problems surface before any I/O."""
    if params.source == "digits":
        return write_digits
    if params.source == "csv":
        src = Path(params.path or "")
        if not src.is_file():
            raise DataError(f"data.path {src} is not a file (csv expects a CSV with {params.text_column!r} and "
                            f"{params.label_column!r} columns)")
        return lambda dest: write_csv_texts(src, params.text_column, params.label_column, dest)
    if params.source in ("imagefolder", "textfolder"):
        src = Path(params.path or "")
        if not src.is_dir():
            item = "<image>" if params.source == "imagefolder" else "<text>.txt"
            raise DataError(f"data.path {src} is not a folder ({params.source} expects data.path/<class>/{item})")
        if src.resolve() == out_dir.resolve() or out_dir.resolve() in src.resolve().parents:
            raise ConfigError(f"data.path {src} is inside {out_dir}, which ingest replaces; point it elsewhere")
        return lambda dest: copy_folder(src, dest, params.dicom_frames)
    name = params.source.removeprefix("torchvision:")
    dataset_cls = torchvision_dataset(name)
    root = Path(params.path) if params.path else TORCHVISION_ROOT
    return lambda dest: write_torchvision(dataset_cls, root, params.download, dest)


def save_png(pixels: np.ndarray | Image.Image, path: Path) -> None:
    """Write a PNG whose bytes depend only on the pixels (no timestamps), so DVC hashes are reproducible."""
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def write_digits(dest: Path) -> None:
    """scikit-learn's bundled 8x8 digits (0..16 grey levels) as 8-bit PNGs in dest/<digit>/digit_<n>.png."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    for i, (img, target) in enumerate(zip(pixels, digits.target, strict=True)):
        save_png(img, dest / str(int(target)) / f"digit_{i:05d}.png")


def copy_folder(src: Path, dest: Path, dicom_frames: str = "middle") -> None:
    """Copy src's visible files byte for byte, keeping their relative paths, except DICOM files: those go to
    <class>/<sha256 of the content>.dcm, because DICOM file and folder names often carry patient names and IDs.
    Their original paths stay in dest/.dicom_sources.json only. dicom_frames "all": a multi-frame file becomes
    one single-frame file per frame (tlops.inputs.dicom.split_frames)."""
    from tlops.inputs import dicom

    sources: dict[str, str] = {}
    for f in visible_files(src):
        rel = f.relative_to(src)
        with open(f, "rb") as fh:
            head = fh.read(dicom.PREAMBLE + 4)
        if dicom.is_dicom(head, f.name):
            data = f.read_bytes()
            parts = dicom.split_frames(data) if dicom_frames == "all" else [data]
            folder = rel.parts[0] if len(rel.parts) > 1 else ""  # the class folder, or none (a flat folder)
            for k, part in enumerate(parts):
                name = f"{folder}/{sha256_bytes(part)[:24]}.dcm".lstrip("/")
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes(part)
                sources[name] = rel.as_posix() + (f"#frame={k}" if len(parts) > 1 else "")
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    if sources:
        write_json(dest / DICOM_SOURCES, dict(sorted(sources.items())))


def write_csv_texts(src: Path, text_column: str, label_column: str, dest: Path) -> None:
    """One <label>/<sha256 of the text>.txt per CSV row, its text byte for byte (prepare validates it: an empty or
    non-UTF-8 text is quarantined there, with its reason, like any file). Bytes that are not UTF-8 pass through."""
    with open(src, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in (text_column, label_column) if c not in columns]
        if missing:
            raise DataError(f"{src}: no column {' or '.join(map(repr, missing))} (columns: {columns}); set "
                            "data.text_column / data.label_column")
        for line, row in enumerate(reader, start=2):
            label = (row[label_column] or "").strip()
            if not label or label.startswith(".") or any(c in label for c in "/\\\0"):
                raise DataError(f"{src} line {line}: label {label!r} cannot name a class folder (empty, starts "
                                "with '.', or holds a slash)")
            data = (row[text_column] or "").encode("utf-8", "surrogateescape")
            target = dest / label / f"{sha256_bytes(data)[:24]}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


def torchvision_dataset(name: str) -> type:
    """The torchvision dataset class called `name`; ConfigError naming it (and a close match) if none."""
    import torch.utils.data
    import torchvision.datasets

    known = sorted(n for n, obj in vars(torchvision.datasets).items()
                   if isinstance(obj, type) and issubclass(obj, torch.utils.data.Dataset))
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean torchvision:{close[0]}?" if close else "e.g. FashionMNIST, CIFAR10, Flowers102"
        raise ConfigError(f"data.source: torchvision:{name} is not a torchvision dataset ({hint})")
    return getattr(torchvision.datasets, name)


def _torchvision_parts(dataset_cls: type) -> list[tuple[str, dict]]:
    """(part name, constructor kwargs) for every part of a dataset."""
    if dataset_cls.__name__ in TORCHVISION_SPLITS:
        return [(s, {"split": s}) for s in TORCHVISION_SPLITS[dataset_cls.__name__]]
    if "train" in inspect.signature(dataset_cls).parameters:
        return [("train", {"train": True}), ("test", {"train": False})]
    return [("all", {})]


def write_torchvision(dataset_cls: type, root: Path, download: bool, dest: Path) -> None:
    """Every part of a torchvision dataset as PNGs in dest/<class name>/<part>_<index>.png."""
    accepts_download = "download" in inspect.signature(dataset_cls).parameters
    for part, kwargs in _torchvision_parts(dataset_cls):
        if accepts_download:
            kwargs["download"] = download
        try:
            ds = dataset_cls(root=str(root), **kwargs)
        except (RuntimeError, FileNotFoundError) as e:
            raise DataError(f"torchvision:{dataset_cls.__name__} ({part}) not found under {root}: {e} "
                            "(set data.download: true when online, or data.path to a local copy)") from None
        classes = list(getattr(ds, "classes", None) or [])
        for i in range(len(ds)):
            img, target = ds[i]
            save_png(_as_image(img), dest / _class_folder(target, classes) / f"{part}_{i:06d}.png")


def _as_image(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, np.ndarray):
        return Image.fromarray(img)
    raise DataError(f"torchvision sample is a {type(img).__name__}, expected a PIL image")


def _class_folder(target: Any, classes: list[str]) -> str:
    """A safe folder name for a target: its class name when the dataset has one, else the index."""
    try:
        index = int(target)
    except (TypeError, ValueError):
        raise DataError(f"torchvision target {target!r} is not a class index") from None
    label = str(classes[index]) if 0 <= index < len(classes) else str(index)
    # Class names such as "T-shirt/top" must not create folders; a leading dot would hide the class.
    return re.sub(r"[^\w\-+,() ]", "_", label).strip().lstrip(".") or str(index)
