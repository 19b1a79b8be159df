"""Medical images: DICOM decoding (pydicom's own test files), window/level and MONOCHROME1 on a hand-made file,
high-bit-depth PNGs by the intensity rules, patient-level splits."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from tlops.core import folders
from tlops.core.config import DataParams
from tlops.data import manifest, prepare, sources, split, validate
from tlops.inputs import dicom, dicom_render
from tlops.inputs.images import ImageError, PreprocessSpec, load_image
from tlops.inputs.intensity import Intensity, to_8bit, window_to_8bit

DECODES = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
           "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "JPGExtended.dcm",
           "SC_rgb_jpeg.dcm", "SC_rgb_rle.dcm", "examples_palette.dcm", "examples_ybr_color.dcm", "rtdose.dcm"]
REFUSED = {"MR_truncated.dcm": "truncated", "rtplan.dcm": "no_pixels", "reportsi.dcm": "no_pixels",
           "JPEG-lossy.dcm": "undecodable"}


@pytest.mark.parametrize("name", DECODES)
def test_pydicoms_test_files_decode_to_rgb(name: str):
    img = load_image(get_testdata_file(name), 10**7)
    assert img.mode == "RGB" and min(img.size) > 0
    assert img.info["decoded_from"] == img.size


@pytest.mark.parametrize("name", REFUSED)
def test_unusable_dicoms_fail_with_their_reason(name: str):
    with pytest.raises(ImageError) as e:
        load_image(get_testdata_file(name), 10**7)
    assert e.value.reason == REFUSED[name]


def test_lossless_encodings_of_one_scan_give_the_same_pixels():
    reference = np.asarray(load_image(get_testdata_file("MR_small.dcm"), 10**7))
    assert len(np.unique(reference)) >= 200  # 16-bit MR with a header window, spread over the grey levels
    for name in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                 "MR_small_bigendian.dcm"):
        assert np.array_equal(np.asarray(load_image(get_testdata_file(name), 10**7)), reference), name


def test_a_multi_frame_file_gives_its_middle_frame_or_every_frame():
    raw = Path(get_testdata_file("rtdose.dcm")).read_bytes()
    ds = dicom.read(raw)
    assert dicom.frames(ds) > 2
    parts = dicom.split_frames(raw)
    assert len(parts) == dicom.frames(ds)
    middle = dicom_render.grey8(raw, "minmax")
    assert np.array_equal(middle, dicom_render.grey8(parts[len(parts) // 2], "minmax"))


# ---------------------------------------------------------------- a hand-made 4x4 file

STORED = np.array([[0, 500, 1000, 1500], [2000, 2500, 3000, 3500], [4000, 4095, 100, 200], [300, 400, 600, 700]])


def expected_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written out independently: below the window 0, above it 255, linear inside."""
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    out = np.where(values <= lo, 0.0, np.where(values > hi, 255.0, ((values - (center - 0.5)) / (width - 1) + 0.5)
                                              * 255.0))
    return np.rint(out).astype(np.uint8)


def test_rescale_then_header_window_then_monochrome1_inversion():
    slope, intercept, window = 2.0, -1000.0, (1000.0, 2000.0)
    modality = STORED * slope + intercept  # -1000 .. 7190
    expected = expected_window(modality, *window)
    mono2 = dicom.encode(STORED, slope=slope, intercept=intercept, window=window)
    assert np.array_equal(dicom_render.grey8(mono2), expected)
    mono1 = dicom.encode(STORED, slope=slope, intercept=intercept, window=window, photometric="MONOCHROME1")
    assert np.array_equal(dicom_render.grey8(mono1), 255 - expected)  # high values dark: inverted to bright
    # data.window overrides the header's window
    assert np.array_equal(dicom_render.grey8(mono2, window=(3000.0, 500.0)), expected_window(modality, 3000.0, 500.0))
    # no window in the header: auto maps the stored 12-bit range (through the rescale) onto 0..255
    plain = dicom_render.grey8(dicom.encode(STORED, slope=slope, intercept=intercept))
    lo, hi = intercept, 4095 * slope + intercept
    assert np.array_equal(plain, np.rint((modality - lo) * 255 / (hi - lo)).astype(np.uint8))
    assert plain[2, 1] == 255 and plain[0, 0] == 0


