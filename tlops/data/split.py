"""The stable split: an item's split is a function of its content (or its group's), so no item ever changes split as
data grows."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from tlops.core.config import DataParams
from tlops.core.errors import DataError
from tlops.core.io import sha256_bytes
from tlops.data.manifest import SPLITS, ManifestRow
from tlops.data.validate import Checked


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
