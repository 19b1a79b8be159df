"""The prepare stage's work: validate, de-duplicate, split, write the manifest and reports/data.json."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlops.core.config import DataParams
from tlops.core.errors import DataError
from tlops.core.io import write_json
from tlops.data.duplicates import LARGE_GROUP, deduplicate, near_duplicate_groups
from tlops.data.manifest import SPLITS, ManifestRow, write_manifest
from tlops.data.split import check_splits, group_counts, split_keys, split_of
from tlops.data.validate import Checked, check_classes, check_images, check_texts, find_candidates, original_paths
from tlops.evaluate.scoring import imbalance_ratio
from tlops.inputs.intensity import Intensity

log = logging.getLogger(__name__)


def prepare_data(raw_dir: Path, params: DataParams, manifest_path: Path, report_path: Path) -> dict:
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