def test_a_dicom_without_extension_is_found_by_its_preamble(tmp_path: Path):
    path = tmp_path / "IM0001"
    path.write_bytes(dicom.encode(STORED, window=(2048, 4096)))
    assert np.asarray(load_image(path, 10**6).convert("L")).shape == (4, 4)


def test_a_huge_declared_dicom_is_refused_before_decoding():
    with pytest.raises(ImageError) as e:
        load_image(dicom.encode(np.zeros((64, 64))), max_pixels=1000)
    assert e.value.reason == "too_many_pixels"


# ---------------------------------------------------------------- high bit depth


def twelve_bit_png(path: Path) -> Path:
    """A 16-bit PNG holding 12-bit values (0..4095): what CT and X-ray viewers export."""
    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    return path


def test_a_12_bit_png_spans_at_least_200_grey_levels(tmp_path: Path):
    img = load_image(twelve_bit_png(tmp_path / "scan.png"), 10**6)
    grey = np.asarray(img.convert("L"))
    assert len(np.unique(grey)) >= 200 and grey.min() <= 2 and grey.max() >= 253


def test_intensity_rules():
    v = np.array([0.0, 100.0, 1000.0, 2000.0, 4000.0, 4095.0])
    assert list(to_8bit(v, "minmax")) == list(np.rint(v * 255 / 4095).astype(np.uint8))
    spiky = np.concatenate([np.linspace(1000, 2000, 998), [0, 60000]])  # a dead and a hot pixel
    p = to_8bit(spiky, "percentile")
    assert p[:998].min() <= 2 and p[:998].max() >= 252  # the spikes do not set the scale
    assert list(to_8bit(v, "window", window=(2048, 4096))) == list(window_to_8bit(v, 2048, 4096))
    with pytest.raises(ValueError, match="data.window"):
        to_8bit(v, "window")
    assert set(to_8bit(np.full(4, 32896, np.uint16))) == {128}  # flat: its level within 16 bits


def test_the_rule_travels_in_the_spec_and_reaches_load_image(tmp_path: Path):
    spec = PreprocessSpec(32, intensity="window", window=(1024, 512))
    again = PreprocessSpec.from_json(spec.to_json())
    assert again == spec and again.rule == Intensity("window", (1024.0, 512.0))
    png = twelve_bit_png(tmp_path / "scan.png")
    narrow = np.asarray(load_image(png, 10**6, intensity=again.rule).convert("L"))
    assert (narrow == 0).mean() > 0.15 and (narrow == 255).mean() > 0.5  # most of 0..4095 is outside 768..1280
    assert PreprocessSpec.from_dict({"input_size": 32}).intensity == "auto"  # models exported before the rule


def test_window_rule_needs_a_window():
    with pytest.raises(ValueError, match="data.window"):
        DataParams(intensity="window")
    with pytest.raises(ValueError, match="group_by"):
        DataParams(group_by="(unclosed")


# ---------------------------------------------------------------- patient-level splits


def write_patients(root: Path, patients: range, per_patient: int = 4, seed: int = 0) -> dict[str, str]:
    """class_<patient % 2>/<patient>_<k>.dcm for each patient; returns {PatientID: class}."""
    rng = np.random.default_rng(seed)
    ids = {}
    for pid in patients:
        label = f"class_{pid % 2}"
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(per_patient):
            pixels = rng.integers(0, 4096, (16, 16))
            (root / label / f"Patient{pid:03d}_{k}.dcm").write_bytes(
                dicom.encode(pixels, PatientName=f"Name^Number{pid}", PatientID=f"PID{pid:05d}"))
        ids[f"PID{pid:05d}"] = label
    return ids


def patient_splits(manifest: manifest.Manifest) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in manifest.rows:
        pid = str(dicom.read(Path(r.path).read_bytes(), stop_before_pixels=True).PatientID)
        out.setdefault(pid, set()).add(r.split)
    return out


