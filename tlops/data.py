"""Data sources, validation, the stable split, the manifest and the data version.

`ingest` turns a source into data/raw/<class>/<item> (the DVC-tracked dataset: images, or one text per .txt file);
`prepare` decodes every item, quarantines the bad ones, drops exact duplicates and writes the manifest and
reports/data.json. For texts the manifest's sha256 is that of the normalised text and width/height are its length
in characters and in words.
"""

from __future__ import annotations

import csv
import difflib
import inspect
import io
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlops import paths
from tlops.config import DataParams, NearDuplicateParams
from tlops.errors import ConfigError, DataError
from tlops.io import sha256_bytes, write_json, write_text
from tlops.preprocess import ImageError, Intensity, load_image
from tlops.scoring import imbalance_ratio
from tlops.text import TextError, decode_text, text_sha256

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
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


# ---------------------------------------------------------------- ingest


def ingest(params: DataParams, out_dir: Path = paths.RAW) -> dict:
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


@contextmanager
def replaced_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `target`; if the block succeeds it takes target's place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old.tmp")
        if target.exists() or target.is_symlink():
            os.replace(target, old)
        os.replace(tmp, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def visible_files(root: Path) -> list[Path]:
    """Files below root, sorted, skipping hidden files and anything inside a hidden folder."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(found)


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


DICOM_SOURCES = ".dicom_sources.json"  # in data/raw: content-hash name -> original path; tracked, never reported


def copy_folder(src: Path, dest: Path, dicom_frames: str = "middle") -> None:
    """Copy src's visible files byte for byte, keeping their relative paths, except DICOM files: those go to
    <class>/<sha256 of the content>.dcm, because DICOM file and folder names often carry patient names and IDs.
    Their original paths stay in dest/.dicom_sources.json only. dicom_frames "all": a multi-frame file becomes
    one single-frame file per frame (tlops.dicom.split_frames)."""
    from tlops import dicom

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


# ---------------------------------------------------------------- prepare


@dataclass(frozen=True)
class Checked:
    """An image that decoded fully, with the two fingerprints that find its copies."""

    path: str
    label: str
    sha256: str  # of the file's bytes
    width: int
    height: int
    pixels: str = ""  # sha256 of the decoded RGB pixels: the same picture in PNG, BMP, TIFF, ... has one
    phash: int = 0  # 64-bit perceptual hash: re-encoded and resized copies differ from it in a few bits
    thumbnail: bytes = b""  # 16x16 grey: flat pictures, whose perceptual hash is unstable, still match on it
    group: str = ""  # sha256 naming the group (data.group_by: a patient, a path pattern) it splits with; "": none
    truncated: bool = False  # a text cut to data.max_chars


def prepare(raw_dir: Path, params: DataParams, manifest_path: Path, report_path: Path) -> dict:
    """Validate raw_dir/<class>/<image>, split it stably and write the manifest and the data report."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir} does not exist; run the ingest stage first (dvc repro ingest)")
    candidates, stray = find_candidates(raw_dir)
    checked = validate(candidates, stray, params, original_paths(raw_dir))
    check_classes(checked.kept, dict(candidates), checked.quarantined, params.min_per_class, raw_dir)
    rows = checked.rows(lambda key, label: split_of(key, params))
    check_splits(rows, params)
    report = data_report(rows, checked.quarantined, checked.duplicates, checked.groups, params.imbalance_ratio,
                         group_counts(checked.kept, rows, params.group_by))
    if params.modality == "text":
        lengths = sorted(r.width for r in rows)
        report["text"] = {"truncated": sum(c.truncated for c in checked.kept), "max_chars": params.max_chars,
                          "median_chars": lengths[len(lengths) // 2] if lengths else 0,
                          "longest_chars": lengths[-1] if lengths else 0}
    write_manifest(manifest_path, rows)
    write_json(report_path, report)
    return report


@dataclass
class Validated:
    """What validation keeps and rejects of a folder's candidate images (prepare, and the target domain's too)."""

    kept: list[Checked]
    quarantined: list[dict]
    duplicates: list[dict]
    groups: list[list[Checked]]

    def rows(self, split: Callable[[str, str], str]) -> list[ManifestRow]:
        """Manifest rows sorted by path; `split(key, label)` assigns one, key = one hash shared by all the images
        linked by a near-duplicate group or a data.group_by group (a patient), so that they split as one."""
        key = split_keys(self.kept, self.groups)
        return sorted((ManifestRow(c.path, c.label, split(key[c.path], c.label), c.sha256, c.width, c.height)
                       for c in self.kept), key=lambda r: r.path)


def split_keys(kept: list[Checked], near: list[list[Checked]]) -> dict[str, str]:
    """path -> the hash its split is drawn from. Images linked by near-duplicate groups or by a data.group_by group
    (transitively) share one key: the smallest group hash among them (stable as data grows: a patient's images stay
    where the patient is), else the smallest content hash. Two patients linked by a near-duplicate share a split."""
    parent = {c.path: c.path for c in kept}

    def root(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    members: dict[str, list[str]] = defaultdict(list)
    for c in kept:
        if c.group:
            members[c.group].append(c.path)
    for linked in [*([c.path for c in g] for g in near), *members.values()]:
        for other in linked[1:]:
            parent[root(other)] = root(linked[0])
    # A component with a group is keyed by its smallest group hash only: an ungrouped copy that joins a patient later
    # (a PNG of one scan, a file without PatientID) never moves the patient, whatever its content hash.
    grouped: dict[str, str] = {}
    plain: dict[str, str] = {}
    for c in kept:
        r = root(c.path)
        if c.group:
            grouped[r] = min(grouped.get(r, c.group), c.group)
        else:
            plain[r] = min(plain.get(r, c.sha256), c.sha256)
    return {c.path: grouped.get(root(c.path)) or plain[root(c.path)] for c in kept}


def group_counts(kept: list[Checked], rows: list[ManifestRow], rule: str) -> dict[str, Any] | None:
    """reports/data.json's groups: how many data.group_by groups (patients) each split holds; None for none."""
    if rule == "none":
        return None
    split_of_path = {r.path: r.split for r in rows}
    by_split: dict[str, set[str]] = {s: set() for s in SPLITS}
    for c in kept:
        if c.group:
            by_split[split_of_path[c.path]].add(c.group)
    return {"rule": rule if rule == "patient" else "path pattern", **{s: len(g) for s, g in by_split.items()},
            "ungrouped_images": sum(not c.group for c in kept)}


def validate(candidates: list[tuple[str, str]], stray: list[dict], params: DataParams,
             originals: dict[str, str] | None = None) -> Validated:
    """Decode every candidate, quarantine the bad ones, keep one copy of each picture, group near-duplicates.
    originals: a candidate's path before ingest renamed it (DICOM), for a group_by pattern to match."""
    if params.modality == "text":
        good, bad = check_texts(candidates, params.max_chars, params.group_by)
    else:
        good, bad = check_images(candidates, params.max_pixels, Intensity(params.intensity, params.window),
                                 params.group_by, originals)
    kept, duplicates, conflicting = deduplicate(good)
    quarantined = sorted([*stray, *bad, *conflicting], key=lambda q: q["path"])
    near = near_duplicate_groups(kept, params.near_duplicates) if params.modality == "image" else []
    return Validated(kept, quarantined, duplicates, near)


def original_paths(raw_dir: Path) -> dict[str, str]:
    """{manifest path: the file's path in the source} for the DICOM files ingest renamed (DICOM_SOURCES)."""
    sources = Path(raw_dir) / DICOM_SOURCES
    if not sources.exists():
        return {}
    return {_display(Path(raw_dir) / new): old for new, old in json.loads(sources.read_text(encoding="utf-8")).items()}


def find_candidates(raw_dir: Path) -> tuple[list[tuple[str, str]], list[dict]]:
    """(path, label) of every visible file in a class folder, and quarantine entries for files outside one."""
    candidates, stray = [], []
    for f in visible_files(raw_dir):
        rel = f.relative_to(raw_dir)
        if len(rel.parts) < 2:
            stray.append({"path": _display(f), "reason": "no_class_folder",
                          "detail": f"{_display(f)} is not inside a <class>/ folder"})
        else:
            candidates.append((_display(f), rel.parts[0]))
    return candidates, stray


def _display(path: Path) -> str:
    """A path as the manifest stores it: relative to the project root (cwd) when under it, POSIX slashes."""
    if path.is_absolute():
        try:
            path = path.relative_to(Path.cwd())
        except ValueError:
            pass
    return path.as_posix()


# prepare decodes at this working size: enough for the fingerprints, and a phone photo costs an eighth of its decode
CHECK_SHORT = 256


def check_images(candidates: list[tuple[str, str]], max_pixels: int, intensity: Intensity = Intensity(),
                 group_by: str = "none", originals: dict[str, str] | None = None) -> tuple[list[Checked], list[dict]]:
    """Decode every candidate completely (at working size); the ones that fail become {path, reason, detail}
    entries. Pixel identity and the perceptual fingerprints are taken at that size; group_by names each image's
    group (group_of)."""
    import imagehash

    good, bad = [], []
    for path, label in candidates:
        try:
            data = Path(path).read_bytes()
            img = load_image(path, max_pixels, CHECK_SHORT, intensity)  # every byte decoded, at working size
            width, height = img.info["decoded_from"]
            pixels = sha256_bytes(f"{width}x{height}:".encode() + img.tobytes())
            thumbnail = img.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX).tobytes()
            good.append(Checked(path, label, sha256_bytes(data), width, height, pixels,
                                int(str(imagehash.phash(img)), 16), thumbnail,
                                group_of((originals or {}).get(path, path), data, group_by)))
        except ImageError as e:
            bad.append({"path": path, "reason": e.reason, "detail": e.detail})
        except OSError as e:
            bad.append({"path": path, "reason": "unreadable", "detail": f"{path}: {e}"})
        except Exception as e:  # a decoder bug on one hostile file must not stop the stage
            bad.append({"path": path, "reason": "corrupt", "detail": f"{path}: {type(e).__name__}: {e}"})
    return good, bad


def check_texts(candidates: list[tuple[str, str]], max_chars: int, group_by: str = "none"
                ) -> tuple[list[Checked], list[dict]]:
    """Read every candidate as one UTF-8 text (tlops.text.decode_text: NFC, whitespace); the ones that fail become
    {path, reason, detail} entries. A text over max_chars is kept, cut, and has `truncated` set on its entry. Its
    hash is the normalised text's, so copies that differ in encoding details or whitespace are one text."""
    good, bad = [], []
    for path, label in candidates:
        try:
            data = Path(path).read_bytes()
            text, cut = decode_text(data, path, max_chars)
            good.append(Checked(path, label, text_sha256(text), len(text), len(text.split()),
                                group=group_of(path, data, group_by), truncated=cut))
        except TextError as e:
            bad.append({"path": path, "reason": e.reason, "detail": e.detail})
        except OSError as e:
            bad.append({"path": path, "reason": "unreadable", "detail": f"{path}: {e}"})
    return good, bad


def group_of(path: str, data: bytes, rule: str) -> str:
    """The sha256 naming the group an image splits with: its DICOM patient (PatientID, else StudyInstanceUID) for
    "patient", the regex's first group (else its whole match) in the path for a pattern; "" for none or no match.
    A hash, so that no patient identifier is ever written down."""
    if rule == "none":
        return ""
    if rule == "patient":
        from tlops import dicom

        return (dicom.patient_key(data) or "") if dicom.is_dicom(data, path) else ""
    m = re.search(rule, path)
    if m is None:
        return ""
    return sha256_bytes(f"path:{m.group(1) if m.groups() else m.group(0)}".encode())


def deduplicate(images: list[Checked]) -> tuple[list[Checked], list[dict], list[dict]]:
    """Keep one copy (the first path) of each picture, by decoded pixels; copies under different labels are all
    rejected. Byte-identical files are the simplest case; the same picture saved as PNG and BMP is another."""
    by_pixels: dict[str, list[Checked]] = defaultdict(list)
    for img in images:
        by_pixels[img.pixels or img.sha256].append(img)
    kept, duplicates, conflicting = [], [], []
    for sha, group in by_pixels.items():
        group.sort(key=lambda c: c.path)
        labels = sorted({c.label for c in group})
        if len(labels) > 1:
            conflicting += [{"path": c.path, "reason": "conflicting_labels",
                             "detail": f"the same image is filed under classes {labels}: "
                                       f"{', '.join(o.path for o in group)}"} for c in group]
            continue
        kept.append(group[0])
        if len(group) > 1:
            duplicates.append({"sha256": group[0].sha256, "pixels_sha256": sha, "label": labels[0],
                               "kept": group[0].path, "dropped": [c.path for c in group[1:]]})
    return kept, sorted(duplicates, key=lambda d: d["kept"]), conflicting


# Below this short side a perceptual hash (computed at 32x32) says too little: two different 8x8 digits often
# hash within a few bits. A pair is compared by hash only when at least one of the two images reaches it.
PHASH_MIN_SIDE = 32
THUMBNAIL = 16
LARGE_GROUP = 50  # a near-duplicate group larger than this (and than 5% of the images) is reported


def near_duplicate_groups(images: list[Checked], near: NearDuplicateParams | None) -> list[list[Checked]]:
    """Groups (two or more, each sorted by path) of pictures that are near-duplicates, linked transitively:
    perceptual hashes within near.phash_bits bits, or grey thumbnails within near.thumbnail_grey levels on average.
    Re-encoded, resized and lightly edited copies of one picture end up in one group. None: no grouping."""
    if near is None or len(images) < 2:
        return []
    parent = list(range(len(images)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def big_enough(i: int, j: int) -> bool:
        return max(min(images[k].width, images[k].height) for k in (i, j)) >= PHASH_MIN_SIDE

    pairs = {p for p in _close_pairs([c.phash for c in images], near.phash_bits) if big_enough(*p)}
    thumbs = np.stack([np.frombuffer(c.thumbnail, np.uint8) for c in images]).astype(np.float32)
    for i, j in pairs | _close_thumbnails(thumbs, near.thumbnail_grey):
        parent[root(i)] = root(j)
    members: dict[int, list[Checked]] = defaultdict(list)
    for i, c in enumerate(images):
        members[root(i)].append(c)
    return sorted((sorted(g, key=lambda c: c.path) for g in members.values() if len(g) > 1), key=lambda g: g[0].path)


def _close_thumbnails(thumbs: np.ndarray, max_grey: float) -> set[tuple[int, int]]:
    """Index pairs whose thumbnails differ by <= max_grey on average. Two thumbnails' mean levels differ by no more
    than that, so after sorting by mean level each one is compared only with a narrow window of others."""
    means = thumbs.mean(axis=1)
    order = np.argsort(means, kind="stable")
    sorted_means = means[order]
    pairs = set()
    for pos, i in enumerate(order):
        end = int(np.searchsorted(sorted_means, sorted_means[pos] + max_grey, side="right"))
        others = order[pos + 1 : end]
        if len(others):
            close = others[np.abs(thumbs[others] - thumbs[i]).mean(axis=1) <= max_grey]
            pairs |= {(min(int(i), int(j)), max(int(i), int(j))) for j in close}
    return pairs


def _close_pairs(hashes: list[int], max_bits: int) -> set[tuple[int, int]]:
    """Index pairs of 64-bit hashes within max_bits of each other (Hamming), without comparing every pair.

    Pigeonhole: cut the 64 bits into max_bits + 1 chunks; two hashes that differ in at most max_bits bits agree
    on at least one whole chunk, so only hashes sharing a chunk value are compared.
    """
    chunks = max_bits + 1
    bounds = [round(k * 64 / chunks) for k in range(chunks + 1)]
    pairs: set[tuple[int, int]] = set()
    for k in range(chunks):
        width, shift = bounds[k + 1] - bounds[k], bounds[k]
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, h in enumerate(hashes):
            buckets[(h >> shift) & ((1 << width) - 1)].append(i)
        for idx in buckets.values():
            for x, i in enumerate(idx):
                for j in idx[x + 1:]:
                    if (i, j) not in pairs and bin(hashes[i] ^ hashes[j]).count("1") <= max_bits:
                        pairs.add((i, j))
    return pairs


def same_classes(*class_lists: list[str]) -> list[str]:
    """The class list shared by the manifest and every model trained on it; DataError if they differ."""
    first = list(class_lists[0])
    for other in class_lists[1:]:
        if list(other) != first:
            raise DataError(f"class lists differ: manifest has {first}, a model was trained on {list(other)}; "
                            "rerun train_head and finetune on this data")
    return first


def check_classes(kept: list[Checked], label_of: dict[str, str], quarantined: list[dict], min_per_class: int,
                  raw_dir: Path) -> None:
    """DataError unless there are >= 2 classes, each with at least min_per_class valid images."""
    valid = Counter(c.label for c in kept)
    if len(valid) < 2:
        found = ", ".join(sorted(valid)) or "none"
        raise DataError(f"{raw_dir}: {len(valid)} class(es) with valid images ({found}); a classifier needs "
                        f"at least 2 class folders {raw_dir}/<class>/<image>")
    bad = Counter(label_of[q["path"]] for q in quarantined if q["path"] in label_of)
    small = [f"class {label!r} has {valid[label]} valid image(s) ({bad[label]} quarantined)"
             for label in sorted(set(label_of.values())) if valid[label] < min_per_class]
    if small:
        raise DataError(f"{raw_dir}: {'; '.join(small)}; data.min_per_class is {min_per_class}")


def split_of(sha256: str, params: DataParams) -> str:
    """train, val or test, decided by the image's content hash alone.

    Why a per-image threshold: a split that depends on any other image (e.g. ranking a class by hash) moves
    images when one is added. Stable means split(x) is a function of x alone, so no rule can promise every
    class a val and a test image (three images of a class may all hash to train); instead each class is
    split independently at the same fractions, i.e. stratified in expectation, and data_report warns about
    any class left without an image in some split. Copies of one content share its hash, hence its split.
    """
    u = int(sha256_bytes(f"{params.split_salt}:{sha256}".encode())[:16], 16) / 2**64
    if u < params.test_fraction:
        return "test"
    if u < params.test_fraction + params.val_fraction:
        return "val"
    return "train"


def check_splits(rows: list[ManifestRow], params: DataParams) -> None:
    """DataError if a whole split is empty: later stages need images in train, val and test."""
    counts = Counter(r.split for r in rows)
    empty = [s for s in SPLITS if counts[s] == 0]
    if empty:
        raise DataError(f"no image fell into the {'/'.join(empty)} split ({len(rows)} valid images, "
                        f"data.val_fraction={params.val_fraction}, data.test_fraction={params.test_fraction}); "
                        "add images or raise the fractions")


def data_report(rows: list[ManifestRow], quarantined: list[dict], duplicates: list[dict],
                groups: list[list[Checked]] = (), imbalance_threshold: float = 3.0,
                split_groups: dict[str, Any] | None = None) -> dict:
    """reports/data.json: counts per class and split, totals, quarantined files, duplicates and near-duplicates."""
    per_class: dict[str, dict[str, int]] = {}
    for r in rows:
        counts = per_class.setdefault(r.label, dict.fromkeys((*SPLITS, "total"), 0))
        counts[r.split] += 1
        counts["total"] += 1
    warnings = [f"class {label!r} has no {s} image" for label, c in sorted(per_class.items())
                for s in SPLITS if c[s] == 0]
    split_of_path = {r.path: r.split for r in rows}
    near = [{"split": split_of_path[g[0].path], "labels": sorted({c.label for c in g}), "paths": [c.path for c in g]}
            for g in groups]
    warnings += [f"near-duplicate pictures filed under different classes {n['labels']}: {', '.join(n['paths'])}"
                 for n in near if len(n["labels"]) > 1]
    # Groups link transitively: a chain of small steps can join many pictures, all of which then share one split.
    warnings += [f"a near-duplicate group of {len(n['paths'])} pictures (from {n['paths'][0]}) shares one split; "
                 "if they are not copies of one picture, lower data.near_duplicates' thresholds"
                 for n in near if len(n["paths"]) > max(LARGE_GROUP, len(rows) // 20)]
    ratio = imbalance_ratio([r.label for r in rows if r.split == "train"], sorted(per_class))
    if ratio > imbalance_threshold:
        warnings.append(f"imbalanced: the largest class has {ratio:.1f}x the training images of the smallest "
                        f"(over data.imbalance_ratio = {imbalance_threshold:g}): class-weighted losses, selection by "
                        "balanced accuracy (evaluate.metric auto)")
    for w in warnings:
        log.warning("prepare: %s", w)
    totals = {"imbalance_ratio": round(ratio, 3), "imbalanced": ratio > imbalance_threshold,
              "images": len(rows), "classes": len(per_class),
              **{s: sum(1 for r in rows if r.split == s) for s in SPLITS},
              "quarantined": len(quarantined), "duplicates_dropped": sum(len(d["dropped"]) for d in duplicates),
              "near_duplicate_groups": len(near), "near_duplicate_images": sum(len(n["paths"]) for n in near)}
    report = {"totals": totals, "classes": dict(sorted(per_class.items())), "quarantined": quarantined,
              "duplicates": duplicates, "near_duplicates": near, "warnings": warnings}
    if split_groups is not None:
        report["groups"] = split_groups
    return report


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


# ---------------------------------------------------------------- data version

DATA_VERSION_ENV = "TLOPS_DATA_VERSION"  # "<version> <absolute data/raw>": this run's data version, once known


def data_version(root: Path = Path("."), folder: Path = paths.RAW) -> str:
    """THE data version: DVC's hash of data/raw, the `md5` ("<hex>.dir") that dvc.lock records for it.

    Hashed from the workspace through DVC's state cache, so a repeat call only stats the files. A run needs it
    once: stages ask current_data_version(), which hashes only when nobody in this run has yet.
    """
    from dvc_data.hashfile.build import build

    raw = Path(root).resolve() / folder
    if not raw.is_dir():
        stage = "ingest_target" if Path(folder) == paths.TARGET else "ingest"
        raise DataError(f"{raw} does not exist; run the {stage} stage first (dvc repro {stage})")
    repo = _open_dvc_repo(Path(root))
    if repo is None:  # not a DVC repo: same hash, no state cache
        from dvc_data.hashfile.db import HashFileDB
        from dvc_objects.fs.local import LocalFileSystem
        from dvc_objects.fs.memory import MemoryFileSystem

        _, _, obj = build(HashFileDB(MemoryFileSystem(), "/staging"), str(raw), LocalFileSystem(), "md5",
                          dry_run=True)
        return obj.hash_info.value
    with repo:
        _, _, obj = build(repo.cache.local, str(raw), repo.fs, "md5", ignore=repo.dvcignore, dry_run=True)
    return obj.hash_info.value


def current_data_version(root: Path = Path(".")) -> str:
    """This run's data version: the one already known (see remember_data_version), else data_version() once."""
    version = known_data_version(root)
    if version is None:
        version = data_version(root)
        remember_data_version(version, root)
    return version


def known_data_version(root: Path = Path(".")) -> str | None:
    """The data version of root's data/raw already known to this run (no hashing), else None."""
    version, _, raw = os.environ.get(DATA_VERSION_ENV, "").partition(" ")
    return version if version and raw == str(Path(root).resolve() / paths.RAW) else None


def remember_data_version(version: str, root: Path = Path(".")) -> None:
    """Record the data version for the rest of this run, including the stage processes it starts."""
    os.environ[DATA_VERSION_ENV] = f"{version} {Path(root).resolve() / paths.RAW}"


def forget_data_version() -> None:
    """data/raw is about to change: a version recorded earlier in this run no longer holds."""
    os.environ.pop(DATA_VERSION_ENV, None)


def _open_dvc_repo(root: Path):
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(str(root))
    except NotDvcRepoError:
        return None
