"""The label audit: out-of-fold head probabilities from the cached features, confident learning on them, and what
`data.label_issues: drop` leaves out of training."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import deep_update, make_images, make_workspace, run_stage_tasks, write_params

from tlops.core import paths
from tlops.core.config import parse_params
from tlops.core.errors import DataError
from tlops.features.dataset import FeatureDataset, load_feature_dataset
from tlops.training.label_audit import find_suspects, folds_for


def noisy_features(n_per_class: int = 60, classes: int = 4, flip: float = 0.05, views: int = 1, seed: int = 0
                   ) -> tuple[FeatureDataset, set[str]]:
    """Separable Gaussian features (what a good backbone gives), 70/15/15 split, `flip` of the training labels
    changed to another class; returns the dataset and the paths of the flipped items."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 32)) * 2.5
    rows = []
    for c in range(classes):
        for i in range(n_per_class):
            split = "train" if i < 0.7 * n_per_class else "val" if i < 0.85 * n_per_class else "test"
            rows.append((f"data/raw/{c}/{i:03d}.png", c, split))
    train = [k for k, r in enumerate(rows) if r[2] == "train"]
    flipped = set(rng.choice(train, int(round(flip * len(train))), replace=False).tolist())
    feats, labels, splits, vws, names = [], [], [], [], []
    for k, (path, c, split) in enumerate(rows):
        given = (c + int(rng.integers(1, classes))) % classes if k in flipped else c
        x = centres[c] + rng.normal(size=32)
        for v in range(views if split == "train" else 1):
            feats.append(x + (rng.normal(scale=0.3, size=32) if v else 0))
            labels.append(given)
            splits.append(split)
            vws.append(v)
            names.append(path)
    ds = FeatureDataset(np.array(feats, np.float32), np.array(labels), np.array(splits), np.array(names),
                        np.array(vws), np.array(names), [str(c) for c in range(classes)], {})
    return ds, {rows[k][0] for k in flipped}


def params(**over):
    base = {"head": {"epochs": 30, "lrs": [0.01], "weight_decays": [0.0001], "patience": 5}, "audit": {"folds": 5}}
    return parse_params(deep_update(base, over))


def test_flipped_labels_are_found_with_precision_and_recall(tmp_path):
    ds, flipped = noisy_features(views=3)  # augmented views stay in their item's fold
    suspects, summary = find_suspects(ds, params())
    found = {s.path for s in suspects if s.split == "train"}
    precision, recall = len(found & flipped) / len(found), len(found & flipped) / len(flipped)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall, len(found), len(flipped))
    first = next(s for s in suspects if s.path in flipped)
    assert first.given != first.suggested and first.score < 0.5
    assert summary["flagged"]["train"] == len(found) and summary["rank_by"] == "self_confidence"
    scores = [s.score for s in suspects if s.split == "train"]
    assert scores == sorted(scores)  # most suspicious first
    again, _ = find_suspects(ds, params())
    assert again == suspects  # seeded folds: the same flags every run


def test_a_feature_scale_or_offset_changes_no_flag():
    """The features are standardised on the training rows (folded into the heads): a backbone whose features are
    100x larger, or shifted, gets the same flags and scores."""
    ds, _ = noisy_features(views=3)
    suspects, _ = find_suspects(ds, params())
    scale = np.random.default_rng(1).uniform(0.5, 100, ds.features.shape[1]).astype(np.float32)
    moved = FeatureDataset(ds.features * scale + 7, ds.labels, ds.splits, ds.sha256, ds.views, ds.paths, ds.classes,
                           ds.meta)
    again, _ = find_suspects(moved, params())
    assert [(s.path, s.suggested) for s in again] == [(s.path, s.suggested) for s in suspects]
    np.testing.assert_allclose([s.score for s in again], [s.score for s in suspects], atol=1e-4)


def test_clean_labels_raise_a_handful_at_most():
    ds, _ = noisy_features(flip=0.0)
    suspects, _ = find_suspects(ds, params())
    assert sum(s.split == "train" for s in suspects) <= 3


