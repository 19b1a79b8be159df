"""The served model's calibration, "none of these" and explanations on a real server (HTTP and gRPC), the CLI and
the drift monitor; the page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
from conftest import make_images
from serving_support import (
    SPEC,
    ThreadServer,
    export_tiny_model,
    export_trusted_model,
    http,
    png_bytes,
    serve_params,
    wait_for,
)

from serving.served_model import load_model
from tlops.inputs.images import load_image, preprocess
from tlops.onnx.runtime import softmax

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("images"), classes=3, per_class=8, size=40)


@pytest.fixture(scope="module")
def trusted(tmp_path_factory: pytest.TempPathFactory, images: list[Path]):
    path = tmp_path_factory.mktemp("trusted") / "model.onnx"
    return path, export_trusted_model(path, images, temperature=2.0)


@pytest.fixture(scope="module")
def server(trusted):
    with ThreadServer(serve_params(grpc_port=0, drift_window=100), str(trusted[0])) as s:
        wait_for(f"{s.url}/v2/health/ready")
        yield s


def noise_png(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8))


def test_served_probabilities_are_softmax_of_the_pytorch_logits_over_t(server, trusted, images):
    _, module = trusted
    x = preprocess(load_image(images[0], 10**6), SPEC)[None]
    with torch.inference_mode():
        raw = module.classifier(torch.from_numpy(x)).numpy()
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}, {"name": "ood_score"}, {"name": "unknown"}]}
    out = {o["name"]: o for o in http().post(f"{server.url}/v2/models/model/infer", json=body).json()["outputs"]}
    assert np.allclose(out["probabilities"]["data"], softmax(raw / 2.0).ravel(), atol=1e-4)
    assert out["unknown"]["datatype"] == "BOOL" and out["unknown"]["data"] == [False]
    assert out["ood_score"]["data"][0] <= server.service.model.ood_threshold


def test_predict_flags_the_unknown_and_explains_only_when_asked(server, images):
    known = http().post(f"{server.url}/predict", files=[("files", (p.name, p.read_bytes())) for p in images[:6]])
    far = http().post(f"{server.url}/predict", files=[("files", (f"n{i}.png", noise_png(i))) for i in range(6)])
    assert known.status_code == far.status_code == 200
    results = known.json()["predictions"] + far.json()["predictions"]
    assert all("explanation" not in r and isinstance(r["ood_score"], float) for r in results)
    flagged = [r["unknown"] for r in results]
    assert sum(flagged[6:]) >= 5 and sum(flagged[:6]) <= 1  # noise is no class; the fitted images mostly pass
    assert all(r["top_k"] for r in far.json()["predictions"])  # still the closest class

    explained = http().post(f"{server.url}/predict?explain=true&top_k=1", content=images[0].read_bytes()).json()
    e = explained["predictions"][0]["explanation"]
    assert e["label"] == explained["predictions"][0]["top_k"][0]["label"] and e["grid"] == [8, 8]
    x = preprocess(load_image(images[0], 10**6), SPEC)[None]
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    logits = http().post(f"{server.url}/v2/models/model/infer", json=body).json()["outputs"][0]["data"]
    assert np.sum(e["map"]) + e["bias"] == pytest.approx(logits[e["index"]], abs=1e-4)  # exact: map + bias = logit
    bad = http().post(f"{server.url}/predict?explain=yes", content=images[0].read_bytes())
    assert bad.status_code == 400 and "explain" in bad.json()["error"]


def test_the_explanation_output_over_grpc_and_the_drift_window_counts_unknowns(server, trusted, images):
    x = np.stack([preprocess(load_image(p, 10**6), SPEC) for p in images[:3]])
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
        result = client.infer("model", [inp], outputs=[tgrpc.InferRequestedOutput(n)
                                                       for n in ("logits", "explanation", "unknown")])
    maps, logits = result.as_numpy("explanation"), result.as_numpy("logits")
    assert maps.shape == (3, 3, 8, 8) and result.as_numpy("unknown").dtype == bool
    bias = trusted[1].classifier.head[-1].bias.detach().numpy() / 2.0
    assert np.allclose(maps.sum(axis=(2, 3)) + bias, logits, atol=1e-4)
    for i in range(4):
        http().post(f"{server.url}/predict", content=noise_png(100 + i))
    drift = http().get(f"{server.url}/drift").json()
    assert drift["unknown"] is not None and drift["unknown"] > 0


def test_a_model_without_explanation_refuses_explain_and_has_no_such_output(tmp_path, images):
    plain = export_tiny_model(tmp_path / "plain.onnx")
    with ThreadServer(serve_params(), str(plain)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        r = http().post(f"{s.url}/predict?explain=true", content=images[0].read_bytes())
        assert r.status_code == 400 and "no explanation output" in r.json()["error"]
        body = {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}],
                "outputs": [{"name": "explanation"}]}
        r = http().post(f"{s.url}/v2/models/plain/infer", json=body)
        assert r.status_code == 400 and "explanation" in r.json()["error"]
        assert "ood_score" not in http().post(f"{s.url}/predict", content=images[0].read_bytes()).text


def test_cli_predict_json_carries_the_ood_verdict(trusted, images, tmp_path):
    noise = tmp_path / "noise.png"
    noise.write_bytes(noise_png(7))
    model = load_model(trusted[0])
    proc = subprocess.run([str(Path(sys.executable).parent / "tlops"), "predict", "--json", "--model", str(trusted[0]),
                           str(images[0]), str(noise)], capture_output=True, text=True, cwd=ROOT, check=True)
    first, second = json.loads(proc.stdout)
    assert first["unknown"] is False and second["unknown"] is True
    assert second["ood_score"] > model.ood_threshold >= first["ood_score"]


# ---------------------------------------------------------------- the page, in a real browser


def chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser():
    found = chromium()
    if found is None:
        if os.environ.get("TLOPS_REQUIRE_BROWSER"):
            pytest.fail("TLOPS_REQUIRE_BROWSER is set but chromium + chromedriver are missing")
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    yield driver
    driver.quit()


def test_the_page_classifies_an_uploaded_image_as_tlops_predict_does(trusted, images, browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    key = "page-test-key-0123456789abcdef"
    monkeypatch.setenv("TLOPS_TEST_KEY", key)
    with ThreadServer(serve_params(api_key_env="TLOPS_TEST_KEY"), str(trusted[0])) as s:
        wait_for(f"{s.url}/v2/health/ready")
        page = http().get(f"{s.url}/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        browser.get(f"{s.url}/")
        wait = WebDriverWait(browser, 20)
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "API key"))  # the key is asked for
        browser.find_element(By.ID, "key").send_keys(key + "\n")
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Drop an image"))
        browser.find_element(By.ID, "file").send_keys(str(images[5]))
        wait.until(lambda d: d.find_element(By.ID, "label").text)
        shown = browser.find_element(By.ID, "label").text
        badge = browser.find_element(By.ID, "unknown").text
        rows = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#topk li")]
        drawn = browser.execute_script(  # the overlay canvas holds the image with the map over it
            "const c = document.getElementById('overlay').getContext('2d').getImageData(0, 0, 320, 320).data;"
            "let n = 0; for (let i = 3; i < c.length; i += 4) n += c[i] > 0; return n;")
        browser.save_screenshot(str(tmp_path / "page.png"))
    tlops = str(Path(sys.executable).parent / "tlops")
    expected = subprocess.run([tlops, "predict", "--json", "--model", str(trusted[0]), str(images[5])],
                              capture_output=True, text=True, cwd=ROOT, check=True).stdout
    result = json.loads(expected)[0]
    assert shown == result["top_k"][0]["label"]
    assert badge == ("unknown: unlike the training data" if result["unknown"] else "known")
    assert rows[0].startswith(f"{shown} {100 * result['top_k'][0]['probability']:.1f}%")
    assert drawn == 320 * 320
