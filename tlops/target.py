"""The target domain: adapt.target materialised as data/target, validated like the source, split adapt | test.

    ingest_target(params)   # data/target (DVC-tracked), data/prepared/target.csv, reports/target.json

The images the model will meet carry no labels in general. A target folder may be flat (no labels) or hold
<class>/ folders named like the source's classes: those labels are for scoring only. A labelled image goes, by its
content hash alone (so it never moves as the folder grows), to `test` (scored, never trained on) or `adapt` (used
without its label); an unlabelled one always goes to `adapt`.
"""

from __future__ import annotations

from pathlib import Path

from tlops import paths
from tlops.config import Params
from tlops.data import (
    Manifest,
    ManifestRow,
    copy_folder,
    original_paths,
    parse_manifest,
    replaced_dir,
    validate,
    visible_files,
    write_manifest,
)
from tlops.errors import ConfigError, DataError
from tlops.io import sha256_bytes, write_json

TARGET_SPLITS = ("adapt", "test")
UNLABELLED = ""


def ingest_target(params: Params, out_dir: Path = paths.TARGET, manifest_path: Path = paths.TARGET_MANIFEST,
                  report_path: Path = paths.TARGET_REPORT) -> dict:
    """Copy adapt.target into out_dir (an empty folder when it is null), validate it and split it; return the report."""
    src = Path(params.adapt.target) if params.adapt.target else None
    if src is not None:
        if not src.is_dir():
            raise DataError(f"adapt.target {src} is not a folder (flat, or <class>/<image> with labels for scoring)")
        if src.resolve() == Path(out_dir).resolve() or Path(out_dir).resolve() in src.resolve().parents:
            raise ConfigError(f"adapt.target {src} is inside {out_dir}, which ingest_target replaces; point it "
                              "elsewhere")
    with replaced_dir(Path(out_dir)) as tmp:
        if src is not None:
            copy_folder(src, tmp)
    candidates = [(f.as_posix(), label_of(f, Path(out_dir))) for f in visible_files(Path(out_dir))]
    checked = validate(candidates, [], params.data, original_paths(Path(out_dir)))
    rows = checked.rows(lambda key, label: target_split(key, label, params))
    report = {"target": str(src) if src else None, "totals": {
        "images": len(rows), **{s: sum(r.split == s for r in rows) for s in TARGET_SPLITS},
        "labelled": sum(r.label != UNLABELLED for r in rows), "quarantined": len(checked.quarantined),
        "duplicates_dropped": sum(len(d["dropped"]) for d in checked.duplicates)},
        "classes": sorted({r.label for r in rows if r.label != UNLABELLED}),
        "quarantined": checked.quarantined, "duplicates": checked.duplicates}
    write_manifest(manifest_path, rows)
    write_json(report_path, report)
    return report


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
