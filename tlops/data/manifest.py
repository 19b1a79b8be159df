"""The manifest: one row per item (path, label, split, sha256, ...), written and read by every stage after prepare."""

from __future__ import annotations

import csv
import io
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from tlops.core import paths
from tlops.core.errors import DataError
from tlops.core.io import write_text

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ManifestRow:
    path: str
    label: str
    split: str
    sha256: str
    width: int
    height: int


MANIFEST_COLUMNS = tuple(f.name for f in fields(ManifestRow))


@dataclass(frozen=True)
class Manifest:
    rows: list[ManifestRow]
    classes: list[str]

    def rows_in(self, split: str) -> list[ManifestRow]:
        """The rows of one split (train, val or test), in manifest order."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        return [r for r in self.rows if r.split == split]

    def without_training(self, items: set[str]) -> Manifest:
        """This manifest without the training rows of these item paths (the label audit's drops; validation and test
        rows stay: they are only reported)."""
        if not items:
            return self
        return Manifest([r for r in self.rows if not (r.split == "train" and r.path in items)], self.classes)

    def label_index(self, label: str) -> int:
        """The class index of a label: its position in the sorted class list."""
        try:
            return self.classes.index(label)
        except ValueError:
            raise DataError(f"label {label!r} is not one of the manifest's classes {self.classes}") from None


def split_items(manifest: Manifest, split: str) -> list[tuple[str, int]]:
    """(image path, class index) of the manifest rows in `split`, in manifest order; DataError when there are none."""
    items = [(row.path, manifest.label_index(row.label)) for row in manifest.rows_in(split)]
    if not items:
        raise DataError(f"manifest has no {split!r} images; the prepare stage must assign some to {split}")
    return items


DICOM_SOURCES = ".dicom_sources.json"  # in data/raw: content-hash name -> original path; tracked, never reported


def same_classes(*class_lists: list[str]) -> list[str]:
    """The class list shared by the manifest and every model trained on it; DataError if they differ."""
    first = list(class_lists[0])
    for other in class_lists[1:]:
        if list(other) != first:
            raise DataError(f"class lists differ: manifest has {first}, a model was trained on {list(other)}; "
                            "rerun train_head and finetune on this data")
    return first


def write_manifest(path: Path, rows: list[ManifestRow]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(astuple(r) for r in rows)
    write_text(path, buf.getvalue())


def load_manifest(path: Path = paths.MANIFEST) -> Manifest:
    """Read manifest.csv (written by prepare) into rows and the sorted class list."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path} not found; run the prepare stage first (dvc repro prepare)") from None
    rows = parse_manifest(text, path)
    return Manifest(rows=rows, classes=sorted({r.label for r in rows}))


def parse_manifest(text: str, path: Path) -> list[ManifestRow]:
    """The rows of a manifest CSV's text (the source's or the target domain's)."""
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
        raise DataError(f"{path}: columns are {reader.fieldnames}, expected {list(MANIFEST_COLUMNS)}")
    return [ManifestRow(d["path"], d["label"], d["split"], d["sha256"], int(d["width"]), int(d["height"]))
            for d in reader]