def test_patients_never_straddle_splits_and_stay_put_as_patients_are_added(workspace: Path):
    params = DataParams(source="imagefolder", path="src", group_by="patient", min_per_class=2,
                        near_duplicates=None)
    write_patients(workspace / "src", range(30))
    sources.ingest_source(params, Path("data/raw"))
    report = prepare.prepare_data(Path("data/raw"), params, Path("manifest.csv"), Path("data.json"))
    first = manifest.load_manifest(Path("manifest.csv"))
    splits = patient_splits(first)
    assert len(splits) == 30 and all(len(s) == 1 for s in splits.values())
    assert sum(report["groups"][s] for s in manifest.SPLITS) == 30 and report["groups"]["rule"] == "patient"
    assert {r.path.split("/")[-1][:-4] for r in first.rows}.isdisjoint({f"Patient{p:03d}_0" for p in range(30)})

    write_patients(workspace / "src", range(30, 45), seed=1)
    sources.ingest_source(params, Path("data/raw"))
    prepare.prepare_data(Path("data/raw"), params, Path("manifest.csv"), Path("data.json"))
    grown = patient_splits(manifest.load_manifest(Path("manifest.csv")))
    assert len(grown) == 45 and all(len(s) == 1 for s in grown.values())
    assert {p: grown[p] for p in splits} == splits  # nobody moved


def test_without_grouping_a_patient_straddles_splits(workspace: Path):
    params = DataParams(source="imagefolder", path="src", min_per_class=2, near_duplicates=None)
    write_patients(workspace / "src", range(30))
    sources.ingest_source(params, Path("data/raw"))
    prepare.prepare_data(Path("data/raw"), params, Path("manifest.csv"), Path("data.json"))
    assert any(len(s) > 1 for s in patient_splits(manifest.load_manifest(Path("manifest.csv"))).values())


def test_a_path_pattern_groups_too(workspace: Path):
    rng = np.random.default_rng(0)
    for subject in range(20):
        for k in range(3):
            label = f"c{subject % 2}"
            (workspace / "raw" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                workspace / "raw" / label / f"subj{subject:02d}-{k}.png")
    params = DataParams(group_by=r"subj(\d+)-", min_per_class=2, near_duplicates=None)
    prepare.prepare_data(Path("raw"), params, Path("manifest.csv"), Path("data.json"))
    by_subject: dict[str, set[str]] = {}
    for r in manifest.load_manifest(Path("manifest.csv")).rows:
        by_subject.setdefault(r.path.split("/")[-1].split("-")[0], set()).add(r.split)
    assert len(by_subject) == 20 and all(len(s) == 1 for s in by_subject.values())


def test_dicom_files_are_ingested_under_content_hash_names(workspace: Path):
    params = DataParams(source="imagefolder", path="src", min_per_class=2)
    write_patients(workspace / "src", range(4), per_patient=2)
    sources.ingest_source(params, Path("data/raw"))
    names = [f.name for f in folders.visible_files(Path("data/raw"))]
    assert len(names) == 8 and not [n for n in names if "Patient" in n]
    recorded = (Path("data/raw") / manifest.DICOM_SOURCES).read_text()
    assert "Patient000_0.dcm" in recorded  # the original path is kept beside the data, in one local file


# ---------------------------------------------------------------- the whole pipeline on DICOMs: nobody in the record

SECRET_NAME, SECRET_ID = "Doe^Janet", "PID-SECRET-"


