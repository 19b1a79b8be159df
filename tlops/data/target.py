"""The target domain's manifest (data/prepared/target.csv): its adapt and test splits, the labelled items it can be
scored on."""

from __future__ import annotations

from pathlib import Path

from tlops.core import paths
from tlops.core.config import Params
from tlops.core.errors import DataError
from tlops.core.io import sha256_bytes
from tlops.data.manifest import Manifest, ManifestRow, parse_manifest

TARGET_SPLITS = ("adapt", "test")
UNLABELLED = ""


def label_of(file: Path, root: Path) -> str:
    """The class folder a target file sits in, else UNLABELLED (a flat folder)."""
    rel = file.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else UNLABELLED


def target_split(key: str, label: str, params: Params) -> str:
    """adapt or test, by the content hash alone; only a labelled image can be held out for testing."""
    if label == UNLABELLED:
        return "adapt"
    u = int(sha256_bytes(f"{params.data.split_salt}:target:{key}".encode())[:16], 16) / 2**64
    return "test" if u < params.adapt.test_fraction else "adapt"


def load_target(path: Path = paths.TARGET_MANIFEST) -> list[ManifestRow]:
    """The target manifest's rows; DataError when the ingest_target stage has not run."""
    try:
        return parse_manifest(Path(path).read_text(encoding="utf-8"), path)
    except FileNotFoundError:
        raise DataError(f"{path} not found; run the ingest_target stage first (dvc repro ingest_target)") from None


def adapt_paths(rows: list[ManifestRow]) -> list[str]:
    """The images adaptation may use: the adapt split, without labels (only paths leave this function), in content
    order: the folder an image sits in (its label) must not even decide when it is seen."""
    return [r.path for r in sorted((r for r in rows if r.split == "adapt"), key=lambda r: (r.sha256, r.path))]


def scored_items(rows: list[ManifestRow], classes: list[str]) -> tuple[list[str], list[int], list[str]]:
    """(paths, class indices, unknown labels) of the labelled test split; labels outside `classes` are left out."""
    known = {c: i for i, c in enumerate(classes)}
    test = [r for r in rows if r.split == "test" and r.label != UNLABELLED]
    unknown = sorted({r.label for r in test if r.label not in known})
    kept = [r for r in test if r.label in known]
    return [r.path for r in kept], [known[r.label] for r in kept], unknown


def gate_split(manifest: Manifest, path: Path = paths.TARGET_MANIFEST) -> tuple[list[str], list[str], str] | None:
    """(images, true class names, "target test") of the target domain's labelled test split, the data the model will
    meet, for the promotion gate; None without one (the gate then uses the source test split)."""
    if Path(path).exists():
        test_paths, test_y, _ = scored_items(load_target(path), list(manifest.classes))
        if test_paths:
            return test_paths, [manifest.classes[c] for c in test_y], "target test"
    return None
