"""The service's HTTP API on a real uvicorn server: v2 protocol, /predict, /metrics, and every bad input -> 4xx."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import make_images
from serving_support import SPEC, ThreadServer, export_tiny_model, http, metric_value, png_bytes, serve_params, wait_for

from serving.client import http_accuracy
from serving.predict import predict_files, results_json, results_table
from tlops.inputs.images import load_image, preprocess


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("images"), classes=3, per_class=3, size=24)


@pytest.fixture(scope="module")
def server(model_file: Path):
    # max_wait_ms 20: wide enough that concurrent test requests reliably share a batch.
    with ThreadServer(serve_params(max_wait_ms=20), str(model_file)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        yield s


def infer_body(name: str, array: np.ndarray, datatype: str, **extra) -> dict:
    return {"inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype,
                        "data": array.ravel().tolist()}], **extra}


def test_server_metadata_and_health(server: ThreadServer):
    assert http().get(f"{server.url}/v2").json()["name"] == "tlops"
    assert http().get(f"{server.url}/v2/health/live").status_code == 200
    assert http().get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert http().get(f"{server.url}/v2/models/model/ready").json() == {"name": "model", "ready": True}


def test_model_metadata_describes_inputs_outputs_and_version(server: ThreadServer):
    meta = http().get(f"{server.url}/v2/models/model").json()
    assert meta["name"] == "model" and meta["platform"] == "onnxruntime_onnx"
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]} in meta["inputs"]
    assert {"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]} in meta["inputs"]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "label", "datatype": "BYTES", "shape": [-1]},
                               {"name": "label_index", "datatype": "INT64", "shape": [-1]}]  # no embedding output
    assert meta["versions"] == [server.service.model.version]
    assert meta["parameters"]["labels"] == ["class_0", "class_1", "class_2"]
    assert meta["parameters"]["preprocess"]["input_size"] == 32


def test_v2_infer_fp32_uint8_predict_and_local_predict_agree(server: ThreadServer, images: list[Path]):
    local = predict_files(server.service.model.path, images, top_k=3)
    version = server.service.model.version
    for path, loc in zip(images, local):
        img = load_image(path, 10**6)
        fp32 = preprocess(img, SPEC)[None]
        r1 = http().post(f"{server.url}/v2/models/model/infer", json=infer_body("input", fp32, "FP32", id="req-1"))
        r2 = http().post(f"{server.url}/v2/models/model/versions/{version}/infer",
                        json=infer_body("image", np.asarray(img), "UINT8"))
        r3 = http().post(f"{server.url}/predict", content=path.read_bytes(), params={"top_k": 3})
        assert r1.status_code == r2.status_code == r3.status_code == 200, (r1.text, r2.text, r3.text)
        a, b, c = r1.json(), r2.json(), r3.json()
        assert a["id"] == "req-1" and "id" not in b and a["model_version"] == version
        assert a["outputs"][0]["name"] == "logits" and a["outputs"][0]["shape"] == [1, 3]
        logits_fp32, logits_u8 = (np.array(r["outputs"][0]["data"]) for r in (a, b))
        np.testing.assert_allclose(logits_fp32, logits_u8, atol=1e-4)
        expected = loc["top_k"][0]["index"]
        assert int(np.argmax(logits_fp32)) == int(np.argmax(logits_u8)) == expected
        got = c["predictions"][0]["top_k"]
        assert [t["label"] for t in got] == [t["label"] for t in loc["top_k"]]
        assert [t["probability"] for t in got] == pytest.approx([t["probability"] for t in loc["top_k"]], abs=1e-5)
        assert loc["top_k"][0]["label"] == path.parent.name  # the tiny model really classifies


def test_predict_takes_several_images_as_multipart(server: ThreadServer, images: list[Path]):
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in images]
    r = http().post(f"{server.url}/predict", files=files, params={"top_k": 1})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [p.name for p in images]
    assert [p["top_k"][0]["label"] for p in preds] == [p.parent.name for p in images]


def test_http_accuracy_matches_local_predictions(server: ThreadServer, images: list[Path]):
    local = predict_files(server.service.model.path, images, top_k=1)
    local_acc = np.mean([r["top_k"][0]["label"] == p.parent.name for r, p in zip(local, images)])
    got = http_accuracy(server.url, [(p, p.parent.name) for p in images], batch_size=4)
    assert got["n"] == len(images) and got["accuracy"] == local_acc == 1.0


def test_predict_files_reports_bad_images_and_formats(model_file: Path, images: list[Path], tmp_path: Path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    results = predict_files(model_file, [images[0], bad], top_k=2)
    assert len(results[0]["top_k"]) == 2 and results[1]["reason"] == "not_an_image"
    assert json.loads(results_json(results))[1]["image"] == str(bad)
    assert results_table(results).row_count == 3


def test_predict_command_prints_json_and_exits_1_on_an_unusable_image(model_file: Path, images: list[Path],
                                                                     tmp_path: Path):
    from typer.testing import CliRunner

    from tlops.cli import app

    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    runner = CliRunner()
    ok = runner.invoke(app, ["predict", "--model", str(model_file), "--json", "-k", "2", str(images[0])])
    assert ok.exit_code == 0, ok.output
    [result] = json.loads(ok.stdout)
    assert result["top_k"][0]["label"] == images[0].parent.name and len(result["top_k"]) == 2

    mixed = runner.invoke(app, ["predict", "--model", str(model_file), "--json", str(images[0]), str(bad)])
    assert mixed.exit_code == 1
    good, broken = json.loads(mixed.stdout)
    assert "top_k" in good and broken["reason"] == "not_an_image" and "notes.jpg" in broken["error"]


def test_concurrent_requests_are_micro_batched(server: ThreadServer, images: list[Path]):
    before = http().get(f"{server.url}/metrics").text
    body = images[0].read_bytes()

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as c:
            rs = await asyncio.gather(*(c.post(f"{server.url}/predict", content=body) for _ in range(16)))
        return [r.status_code for r in rs]

    assert asyncio.run(burst()) == [200] * 16
    after = http().get(f"{server.url}/metrics").text
    batches = metric_value(after, "tlops_batch_size_count") - metric_value(before, "tlops_batch_size_count")
    samples = metric_value(after, "tlops_batch_size_sum") - metric_value(before, "tlops_batch_size_sum")
    assert samples == 16 and batches < 16  # some runs carried more than one request


def test_metrics_count_requests_latency_batches_and_model(server: ThreadServer, images: list[Path]):
    http().post(f"{server.url}/predict", content=images[0].read_bytes())
    http().post(f"{server.url}/predict", content=b"")
    text = http().get(f"{server.url}/metrics").text
    assert metric_value(text, "tlops_http_requests_total", route="/predict", status="200") >= 1
    assert metric_value(text, "tlops_http_requests_total", route="/predict", status="400") >= 1
    assert metric_value(text, "tlops_http_request_duration_seconds_count", route="/predict") >= 2
    assert metric_value(text, "tlops_batch_size_count") >= 1
    assert metric_value(text, "tlops_model_info", version=server.service.model.version) == 1
    assert metric_value(text, "tlops_model_ready") == 1


# ---- bad input: every case answers its 4xx, never 500, and the service stays ready -------------------------

def _png(size: int = 24) -> bytes:
    return png_bytes(np.full((size, size, 3), 120, np.uint8))


def _bomb() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")  # 9 Mpx in ~9 kB, over the test's max_pixels (1 Mpx)
    return buf.getvalue()


def _chunks(total: int):
    for _ in range(total // 10_000):
        yield b"\0" * 10_000


def _fp32(shape=(1, 3, 32, 32)) -> np.ndarray:
    return np.zeros(shape, np.float32)


def _u8(shape=(8, 8, 3)) -> np.ndarray:
    return np.zeros(shape, np.uint8)


INFER = "/v2/models/model/infer"
BAD_INPUTS = {
    # /predict images
    "zero-byte image": ("post", "/predict", {"content": b""}, 400, "empty_file"),
    "not an image": ("post", "/predict", {"content": b"hello, I am text"}, 415, "not_an_image"),
    "truncated png": ("post", "/predict", {"content": _png(64)[:-40]}, 400, None),
    "garbage after png signature": ("post", "/predict", {"content": b"\x89PNG\r\n\x1a\n" + b"\x07" * 200},
                                    (400, 415), None),
    "decompression bomb": ("post", "/predict", {"content": _bomb()}, 400, "too_many_pixels"),
    "multipart without files": ("post", "/predict", {"content": b'--B\r\nContent-Disposition: form-data; name="a"'
                                                                b'\r\n\r\nb\r\n--B--\r\n',
                                                     "headers": {"content-type": "multipart/form-data; boundary=B"}},
                                400, None),
    "malformed multipart": ("post", "/predict", {"content": b"\x00garbage",
                                                 "headers": {"content-type": "multipart/form-data; boundary=B"}},
                            400, None),
    "multipart with one bad file": ("post", "/predict", {"files": [("file", ("ok.png", _png(), "image/png")),
                                                                   ("file", ("bad.png", b"nope", "image/png"))]},
                                    415, "not_an_image"),
    "top_k not a number": ("post", "/predict?top_k=abc", {"content": _png()}, 400, None),
    "top_k zero": ("post", "/predict?top_k=0", {"content": _png()}, 400, None),
    "body over limit with length": ("post", "/predict", {"content": b"\0" * 300_000}, 413, "body_too_large"),
    "body over limit chunked": ("post", "/predict", {"content": _chunks(300_000)}, 413, "body_too_large"),
    "infer body over limit chunked": ("post", INFER, {"content": _chunks(300_000)}, 413, "body_too_large"),
    "wrong method": ("get", "/predict", {}, 405, None),
    "unknown route": ("get", "/nope", {}, 404, None),
    # unknown model / version
    "unknown model metadata": ("get", "/v2/models/other", {}, 404, None),
    "unknown model ready": ("get", "/v2/models/other/ready", {}, 404, None),
    "unknown model infer": ("post", "/v2/models/other/infer", {"json": infer_body("input", _fp32(), "FP32")},
                            404, None),
    "unknown version": ("get", "/v2/models/model/versions/000000000000", {}, 404, None),
    # /infer tensors
    "malformed json": ("post", INFER, {"content": b'{"inputs": [}'}, 400, None),
    "json not an object": ("post", INFER, {"json": [1, 2]}, 400, None),
    "no inputs": ("post", INFER, {"json": {"id": "x"}}, 400, None),
    "two inputs": ("post", INFER, {"json": {"inputs": infer_body("input", _fp32(), "FP32")["inputs"] * 2}}, 400, None),
    "unknown input name": ("post", INFER, {"json": infer_body("pixels", _fp32(), "FP32")}, 400, None),
    "wrong dtype": ("post", INFER, {"json": infer_body("input", _fp32(), "INT32")}, 400, None),
    "wrong shape": ("post", INFER, {"json": infer_body("input", _fp32((1, 3, 16, 16)), "FP32")}, 400, None),
    "nchw as nhwc": ("post", INFER, {"json": infer_body("input", _fp32((1, 32, 32, 3)), "FP32")}, 400, None),
    "data size mismatch": ("post", INFER, {"json": {"inputs": [{"name": "input", "shape": [1, 3, 32, 32],
                                                               "datatype": "FP32", "data": [0.0] * 10}]}}, 400, None),
    "ragged data": ("post", INFER, {"json": {"inputs": [{"name": "image", "shape": [2, 2, 3], "datatype": "UINT8",
                                                        "data": [[[1, 2, 3], [1, 2]], [[1, 2, 3], [4, 5, 6]]]}]}},
                    400, None),
    "string data": ("post", INFER, {"json": {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                                        "data": ["a"] * 3072}]}}, 400, None),
    "nan data": ("post", INFER, {"content": json.dumps(infer_body("input", _fp32(), "FP32"))
                 .replace("0.0", "NaN", 1).encode()}, 400, None),
    "uint8 out of range": ("post", INFER, {"json": {"inputs": [{"name": "image", "shape": [1, 1, 3],
                                                               "datatype": "UINT8", "data": [0, 300, 0]}]}}, 400, None),
    "uint8 floats": ("post", INFER, {"json": {"inputs": [{"name": "image", "shape": [1, 1, 3], "datatype": "UINT8",
                                                         "data": [0.5, 1.0, 2.0]}]}}, 400, None),
    "uint8 two channels": ("post", INFER, {"json": infer_body("image", _u8((8, 8, 2)), "UINT8")}, 400, None),
    "uint8 huge declared image": ("post", INFER, {"json": {"inputs": [{"name": "image", "shape": [5000, 5000, 3],
                                                                      "datatype": "UINT8", "data": [0]}]}}, 400, None),
    "uint8 as fp32 name": ("post", INFER, {"json": infer_body("image", _fp32(), "FP32")}, 400, None),
    "negative shape": ("post", INFER, {"json": {"inputs": [{"name": "input", "shape": [-1, 3, 32, 32],
                                                           "datatype": "FP32", "data": []}]}}, 400, None),
    "missing data": ("post", INFER, {"json": {"inputs": [{"name": "input", "shape": [1, 3, 32, 32],
                                                         "datatype": "FP32"}]}}, 400, None),
    "unknown output": ("post", INFER, {"json": infer_body("input", _fp32(), "FP32", outputs=[{"name": "probs"}])},
                       400, None),
    "binary_data not a bool": ("post", INFER, {"json": infer_body("input", _fp32(), "FP32", outputs=[
        {"name": "logits", "parameters": {"binary_data": "yes"}}])}, 400, None),
    "id not a string": ("post", INFER, {"json": infer_body("input", _fp32(), "FP32", id=7)}, 400, None),
}


def send(server: ThreadServer, case: tuple) -> httpx.Response:
    method, path, kwargs, _, _ = case
    if "content" in kwargs and not isinstance(kwargs["content"], bytes):
        kwargs = {**kwargs, "content": _chunks(300_000)}  # a generator is spent after one use
    return http().request(method, f"{server.url}{path}", **kwargs)


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_answers_4xx_with_a_message(server: ThreadServer, name: str):
    r = send(server, BAD_INPUTS[name])
    expected, reason = BAD_INPUTS[name][3:]
    assert r.status_code in (expected if isinstance(expected, tuple) else (expected,)), r.text
    body = r.json()
    assert body["error"]
    if reason:
        assert body["reason"] == reason
    if "chunked" in name:
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"


def test_service_stays_ready_and_never_answered_5xx_after_bad_inputs(server: ThreadServer, images: list[Path]):
    def served_5xx() -> float:  # readiness answered 503 while the model loaded: count only what follows
        text = http().get(f"{server.url}/metrics").text
        return sum(metric_value(text, "tlops_http_requests_total", status=str(s)) for s in range(500, 600))

    before = served_5xx()
    for case in BAD_INPUTS.values():
        assert send(server, case).status_code < 500
    assert http().get(f"{server.url}/v2/health/ready").status_code == 200
    assert http().post(f"{server.url}/predict", content=images[0].read_bytes()).status_code == 200
    assert served_5xx() == before