def write_scans(root: Path, patients: int = 24, per_patient: int = 3) -> list[str]:
    """Generated 12-bit scans, class by patient, named the way PACS exports often are (by patient), a few
    MONOCHROME1, and one truncated file. Returns the identifiers that must never reach any output."""
    rng = np.random.default_rng(0)
    for pid in range(patients):
        label = ("normal", "lesion")[pid % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(per_patient):
            pixels = rng.integers(200, 900, (24, 24))
            if label == "lesion":
                pixels[8:16, 8:16] += 2500
            raw = dicom.encode(pixels, photometric="MONOCHROME1" if pid % 5 == 0 else "MONOCHROME2",
                               PatientName=f"{SECRET_NAME}{pid:02d}", PatientID=f"{SECRET_ID}{pid:04d}",
                               StudyInstanceUID=f"1.2.826.0.1.3680043.9.{pid}")
            (root / label / f"Doe_Janet{pid:02d}_{k}.dcm").write_bytes(raw)
    whole = (root / "lesion" / "Doe_Janet01_0.dcm").read_bytes()
    (root / "lesion" / "Doe_Janet01_cut.dcm").write_bytes(whole[: len(whole) - 300])
    return [SECRET_NAME, SECRET_ID, "Doe_Janet", "Janet"]


def leaks(folder: Path, secrets: list[str]) -> list[str]:
    found = []
    for f in folder.rglob("*"):
        if f.is_file():
            body = f.read_bytes()
            found += [f"{f} holds {s!r}" for s in secrets if s.encode() in body]
    return found


@pytest.mark.slow
def test_pipeline_on_dicoms_groups_patients_and_records_no_patient_identifier(workspace: Path, prefect_api: str,
                                                                            mlflow_store: str,
                                                                            monkeypatch: pytest.MonkeyPatch):
    import uuid

    from conftest import write_params
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.pipeline import run_pipeline
    from tlops.tracking import runs

    monkeypatch.setenv(runs.EXPERIMENT_ENV, f"test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv(runs.PARENT_ENV, raising=False)
    secrets = write_scans(workspace.parent / "scans")
    write_params(workspace, {"data": {"source": "imagefolder", "path": str(workspace.parent / "scans"),
                                      "group_by": "patient", "near_duplicates": None}})
    import logging

    for name in ("prefect.flow_runs", "prefect.task_runs"):  # the suite logs WARNING and up; here everything
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "level", logging.INFO)
        for handler in logger.handlers:
            monkeypatch.setattr(handler, "level", logging.INFO)
    summary = run_pipeline()
    assert summary["status"] == "updated"

    report = __import__("json").loads((workspace / "reports" / "data.json").read_text())
    assert [q["reason"] for q in report["quarantined"]] == ["truncated"]
    assert sum(report["groups"][s] for s in manifest.SPLITS) == 24
    splits = patient_splits(manifest.load_manifest(workspace / "data" / "prepared" / "manifest.csv"))
    assert len(splits) == 24 and all(len(s) == 1 for s in splits.values())

    found = []
    for folder in ("reports", "models", "data/prepared", "features", "checkpoints"):
        found += leaks(workspace / folder, secrets)
    store = Path(mlflow_store.removeprefix("sqlite:///"))
    found += leaks(store.parent, secrets)  # the MLflow database and every artifact stored beside it
    found += leaks(workspace / "mlartifacts", secrets) if (workspace / "mlartifacts").exists() else []
    logs, deadline = [], time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while len(logs) < 10 and time.monotonic() < deadline:
            time.sleep(0.5)
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[summary["flow_run_id"]])))
    assert len(logs) >= 10  # the stages did log (sent to the API in the background, hence the wait)
    found += [f"Prefect log: {s!r}" for log in logs for s in secrets if s in log.message]
    assert found == []
    # where they are, and must be: the scans themselves and the local map of original paths (the grep works)
    assert leaks(workspace / "data" / "raw", secrets) and (workspace / "data" / "raw" / manifest.DICOM_SOURCES).exists()


