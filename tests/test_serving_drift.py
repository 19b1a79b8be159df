"""Drift monitoring: the statistics on their own, the service's /drift and gauges on real traffic, and the input log."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import make_images
from PIL import Image
from serving_support import ThreadServer, export_tiny_model, http, metric_value, serve_params, wait_for

from tlops.onnx import drift

DIM, CLASSES = 32, 4
MIX = np.eye(DIM) + np.linspace(1, 0.2, DIM)[:, None] * np.random.default_rng(99).standard_normal((DIM, DIM)) / 6
CLASS_MEANS = 3 * np.random.default_rng(98).standard_normal((CLASSES, DIM))


def fake_outputs(rng: np.random.Generator, n: int, shift: float = 0.0, classes: list[int] | None = None):
    """One domain: a class per sample (from `classes`, default all), logits confident in it, embeddings its class's
    mean plus correlated Gaussian noise; `shift` moves every embedding by that many units in every direction."""
    y = rng.choice(classes or list(range(CLASSES)), n)
    logits = rng.standard_normal((n, CLASSES))
    logits[np.arange(n), y] += 6
    return logits, CLASS_MEANS[y] + rng.standard_normal((n, DIM)) @ MIX + shift


def test_embedding_score_stays_near_zero_in_domain_and_rises_with_the_shift():
    rng = np.random.default_rng(0)
    ref = drift.reference(*fake_outputs(rng, 600))
    assert ref["embedding"]["k"] == drift.COMPONENTS and abs(sum(ref["classes"]) - 1) < 1e-9
    assert ref["embedding"]["between"] == CLASSES - 1 and ref["embedding"]["n"] == 300  # fitted on one half
    for window in (60, 500):  # bias-corrected: the window size does not move the in-domain score
        m = drift.Monitor(ref, window=window, threshold=1.0)
        m.observe(*fake_outputs(np.random.default_rng(window), window))
        s = m.scores()
        assert s["window"] == window and s["embedding"] < 0.5 and not s["drifted"], s
        assert s["prediction"] < 0.05 and abs(s["confidence"]) < 0.05
    one_class = drift.Monitor(ref, window=200, threshold=1.0)  # label shift: one class only
    one_class.observe(*fake_outputs(np.random.default_rng(3), 200, classes=[2]))
    assert one_class.scores()["prediction"] > 0.3 and one_class.scores()["embedding"] < 0.5
    assert not one_class.scores()["drifted"]
    shifted = drift.Monitor(ref, window=200, threshold=1.0)
    shifted.observe(*fake_outputs(np.random.default_rng(7), 200, shift=1.0))
    assert shifted.scores()["embedding"] > 2.0 and shifted.scores()["drifted"]


def test_window_rolls_and_too_few_samples_never_count_as_drift():
    rng = np.random.default_rng(1)
    ref = drift.reference(*fake_outputs(rng, 600))
    m = drift.Monitor(ref, window=100, threshold=1.0)
    m.observe(*fake_outputs(rng, drift.MIN_WINDOW - 1, shift=3.0))
    assert m.scores()["embedding"] > 0.5 and not m.scores()["drifted"]  # too few to call
    m.observe(*fake_outputs(rng, 100, shift=3.0))
    assert m.scores()["drifted"] and m.scores()["window"] == 100
    m.observe(*fake_outputs(rng, 100))  # the shifted samples have all left the window
    assert not m.scores()["drifted"] and m.seen == 100 + drift.MIN_WINDOW - 1 + 100


def test_jensen_shannon_divergence_bounds():
    p = np.array([0.5, 0.5, 0.0])
    assert drift.js_divergence(p, p) == 0.0
    assert drift.js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)


def shifted_images(folder: Path, n: int) -> list[Path]:
    """Another domain for the tiny model: bright, washed-out, grey-tinted images (its embedding is channel means)."""
    rng = np.random.default_rng(5)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        a = (200 + rng.integers(0, 55, (24, 24, 3))).astype(np.uint8)
        p = folder / f"s{i:03d}.png"
        Image.fromarray(a).save(p)
        out.append(p)
    return out


def post_all(url: str, paths: list[Path], per_request: int = 10) -> None:
    with httpx.Client(timeout=30) as c:
        for i in range(0, len(paths), per_request):
            files = [("file", (p.name, p.read_bytes(), "image/png")) for p in paths[i:i + per_request]]
            assert c.post(f"{url}/predict", files=files).status_code == 200


def test_service_reports_no_drift_in_domain_and_drift_on_a_shifted_domain(tmp_path: Path):
    reference = make_images(tmp_path / "reference", classes=3, per_class=20, size=24, seed=0)
    model = export_tiny_model(tmp_path / "model.onnx", reference_images=reference)
    in_domain = make_images(tmp_path / "live", classes=3, per_class=20, size=24, seed=1)
    with ThreadServer(serve_params(drift_window=60), str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        assert http().get(f"{s.url}/drift").json()["window"] == 0
        post_all(s.url, in_domain)
        calm = http().get(f"{s.url}/drift").json()
        assert set(calm) >= {"window", "prediction", "embedding", "confidence", "threshold", "drifted"}
        assert calm["window"] == 60 and not calm["drifted"] and calm["embedding"] < calm["threshold"], calm
        post_all(s.url, shifted_images(tmp_path / "shifted", 60))
        shifted = http().get(f"{s.url}/drift").json()
        assert shifted["drifted"] and shifted["embedding"] > calm["threshold"], shifted
        text = http().get(f"{s.url}/metrics").text
        assert metric_value(text, "tlops_drift_embedding") == pytest.approx(shifted["embedding"])
        assert metric_value(text, "tlops_drift_drifted") == 1
        assert metric_value(text, "tlops_drift_window") == 60
        for gauge in ("tlops_drift_prediction", "tlops_drift_confidence"):
            assert f"{gauge} " in text


def test_a_model_without_a_reference_serves_and_says_why_there_is_no_drift(tmp_path: Path):
    model = export_tiny_model(tmp_path / "model.onnx")
    with ThreadServer(serve_params(), str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        body = http().get(f"{s.url}/drift").json()
        assert body["drifted"] is False and "re-export" in body["error"]


def test_logged_inputs_are_content_hashed_whole_files_within_the_byte_budget(tmp_path: Path):
    model = export_tiny_model(tmp_path / "model.onnx")
    images = make_images(tmp_path / "images", classes=3, per_class=3, size=24, seed=3)
    budget = sum(p.stat().st_size for p in images[:4]) + 10
    log_dir = tmp_path / "log"
    with ThreadServer(serve_params(log_inputs=str(log_dir), log_sample=1.0, log_max_bytes=budget), str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        post_all(s.url, images + images[:2], per_request=3)  # the repeats are stored once
        pixels = np.asarray(Image.open(images[0]).convert("RGB"))
        r = http().post(f"{s.url}/v2/models/model/infer", json={"inputs": [
            {"name": "image", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}]})
        assert r.status_code == 200
        logged = http().get(f"{s.url}/drift").json()["logged"]
    files = sorted(log_dir.iterdir())
    assert not [f for f in files if f.name.startswith(".")]  # no temp file left
    assert 1 <= len(files) == logged and sum(f.stat().st_size for f in files) <= budget
    sent = {hashlib.sha256(p.read_bytes()).hexdigest() for p in images}
    for f in files:
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        assert f.name == f"{digest[:32]}.png" and digest in sent  # whole files, named by their content


def test_log_sample_keeps_the_same_images_whatever_the_order(tmp_path: Path):
    from serving.input_log import InputLog

    images = make_images(tmp_path / "images", classes=3, per_class=10, size=16, seed=4)
    folder, kept = tmp_path / "log", []
    for order in (images, images[::-1]):
        for f in folder.glob("*"):
            f.unlink()
        log = InputLog(folder, sample=0.5, max_bytes=10**9)  # the same service key: it lives beside the folder
        for p in order:
            log.keep_file(p.read_bytes())
        kept.append(sorted(f.name for f in folder.iterdir()))
    assert kept[0] == kept[1] and 0 < len(kept[0]) < len(images)


def test_which_inputs_are_kept_is_keyed_by_a_secret_beside_the_folder_and_files_are_not_world_readable(
        tmp_path: Path):
    from serving.input_log import InputLog

    blobs = [bytes([i]) * 100 + b"x" * i for i in range(200)]
    a, b = InputLog(tmp_path / "a", sample=0.5, max_bytes=10**9), InputLog(tmp_path / "b", sample=0.5, max_bytes=10**9)
    chosen_a, chosen_b = ({i for i, d in enumerate(blobs) if log.sampled(d)} for log in (a, b))
    # Two services' keys pick different halves: the content alone does not decide, so a client cannot search for
    # bytes that are always kept (with a plain hash, appending bytes until it falls in the kept share takes ~10 tries)
    assert 60 < len(chosen_a) < 140 and chosen_a != chosen_b
    key = tmp_path / ".a.sample-key"
    assert key.is_file() and key.stat().st_mode & 0o077 == 0 and not list((tmp_path / "a").iterdir())
    image = make_images(tmp_path / "images", classes=1, per_class=1, size=16)[0]
    kept = InputLog(tmp_path / "c", sample=1.0, max_bytes=10**9).keep_file(image.read_bytes())
    assert kept.stat().st_mode & 0o007 == 0 and (tmp_path / "c").stat().st_mode & 0o007 == 0


def test_a_dicom_input_is_kept_as_its_pixels_without_its_header(tmp_path: Path):
    from serving.input_log import InputLog
    from tlops.inputs import dicom, dicom_render

    scan = dicom.encode(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096, PatientName="DOE^JANE",
                        PatientID="PID-12345")
    kept = InputLog(tmp_path / "log", sample=1.0, max_bytes=10**9).keep_file(scan)
    data = kept.read_bytes()
    assert kept.suffix == ".png" and b"DOE^JANE" not in data and b"PID-12345" not in data
    assert np.array_equal(np.asarray(Image.open(kept)), dicom_render.grey8(scan))  # the 8-bit image the model saw
