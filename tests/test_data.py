"""tlops.data: sources, quarantine of bad files, RGB normalisation, duplicates, the stable split, the manifest."""

from __future__ import annotations

import csv
import json
import shutil
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import make_images, make_messy_images
from PIL import Image

from tlops.core.config import DataParams, NearDuplicateParams
from tlops.core.errors import ConfigError, DataError
from tlops.core.io import sha256_file
from tlops.data import duplicates, manifest, prepare, sources, split, validate, version
from tlops.inputs.images import load_image


def params(**over) -> DataParams:
    base = {"source": "imagefolder", "path": "src", "min_per_class": 2, "val_fraction": 0.25, "test_fraction": 0.25}
    return DataParams(**{**base, **over})


def run_prepare(raw: Path = Path("raw"), **over) -> dict:
    return prepare.prepare_data(raw, params(**over), Path("prepared/manifest.csv"), Path("reports/data.json"))


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def messy(here: Path) -> dict:
    """raw/ holds the acceptance folder: 3 good classes, every bad-file kind, hidden files."""
    return make_messy_images(here / "raw")


def manifest_paths() -> list[str]:
    return [r.path for r in manifest.load_manifest(Path("prepared/manifest.csv")).rows]


def test_every_bad_file_is_quarantined_with_its_own_reason_and_every_good_one_reaches_the_manifest(messy):
    report = run_prepare()
    reasons = {q["path"]: q["reason"] for q in report["quarantined"]}
    assert reasons == {f"raw/{rel}": reason for rel, reason in messy["bad"].items()}
    assert len(set(reasons.values())) == len(reasons)  # distinct
    assert all(q["detail"] for q in report["quarantined"])
    assert manifest_paths() == [f"raw/{rel}" for rel in messy["good"]]
    assert json.loads(Path("reports/data.json").read_text()) == report


def test_hidden_files_and_folders_are_in_neither_the_manifest_nor_the_report(messy):
    run_prepare()
    text = Path("prepared/manifest.csv").read_text() + Path("reports/data.json").read_text()
    assert ".DS_Store" not in text and ".ipynb_checkpoints" not in text


def test_cmyk_16bit_rgba_and_palette_images_become_the_right_rgb(messy):
    run_prepare()
    rows = {r.path: r for r in manifest.load_manifest(Path("prepared/manifest.csv")).rows}
    expected = {"class_0/cmyk.jpg": (255, 0, 0), "class_0/gray16.png": (128, 128, 128),
                "class_1/rgba.png": (255, 255, 255), "class_1/palette.png": (0, 0, 255)}
    for rel, rgb in expected.items():
        assert f"raw/{rel}" in rows
        img = load_image(Path("raw") / rel, 10_000)
        assert img.mode == "RGB"
        assert np.abs(np.asarray(img, np.int16) - np.array(rgb)).max() <= 2, rel


def test_exif_orientation_is_applied_so_the_manifest_size_is_the_displayed_one(messy):
    run_prepare()
    row = next(r for r in manifest.load_manifest(Path("prepared/manifest.csv")).rows if r.path.endswith("exif_rotated.jpg"))
    assert (row.width, row.height) == (10, 20)  # stored 20x10 with "rotate 90"


def test_a_file_outside_any_class_folder_is_quarantined(here):
    make_images(here / "raw", classes=2, per_class=8)
    Image.new("RGB", (4, 4)).save(here / "raw" / "stray.png")
    report = run_prepare()
    assert [(q["path"], q["reason"]) for q in report["quarantined"]] == [("raw/stray.png", "no_class_folder")]


def test_adding_20_images_moves_no_existing_image_to_another_split(here):
    make_images(here / "raw", classes=3, per_class=8, seed=1)
    run_prepare()
    before = {r.path: r.split for r in manifest.load_manifest(Path("prepared/manifest.csv")).rows}
    extra = make_images(here / "more", classes=3, per_class=7, seed=2)[:20]
    for i, p in enumerate(extra):
        shutil.copy(p, here / "raw" / p.parent.name / f"new_{i:02d}.png")
    run_prepare()
    after = {r.path: r.split for r in manifest.load_manifest(Path("prepared/manifest.csv")).rows}
    assert len(after) == len(before) + 20
    assert {p: after[p] for p in before} == before