def test_predict_with_a_dicom_body_equals_tlops_predict_on_the_file(tmp_path: Path):
    from serving_support import ThreadServer, export_tiny_model, http, serve_params, wait_for

    from serving.predict import predict_files

    model = export_tiny_model(tmp_path / "model.onnx")
    scans = [Path(get_testdata_file(n)) for n in ("MR_small.dcm", "CT_small.dcm", "SC_rgb_jpeg.dcm")]
    extensionless = tmp_path / "IM0001"  # DICOM files often come without an extension
    extensionless.write_bytes(dicom.encode(STORED, window=(2048, 4096)))
    scans.append(extensionless)
    local = predict_files(model, scans, top_k=3)
    with ThreadServer(serve_params(), str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        for path, expected in zip(scans, local, strict=True):
            r = http().post(f"{s.url}/predict", content=path.read_bytes(), params={"top_k": 3},
                            headers={"Content-Type": "application/dicom"})
            assert r.status_code == 200, r.text
            got = r.json()["predictions"][0]["top_k"]
            assert [t["label"] for t in got] == [t["label"] for t in expected["top_k"]], path.name
            assert [t["probability"] for t in got] == pytest.approx([t["probability"] for t in expected["top_k"]],
                                                                    abs=1e-6)
        truncated = Path(get_testdata_file("MR_truncated.dcm")).read_bytes()
        r = http().post(f"{s.url}/predict", content=truncated)
        assert r.status_code == 400 and r.json()["reason"] == "truncated"


def test_a_malformed_header_value_is_a_corrupt_file_not_a_crash():
    from pydicom.dataset import Dataset

    ds = dicom.read(dicom.encode(STORED, window=(2048, 4096)))
    del ds.WindowCenter
    ds.add_new(0x00281050, "LO", "ab")  # Window Center, as a hostile writer might store it
    assert isinstance(ds, Dataset) and ds.WindowCenter == "ab"
    with pytest.raises(dicom.DicomError) as e:
        dicom_render.to_grey8(ds, ds.pixel_array, "auto", None)
    assert e.value.reason == "corrupt" and "ab" not in str(e.value)


def test_an_ungrouped_near_duplicate_never_moves_a_patient():
    def item(path: str, sha: str, group: str = "") -> validate.Checked:
        return validate.Checked(path, "c", sha, 8, 8, group=group)

    patient = [item("a/1.dcm", "f" * 64, "9" * 64), item("a/2.dcm", "e" * 64, "9" * 64)]
    before = split.split_keys(patient, [])
    copy = item("a/copy.png", "0" * 64)  # a re-encoded copy of one scan, lower content hash, no PatientID
    after = split.split_keys([*patient, copy], [[patient[0], copy]])
    assert before == {p: "9" * 64 for p in ("a/1.dcm", "a/2.dcm")}
    assert after == {"a/1.dcm": "9" * 64, "a/2.dcm": "9" * 64, "a/copy.png": "9" * 64}


def test_a_path_pattern_reads_a_dicoms_original_path_and_flat_dicoms_are_renamed_too(workspace: Path):
    rng = np.random.default_rng(0)
    for subject in range(16):
        for k in range(3):
            folder = workspace / "src" / f"c{subject % 2}" / f"subject-{subject:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"Smith_John_{k}.dcm").write_bytes(dicom.encode(rng.integers(0, 4096, (12, 12))))
    params = DataParams(source="imagefolder", path="src", group_by=r"subject-(\d+)/", min_per_class=2,
                        near_duplicates=None)
    sources.ingest_source(params, Path("data/raw"))
    prepare.prepare_data(Path("data/raw"), params, Path("manifest.csv"), Path("data.json"))
    originals = validate.original_paths(Path("data/raw"))
    by_subject: dict[str, set[str]] = {}
    for r in manifest.load_manifest(Path("manifest.csv")).rows:
        by_subject.setdefault(originals[r.path].split("/")[1], set()).add(r.split)
    assert len(by_subject) == 16 and all(len(s) == 1 for s in by_subject.values())
    assert not [f for f in folders.visible_files(Path("data/raw")) if "Smith" in f.name]

    flat = workspace / "flat"
    flat.mkdir()
    (flat / "Smith_John.dcm").write_bytes(dicom.encode(STORED))
    sources.copy_folder(flat, workspace / "copied")
    assert [f.suffix for f in folders.visible_files(workspace / "copied")] == [".dcm"]
    assert "Smith" not in "".join(f.name for f in folders.visible_files(workspace / "copied"))


def test_a_name_where_rows_should_be_is_quarantined_as_corrupt_and_written_nowhere(tmp_path: Path, monkeypatch):
    from serving_support import text_rows_dicom

    from tlops.core.config import DataParams

    monkeypatch.chdir(tmp_path)
    name = "DOE^JOHNATHAN"
    rng = np.random.default_rng(5)
    for label in ("class_0", "class_1"):
        (tmp_path / "raw" / label).mkdir(parents=True)
        for k in range(6):
            (tmp_path / "raw" / label / f"ok{k}.dcm").write_bytes(
                dicom.encode(rng.integers(0, 4096, (16, 16)), uid_seed=f"{label}-{k}"))  # the same bytes every run
    (tmp_path / "raw" / "class_0" / "named.dcm").write_bytes(text_rows_dicom(name))
    report = prepare.prepare_data(Path("raw"), DataParams(source="imagefolder", path="src", min_per_class=2,
                                                          near_duplicates=None),  # noise looks alike at 16 px
                                  Path("prepared/manifest.csv"), Path("reports/data.json"))
    assert [(q["path"], q["reason"]) for q in report["quarantined"]] == [("raw/class_0/named.dcm", "corrupt")]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".dcm"]
    assert written and not [p for p in written if name.encode() in p.read_bytes()]
