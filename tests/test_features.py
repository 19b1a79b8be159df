"""The features stage: frozen extraction, the content-addressed cache, augmented views, both engines."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, TINY, deep_update, make_images

from tlops.core import paths
from tlops.core.config import Params, parse_params
from tlops.core.errors import DataError
from tlops.data import manifest
from tlops.data.prepare import prepare_data
from tlops.features.dataset import load_feature_dataset
from tlops.features.extract import extract_features, extract_with, extractor_id, feature_key
from tlops.models.backbones import create_backbone


def tiny_params(**over) -> Params:
    return parse_params(deep_update(deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), over))


def prepare(params: Params) -> manifest.Manifest:
    prepare_data(paths.RAW, params.data, paths.MANIFEST, paths.DATA_REPORT)
    return manifest.load_manifest(paths.MANIFEST)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root with 3 classes x 6 generated images and their manifest."""
    monkeypatch.chdir(tmp_path)
    make_images(paths.RAW, classes=3, per_class=6)
    return tmp_path


def extract(params: Params, out: str = "features", **kw) -> dict:
    return extract_features(manifest.load_manifest(paths.MANIFEST), params, Path(out), progress=False, **kw)


def test_features_have_one_float32_row_per_image_in_manifest_order(project):
    params = tiny_params()
    manifest = prepare(params)
    stats = extract(params)
    ds = load_feature_dataset(Path("features/dataset.npz"))
    n = len(manifest.rows)
    assert stats["extracted"] == stats["total"] == n and stats["cached"] == 0
    assert ds.features.shape == (n, 32) and ds.features.dtype == np.float32 and np.isfinite(ds.features).all()
    assert ds.labels.dtype == np.int64 and list(ds.sha256) == [r.sha256 for r in manifest.rows]
    assert list(ds.splits) == [r.split for r in manifest.rows] and not ds.views.any()
    assert ds.classes == manifest.classes and ds.meta["backbone"] == "tiny_test"
    assert ds.meta["spec"]["input_size"] == 32
    X, y = ds.split("val")
    assert len(X) == len(y) == sum(r.split == "val" for r in manifest.rows)


def test_extraction_is_deterministic(project):
    params = tiny_params()
    prepare(params)
    extract(params, "a")
    extract(params, "b")
    a, b = (load_feature_dataset(Path(d) / "dataset.npz").features for d in "ab")
    assert np.array_equal(a, b)


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_extraction_leaves_the_backbone_untouched(project, engine):
    params = tiny_params()
    manifest = prepare(params)
    bb = create_backbone("tiny_test", weights="random", image_size=32)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    stats = extract_with(bb, manifest, params, Path("features"), progress=False, engine=engine)
    assert stats["engine"] == engine and not bb.model.training
    after = bb.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running stats included
    assert all(p.is_contiguous() for p in bb.model.parameters())  # channels_last was applied to a copy


def test_both_engines_give_the_same_features(project):
    params = tiny_params()
    prepare(params)
    extract(params, "t", engine="torch")
    extract(params, "o", engine="onnxruntime")
    t, o = (load_feature_dataset(Path(d) / "dataset.npz").features for d in "to")
    np.testing.assert_allclose(o, t, atol=1e-5, rtol=1e-4)


def test_a_grown_dataset_extracts_only_the_new_images(project):
    params = tiny_params()
    prepare(params)
    first = extract(params)
    old = load_feature_dataset()
    for i, src in enumerate(make_images(project / "more", classes=1, per_class=3, seed=7)):
        shutil.copy(src, paths.RAW / "class_0" / f"new_{i}.png")
    prepare(params)
    second = extract(params)
    new = load_feature_dataset()
    assert second["extracted"] == 3 and second["cached"] == first["total"] == len(old.sha256)
    assert second["total"] == first["total"] + 3
    rows = {s: i for i, s in enumerate(new.sha256)}
    for i, sha in enumerate(old.sha256):
        assert np.array_equal(new.features[rows[sha]], old.features[i])  # bit-identical cached rows
    assert len(list(Path("features/cache").glob("*.npz"))) == 2  # one shard per extracting run
    assert extract(params)["extracted"] == 0


def test_cache_key_changes_with_backbone_weights_spec_and_view():
    bb = create_backbone("tiny_test", weights="random")
    base = extractor_id(bb, bb.spec)
    image = "ab" * 32
    key = feature_key(base, image)
    again = create_backbone("tiny_test", weights="random")
    assert key == feature_key(extractor_id(again, again.spec), image)
    big = create_backbone("tiny_test", weights="random", image_size=40)
    bigger = extractor_id(big, big.spec)
    for other in ({**base, "backbone": "resnet18"}, {**base, "weights_id": "0" * 64}, bigger):
        assert feature_key(other, image) != key
    assert feature_key(base, image, view=1, augment={"hflip": True}) != key
    assert feature_key(base, image, 1, {"hflip": True}) != feature_key(base, image, 1, {"hflip": False})


def test_another_image_size_extracts_everything_again(project):
    prepare(tiny_params())
    first = extract(tiny_params())
    assert extract(tiny_params(model={"image_size": 40}))["extracted"] == first["total"]


def test_augmented_views_are_train_only_distinct_and_cached(project):
    params = tiny_params(features={"augment_views": 2}, finetune={"augment": {"hflip": True}})
    manifest = prepare(params)
    stats = extract(params)
    ds = load_feature_dataset()
    n_train = sum(r.split == "train" for r in manifest.rows)
    assert stats["total"] == len(manifest.rows) + 2 * n_train
    assert set(ds.views[ds.splits != "train"]) == {0} and set(ds.views[ds.splits == "train"]) == {0, 1, 2}
    assert len(ds.split("train")[0]) == 3 * n_train
    assert len(ds.split("test")[0]) == sum(r.split == "test" for r in manifest.rows)
    first = ds.sha256 == ds.sha256[np.flatnonzero(ds.splits == "train")[0]]
    assert len({ds.features[i].tobytes() for i in np.flatnonzero(first)}) == 3
    assert extract(params)["extracted"] == 0


def test_a_missing_image_file_names_the_file(project):
    params = tiny_params()
    manifest = prepare(params)
    Path(manifest.rows[0].path).unlink()
    with pytest.raises(DataError, match=manifest.rows[0].path):
        extract(params)


def test_missing_dataset_file_says_which_stage_to_run(tmp_path):
    with pytest.raises(DataError, match="features stage"):
        load_feature_dataset(tmp_path / "dataset.npz")


def test_features_task_writes_the_dataset_and_returns_its_stats(project):
    from conftest import write_params

    from tasks.features import features

    write_params(project)
    prepare(tiny_params())
    stats = features.fn()
    assert stats["extracted"] == stats["total"] > 0 and stats["backbone"] == "tiny_test"
    assert Path(paths.FEATURES_DATASET).is_file()
    assert features.fn()["cached"] == stats["total"]


def test_a_lost_image_store_is_filled_again_though_every_feature_was_cached(project):
    params = tiny_params()
    manifest = prepare(params)
    first = extract(params)
    shutil.rmtree("features/images")
    again = extract(params)
    assert again["extracted"] == 0 and again["decoded"] == len(manifest.rows) == first["decoded"]
    assert extract(params)["decoded"] == 0