def test_split_depends_only_on_content_hash_and_salt_and_follows_the_fractions():
    p = params(val_fraction=0.2, test_fraction=0.1)
    hashes = [f"{i:064x}" for i in range(6000)]
    splits = [split.split_of(h, p) for h in hashes]
    assert splits == [split.split_of(h, p) for h in hashes]
    share = {s: splits.count(s) / len(splits) for s in manifest.SPLITS}
    assert share["test"] == pytest.approx(0.1, abs=0.02) and share["val"] == pytest.approx(0.2, abs=0.02)
    assert [split.split_of(h, params(val_fraction=0.2, test_fraction=0.1, split_salt="other")) for h in hashes] != splits


def test_duplicates_keep_one_row_never_straddle_splits_and_are_reported(here):
    make_images(here / "raw", classes=2, per_class=6)
    shutil.copy(here / "raw/class_0/img_000.png", here / "raw/class_0/copy_b.png")
    shutil.copy(here / "raw/class_0/img_000.png", here / "raw/class_0/copy_a.png")
    report = run_prepare()
    rows = manifest.load_manifest(Path("prepared/manifest.csv")).rows
    sha = sha256_file(here / "raw/class_0/img_000.png")
    assert [r.path for r in rows if r.sha256 == sha] == ["raw/class_0/copy_a.png"]  # lexicographically first
    [dup] = report["duplicates"]
    assert {k: v for k, v in dup.items() if k != "pixels_sha256"} == {
        "sha256": sha, "label": "class_0", "kept": "raw/class_0/copy_a.png",
        "dropped": ["raw/class_0/copy_b.png", "raw/class_0/img_000.png"]}
    assert report["totals"]["duplicates_dropped"] == 2
    assert len({r.sha256 for r in rows}) == len(rows)


def test_the_same_image_under_two_labels_is_quarantined_everywhere(here):
    make_images(here / "raw", classes=2, per_class=6)
    shutil.copy(here / "raw/class_0/img_001.png", here / "raw/class_1/looks_like_1.png")
    report = run_prepare()
    assert {(q["path"], q["reason"]) for q in report["quarantined"]} == {
        ("raw/class_0/img_001.png", "conflicting_labels"), ("raw/class_1/looks_like_1.png", "conflicting_labels")}
    assert not {"raw/class_0/img_001.png", "raw/class_1/looks_like_1.png"} & set(manifest_paths())


def test_fewer_than_two_classes_fails_naming_the_class(here):
    make_images(here / "raw", classes=1, per_class=6)
    with pytest.raises(DataError, match=r"1 class\(es\).*class_0.*at least 2"):
        run_prepare()


def test_a_class_below_min_per_class_fails_naming_the_class_and_its_counts(here):
    make_images(here / "raw", classes=3, per_class=6)
    for p in sorted((here / "raw/class_2").iterdir())[2:]:
        p.unlink()
    (here / "raw/class_2/broken.png").write_bytes(b"")
    expected = r"class 'class_2' has 2 valid image\(s\) \(1 quarantined\).*min_per_class is 3"
    with pytest.raises(DataError, match=expected):
        run_prepare(min_per_class=3)
    assert not Path("prepared/manifest.csv").exists()


def test_manifest_has_exact_columns_sorted_rows_and_loads_back(messy):
    report = run_prepare()
    with open("prepared/manifest.csv", newline="") as f:
        assert next(csv.reader(f)) == ["path", "label", "split", "sha256", "width", "height"]
    m = manifest.load_manifest(Path("prepared/manifest.csv"))
    assert [r.path for r in m.rows] == sorted(r.path for r in m.rows)
    assert m.classes == ["class_0", "class_1", "class_2"] and m.label_index("class_2") == 2
    assert sum(len(m.rows_in(s)) for s in manifest.SPLITS) == len(m.rows) == report["totals"]["images"]
    per_class = {c: sum(1 for r in m.rows if r.label == c) for c in m.classes}
    assert {c: v["total"] for c, v in report["classes"].items()} == per_class
    assert all(isinstance(r.width, int) and r.sha256 == sha256_file(r.path) for r in m.rows)


def test_missing_manifest_says_which_stage_to_run(here):
    with pytest.raises(DataError, match="prepare"):
        manifest.load_manifest(Path("nope.csv"))


# ---------------------------------------------------------------- ingest