def test_the_audit_and_its_pictures_import_no_torch():
    """The stage may cost a tenth of the features stage: importing torch alone took 1.6 s of it."""
    code = ("import sys, tasks.audit, tlops.training.label_audit, tlops.evaluate.plots; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout


def test_item_means_keep_the_features_dtype():
    from tlops.training.label_audit import _item_means

    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    means = _item_means(x, np.array([0, 3, 4]))  # items at rows 0 (3 views), 3, 4 (2 views)
    assert means.dtype == np.float32
    np.testing.assert_allclose(means, [[2, 3], [6, 7], [9, 10]])


def test_folds_shrink_to_the_smallest_class_and_refuse_a_single_item():
    assert folds_for(np.array([0] * 10 + [1] * 3), 2, 5) == 3
    with pytest.raises(DataError, match="at least 2 training items"):
        folds_for(np.array([0] * 10 + [1]), 2, 5)


def test_the_stage_finds_files_filed_under_the_wrong_class_and_drop_leaves_them_out(tmp_path, mlflow_store,
                                                                                     monkeypatch):
    from tlops.data.label_issues import dropped_items
    from tlops.data.manifest import load_manifest

    images = tmp_path / "images"
    make_images(images, classes=3, per_class=24, size=32)
    ws = make_workspace(tmp_path / "ws")
    write_params(ws, {"data": {"source": "imagefolder", "path": str(images), "near_duplicates": None}})
    run_stage_tasks(ws, ("ingest", "prepare"), mlflow_store, "audit")  # the clean split, to flip training items
    monkeypatch.chdir(ws)
    train = sorted(r.path for r in load_manifest(paths.MANIFEST).rows_in("train"))
    flipped = {train[0], train[-1]}  # a class_0 and a class_2 item, each moved to class_1's folder
    for path in flipped:
        name = Path(path).name
        (images / Path(path).parent.name / name).rename(images / "class_1" / f"moved_{name}")
    run_stage_tasks(ws, ("ingest", "prepare", "features", "audit"), mlflow_store, "audit")

    with open(paths.LABEL_ISSUES, newline="") as f:
        header, *body = list(csv.reader(f))
    rows = [dict(zip(header, r, strict=True)) for r in body]
    assert header == ["rank", "path", "split", "given", "suggested", "score", "dropped"]
    moved = {r["path"] for r in rows if r["split"] == "train" and "moved_" in r["path"]}
    assert len(moved) == 2 and all(r["given"] == "class_1" and r["suggested"] != "class_1"
                                   for r in rows if r["path"] in moved)
    audit = json.loads(paths.LABEL_AUDIT.read_text())
    assert audit["mode"] == "report" and audit["flagged"]["train"] == sum(r["split"] == "train" for r in rows)
    assert dropped_items() == set() and (paths.LABEL_ISSUES_DIR / "grid.png").stat().st_size > 0
    assert "moved_" in (paths.LABEL_ISSUES_DIR / "suspects.md").read_text()

    raw = yaml.safe_load(open("params.yaml"))
    yaml.safe_dump(deep_update(raw, {"data": {"label_issues": "drop"}}), open("params.yaml", "w"))
    run_stage_tasks(ws, ("audit",), mlflow_store, "audit")
    dropped = dropped_items()
    assert moved <= dropped and all(p.startswith("data/raw/") for p in dropped)
    ds = load_feature_dataset(paths.FEATURES_DATASET)
    kept = ds.without_training(dropped)
    assert not set(map(str, kept.paths[kept.splits == "train"])) & dropped  # views too
    assert (kept.splits != "train").sum() == (ds.splits != "train").sum()  # val and test untouched
    manifest = load_manifest(paths.MANIFEST)
    kept_rows = manifest.without_training(dropped_items()).rows
    assert {r.path for r in kept_rows} == {r.path for r in manifest.rows} - dropped
    assert all((ws / p).exists() for p in dropped)  # never out of data/raw
