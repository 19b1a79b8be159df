"""The ingest_target stage's work: adapt.target copied into data/target, validated like the source, split into adapt and
test."""

from __future__ import annotations

from pathlib import Path

from tlops.core import paths
from tlops.core.config import Params
from tlops.core.errors import ConfigError, DataError
from tlops.core.folders import replaced_dir, visible_files
from tlops.core.io import write_json
from tlops.data.manifest import write_manifest
from tlops.data.prepare import validate
from tlops.data.sources import copy_folder
from tlops.data.target import TARGET_SPLITS, UNLABELLED, label_of, target_split
from tlops.data.validate import original_paths


EMPTY_MARKER = ".no-target"


def ingest_target_folder(params: Params, out_dir: Path = paths.TARGET, manifest_path: Path = paths.TARGET_MANIFEST,
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
        else:  # hidden, so no stage reads it; it spares DVC's "is empty" warning for a target that is absent on purpose
            (tmp / EMPTY_MARKER).write_text("adapt.target is null: no target domain in this run\n")
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