def test_digits_ingest_writes_1797_pngs_in_10_class_folders_with_reproducible_bytes(here):
    from sklearn.datasets import load_digits

    summary = sources.ingest_source(DataParams(source="digits"), Path("data/raw"))
    assert summary == {"source": "digits", "images": 1797, "classes": 10}
    assert sorted(p.name for p in Path("data/raw").iterdir()) == [str(d) for d in range(10)]
    first = Path("data/raw/0/digit_00000.png")
    img = Image.open(first)
    assert (img.size, img.mode) == ((8, 8), "L")
    assert np.array_equal(np.asarray(img), np.rint(load_digits().images[0] * 255 / 16))  # 0..16 -> 0..255
    before = version.data_version(here)
    sources.ingest_source(DataParams(source="digits"), Path("data/raw"))
    assert version.data_version(here) == before
    assert not [p for p in Path("data").iterdir() if p.name != "raw"]  # no temp folders left behind


def test_imagefolder_ingest_copies_visible_files_byte_for_byte(messy, here):
    sources.ingest_source(params(path="raw"), Path("data/raw"))
    copied = sorted(p.relative_to("data/raw").as_posix() for p in Path("data/raw").rglob("*") if p.is_file())
    assert copied == sorted([*messy["good"], *messy["bad"]])
    assert all(sha256_file(Path("data/raw") / rel) == sha256_file(Path("raw") / rel) for rel in copied)


def test_a_failed_ingest_leaves_the_previous_data_in_place(here, monkeypatch):
    make_images(here / "src", classes=2, per_class=2)
    sources.ingest_source(params(), Path("data/raw"))
    before = sorted(Path("data/raw").rglob("*"))

    def half_copy(src: Path, dest: Path, *args: object) -> None:
        (dest / "partial.png").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(sources, "copy_folder", half_copy)
    with pytest.raises(OSError, match="disk full"):
        sources.ingest_source(params(), Path("data/raw"))
    assert sorted(Path("data/raw").rglob("*")) == before
    assert [p.name for p in Path("data").iterdir()] == ["raw"]


def test_unknown_torchvision_dataset_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"torchvision:FashonMNIST.*did you mean torchvision:FashionMNIST"):
        sources.ingest_source(DataParams(source="torchvision:FashonMNIST"), Path("unused"))


def _idx(magic: int, arr: np.ndarray) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in arr.shape) + arr.tobytes()


def test_torchvision_dataset_is_read_offline_from_a_local_root_into_class_name_folders(here):
    raw = here / "tv/FashionMNIST/raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 3), ("t10k", 2)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(0x803, rng.integers(0, 255, (n, 28, 28), np.uint8)))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(0x801, np.arange(n, dtype=np.uint8)))
    summary = sources.ingest_source(DataParams(source="torchvision:FashionMNIST", path="tv", download=False), Path("data/raw"))
    assert summary["images"] == 5
    files = sorted(p.relative_to("data/raw").as_posix() for p in Path("data/raw").rglob("*.png"))
    assert files == sorted(["T-shirt_top/train_000000.png", "Trouser/train_000001.png", "Pullover/train_000002.png",
                            "T-shirt_top/test_000000.png", "Trouser/test_000001.png"])


def test_missing_torchvision_root_offline_is_a_data_error_saying_what_to_set(here):
    with pytest.raises(DataError, match="data.download"):
        sources.ingest_source(DataParams(source="torchvision:FashionMNIST", path="nowhere"), Path("data/raw"))


def test_data_version_is_the_same_inside_and_outside_a_dvc_repo(workspace, tmp_path):
    make_images(workspace / "data/raw", classes=2, per_class=3)
    inside = version.data_version(workspace)
    outside = tmp_path / "plain"
    shutil.copytree(workspace / "data", outside / "data")
    assert version.data_version(outside) == inside
    assert inside.endswith(".dir")


def _same_pictures(folder: Path, n: int = 16, seed: int = 0) -> dict[str, int]:
    """n photo crops (two classes by source photo), each as PNG, BMP, TIFF and GIF (identical pixels), JPEG, WebP,
    a half-size copy and a JPEG re-encoded from the JPEG; returns {path relative to folder: picture index}."""
    from sklearn.datasets import load_sample_images

    photos, rng, where = load_sample_images().images, np.random.default_rng(seed), {}
    for k in range(n):
        photo = photos[k % 2]
        y, x = rng.integers(0, photo.shape[0] - 96), rng.integers(0, photo.shape[1] - 96)
        palette = Image.fromarray(photo[y:y + 96, x:x + 96]).quantize(200, dither=Image.Dither.NONE)  # GIF: lossless
        rgb, d = palette.convert("RGB"), folder / f"class_{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        for name, save in {f"p{k}.png": lambda p: rgb.save(p), f"p{k}.bmp": lambda p: rgb.save(p),
                           f"p{k}.tiff": lambda p: rgb.save(p), f"p{k}.gif": lambda p: palette.save(p),
                           f"p{k}.jpg": lambda p: rgb.save(p, quality=85), f"p{k}.webp": lambda p: rgb.save(p, quality=80),
                           f"p{k}_half.png": lambda p: rgb.resize((48, 48), Image.Resampling.LANCZOS).save(p)}.items():
            save(d / name)
            where[f"class_{k % 2}/{name}"] = k
        Image.open(d / f"p{k}.jpg").save(d / f"p{k}_again.jpg", quality=70)
        where[f"class_{k % 2}/p{k}_again.jpg"] = k
    return where


