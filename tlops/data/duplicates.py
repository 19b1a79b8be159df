"""Exact duplicates (by content) and near duplicates (perceptual hash and thumbnail) of the validated images."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from tlops.core.config import NearDuplicateParams
from tlops.data.validate import Checked


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