def test_the_same_picture_in_other_formats_sizes_and_encodings_never_straddles_splits_and_stays_put(here):
    where = _same_pictures(here / "raw")
    report = run_prepare(val_fraction=0.3, test_fraction=0.3)
    rows = {r.path.removeprefix("raw/"): r.split for r in manifest.load_manifest(Path("prepared/manifest.csv")).rows}
    assert report["totals"]["duplicates_dropped"] == 16 * 3  # BMP, TIFF and GIF hold the PNG's very pixels
    assert all(sum(p.removeprefix("raw/") in rows for p in [d["kept"], *d["dropped"]]) == 1
               for d in report["duplicates"])
    splits_of = defaultdict(set)
    for path, where_split in rows.items():
        splits_of[where[path]].add(where_split)
    assert all(len(s) == 1 for s in splits_of.values()), splits_of  # one picture, one split
    assert len({next(iter(s)) for s in splits_of.values()}) == 3  # and the pictures do spread over the splits
    assert report["totals"]["near_duplicate_groups"] == 16
    assert sorted(len(g["paths"]) for g in report["near_duplicates"]) == [5] * 16  # PNG, JPEG, WebP, half, again

    make_images(here / "raw", classes=2, per_class=10, size=64, seed=7)  # the data grows
    run_prepare(val_fraction=0.3, test_fraction=0.3)
    after = {r.path.removeprefix("raw/"): r.split for r in manifest.load_manifest(Path("prepared/manifest.csv")).rows}
    assert {p: after[p] for p in rows} == rows


def test_near_duplicates_by_hash_need_one_image_of_32_px_and_by_thumbnail_stay_below_the_grey_level():
    near = NearDuplicateParams(phash_bits=4, thumbnail_grey=1.5)
    dark, light = bytes([10] * 256), bytes([200] * 256)
    a = validate.Checked("a.png", "x", "1" * 64, 8, 8, "p1", 0b1011, dark)
    b = validate.Checked("b.png", "x", "2" * 64, 8, 8, "p2", 0b1001, light)  # one bit away, but both 8x8
    c = validate.Checked("c.png", "x", "3" * 64, 64, 64, "p3", 0b1000, bytes([100] * 256))  # larger: compared by hash
    d = validate.Checked("d.png", "x", "4" * 64, 8, 8, "p4", 2**63, bytes([11] * 256))  # a's thumbnail, 1 level up
    assert duplicates.near_duplicate_groups([a, b], near) == []
    assert [[m.path for m in g] for g in duplicates.near_duplicate_groups([a, b, c], near)] == [["a.png", "b.png", "c.png"]]
    assert [[m.path for m in g] for g in duplicates.near_duplicate_groups([a, b, d], near)] == [["a.png", "d.png"]]
    assert duplicates.near_duplicate_groups([a, b, c, d], None) == []


def test_prepare_reports_the_imbalance_of_the_training_split(here):
    make_images(here / "raw", classes=2, per_class=40)
    for p in sorted((here / "raw" / "class_1").glob("*.png"))[8:]:
        p.unlink()
    report = run_prepare(imbalance_ratio=3.0)
    assert report["totals"]["imbalanced"] and report["totals"]["imbalance_ratio"] > 3
    assert any(w.startswith("imbalanced:") for w in report["warnings"])
    assert not run_prepare(imbalance_ratio=20.0)["totals"]["imbalanced"]


def test_the_reduced_decode_reports_the_full_oriented_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn
    Image.new("RGB", (1000, 1001), (9, 9, 9)).save(tmp_path / "square.png")
    Image.new("RGB", (1200, 600), (9, 9, 9)).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    square, turned = load_image(tmp_path / "square.png", 10**7, 256), load_image(tmp_path / "turned.jpg", 10**7, 256)
    assert square.info["decoded_from"] == (1000, 1001) and min(square.size) >= 256
    assert turned.info["decoded_from"] == (600, 1200) and turned.width < turned.height
