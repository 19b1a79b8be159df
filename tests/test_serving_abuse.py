"""The service against hostile clients, on loopback with bounded loops: amplification, many tiny samples, decompression
bombs, work past the deadline, and fuzzed requests of every wire format. Each asserts statuses and bounds on response
bytes and the server's memory (RSS), never wall time; bench/serving_abuse.py prints the same probes' figures."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serving_support import (
    ThreadServer,
    export_tiny_model,
    free_port,
    http,
    png_bytes,
    process_server,
    serve_params,
    wait_for,
)

from serving import grpc_codec
from tlops.inputs.images import PreprocessSpec

MODEL = "model"
MIB = 2**20
IMAGE = png_bytes(np.full((24, 24, 3), (30, 200, 30), np.uint8))
TINY_BATCH = {"name": "image", "datatype": "UINT8", "shape": [256, 1, 1, 3], "data": [128] * 768}  # 2.4 kB, 256 samples


def bomb_png(side: int = 6000) -> bytes:
    """A side x side grey PNG of zeros: ~35 kB that decode to side^2 pixels."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint8)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def tiff16(side: int = 2000) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint16)).save(buf, "TIFF", compression="tiff_deflate")
    return buf.getvalue()


def multipart(files: list[bytes]) -> dict:
    return {"files": [("file", (f"f{i}", data, "application/octet-stream")) for i, data in enumerate(files)]}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("model") / f"{MODEL}.onnx")


@pytest.fixture(scope="module")
def server(model: Path):
    params = serve_params(grpc_port=free_port(), max_body_bytes=20_000_000, timeout_ms=2000, max_queue=256)
    with ThreadServer(params, str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        yield s


def infer(s: ThreadServer, body: dict | bytes, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http().post(f"{s.url}/v2/models/{MODEL}/infer", content=content, **kw)


def test_each_output_once_a_repeated_one_is_refused_before_any_work(server: ThreadServer):
    body = {"inputs": [TINY_BATCH], "outputs": [{"name": "probabilities"}] * 20_000}
    r = infer(server, body)
    assert r.status_code == 400 and r.json()["reason"] == "repeated_output" and len(r.content) < 500
    m = grpc_codec.messages()
    req = m["ModelInferRequest"](model_name=MODEL, outputs=[m["ModelInferRequest"].InferRequestedOutputTensor(
        name="probabilities")] * 1000)
    req.inputs.add(name="image", datatype="UINT8", shape=[1, 1, 1, 3])
    req.raw_input_contents.append(bytes(3))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = channel.unary_unary(f"/{grpc_codec.SERVICE}/ModelInfer", request_serializer=m["ModelInferRequest"].SerializeToString,
                                   response_deserializer=m["ModelInferResponse"].FromString)
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than once" in e.value.details()


def test_a_request_of_bombs_is_refused_from_the_headers_before_any_decode(server: ThreadServer):
    bombs = multipart([bomb_png()] * 200)  # 7 MB that would decode to 7.2 billion pixels
    r = http().post(f"{server.url}/predict", **bombs)
    assert r.status_code == 413 and r.json()["reason"] == "too_many_pixels"
    tiffs = multipart([tiff16()] * 50)  # 16-bit: each would be 4 M float values before the intensity rule
    r = http().post(f"{server.url}/predict", **tiffs)
    assert r.status_code == 413 and r.json()["reason"] == "too_many_pixels"
    assert http().post(f"{server.url}/predict", content=IMAGE).status_code == 200


def test_a_format_outside_the_allowlist_is_not_an_image(server: ThreadServer):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, "ICO")
    for data in (eps, ico.getvalue()):
        r = http().post(f"{server.url}/predict", content=data)
        assert r.status_code == 415 and r.json()["reason"] == "not_an_image"


def test_decoding_stops_at_the_deadline_and_the_next_request_is_served(model: Path):
    """Four requests whose images pass every size check but take far longer than timeout_ms to decode: each is
    answered 504, and the decoding threads are free after, so a plain request right then is answered (it would time
    out behind the abandoned work otherwise)."""
    big = bomb_png(4000)
    params = serve_params(max_body_bytes=20_000_000, timeout_ms=1000, max_request_pixels=10**10,
                          max_pixels=20_000_000)
    with ThreadServer(params, str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        with ThreadPoolExecutor(4) as pool:
            slow = list(pool.map(lambda _: httpx.post(f"{s.url}/predict", timeout=60, **multipart([big] * 40)),
                                 range(4)))
        assert [r.status_code for r in slow] == [504] * 4
        assert http().post(f"{s.url}/predict", content=IMAGE).status_code == 200


@pytest.mark.slow
def test_a_burst_of_tiny_samples_stays_within_the_budget_and_memory_returns(tmp_path: Path):
    """32 clients x 4 requests of 256 1x1 images (2.4 kB each on the wire, 256 model inputs of 160 px in memory, 79 MB
    a request): every answer 200 or 503, the server's RSS peak at most 300 MiB above idle, a 33rd client served
    meanwhile, and RSS back within 100 MiB of idle after."""
    spec = PreprocessSpec(input_size=160, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    model = export_tiny_model(tmp_path / "model.onnx", spec=spec)
    cfg = tmp_path / "params.yaml"
    cfg.write_text(yaml.safe_dump({"serve": {"reload_s": 0, "grpc_port": None, "drift_window": 0}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process_server(cfg, str(model), port, cwd=tmp_path) as proc:
        wait_for(f"{url}/v2/health/ready", timeout=60)
        body = json.dumps({"inputs": [TINY_BATCH]}).encode()
        httpx.post(f"{url}/v2/models/{MODEL}/infer", content=body, timeout=60)  # warm: every code path loaded
        server = psutil.Process(proc.pid)
        time.sleep(1)
        idle = server.memory_info().rss
        peak, done = idle, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, server.memory_info().rss)
                time.sleep(0.01)

        def client(_: int) -> list[int]:
            with httpx.Client(timeout=120) as c:
                return [c.post(f"{url}/v2/models/{MODEL}/infer", content=body).status_code for _ in range(4)]

        sampler = threading.Thread(target=sample)
        sampler.start()
        with ThreadPoolExecutor(32) as pool:
            burst = pool.map(client, range(32))
            time.sleep(0.3)
            plain = httpx.post(f"{url}/predict", content=IMAGE, timeout=120)  # the 33rd client, meanwhile
            statuses = [s for answers in burst for s in answers]
        done.set()
        sampler.join()
        after, deadline = server.memory_info().rss, time.monotonic() + 20
        while after > idle + 100 * MIB and time.monotonic() < deadline:
            time.sleep(0.5)
            after = server.memory_info().rss
    print(f"burst: {statuses.count(200)} x 200, {statuses.count(503)} x 503; RSS idle {idle / MIB:.0f} MiB, peak "
          f"+{(peak - idle) / MIB:.0f} MiB, after +{(after - idle) / MIB:.0f} MiB")
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 4 and plain.status_code == 200
    assert peak - idle <= 300 * MIB, f"peak {(peak - idle) / MIB:.0f} MiB over idle"
    assert after - idle <= 100 * MIB, f"{(after - idle) / MIB:.0f} MiB over idle after the burst"


# ---------------------------------------------------------------- fuzzing: every answer 2xx or 4xx

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
NAMES = st.sampled_from(["input", "image", "image_bytes", "text", "logits", "probabilities", "label", "", "x" * 300])
DATATYPES = st.sampled_from(["FP32", "UINT8", "INT64", "BYTES", "FP16", "BOOL", "fp32", "STRING", ""])
SHAPES = st.lists(st.integers(-3, 2**64), max_size=5) | st.lists(st.integers(0, 40), min_size=1, max_size=4)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def tensor_json() -> st.SearchStrategy:
    return st.fixed_dictionaries({"name": NAMES, "datatype": DATATYPES, "shape": SHAPES | JSON_VALUES},
                                 optional={"data": st.lists(st.integers(-300, 300) | st.floats(-2, 2) | st.text(),
                                                            max_size=64) | JSON_VALUES,
                                           "parameters": JSON_VALUES | st.fixed_dictionaries(
                                               {"binary_data_size": st.integers(-5, 100) | JSON_VALUES})})


REQUESTS = st.fixed_dictionaries({}, optional={
    "inputs": st.lists(tensor_json(), max_size=3) | JSON_VALUES,
    "outputs": st.lists(st.fixed_dictionaries({"name": NAMES}, optional={"parameters": JSON_VALUES}), max_size=4)
    | JSON_VALUES,
    "parameters": JSON_VALUES | st.fixed_dictionaries({"binary_data_output": JSON_VALUES}),
    "id": JSON_VALUES})


@FUZZ
@given(body=REQUESTS)
def test_fuzzed_v2_json_requests_get_2xx_or_4xx(server: ThreadServer, body: dict):
    r = infer(server, body)
    assert r.status_code < 500, (body, r.text)


@FUZZ
@given(header=REQUESTS, blob=st.binary(max_size=400), length=st.one_of(st.none(), st.integers(-2, 500),
                                                                        st.from_regex(r"[0-9+\-x]{1,20}", fullmatch=True)))
def test_fuzzed_v2_binary_requests_get_2xx_or_4xx(server: ThreadServer, header: dict, blob: bytes, length):
    head = json.dumps(header).encode()
    value = str(len(head)) if length is None else str(length)
    r = infer(server, head + blob, headers={"inference-header-content-length": value})
    assert r.status_code < 500, (header, r.text)


@FUZZ
@given(path=st.sampled_from(["/predict", "/predict?top_k=3", "/predict?top_k=\u00b2", "/predict?top_k=99999999999"]),
       blob=st.binary(max_size=300) | st.sampled_from([IMAGE, IMAGE[:40], b"\x89PNG\r\n\x1a\n" + bytes(50)]),
       ctype=st.sampled_from(["application/octet-stream", "multipart/form-data; boundary=B", "text/plain",
                              "application/json"]))
def test_fuzzed_predict_requests_get_2xx_or_4xx(server: ThreadServer, path: str, blob: bytes, ctype: str):
    r = http().post(f"{server.url}{path}", content=blob, headers={"content-type": ctype})
    assert r.status_code < 500, r.text


@FUZZ
@given(inputs=st.lists(st.tuples(NAMES, DATATYPES, st.lists(st.integers(0, 2**63 - 1), max_size=4)
                                 | st.lists(st.integers(0, 8), min_size=1, max_size=4), st.binary(max_size=200)),
                       max_size=3),
       outputs=st.lists(NAMES, max_size=3), raw=st.booleans())
def test_fuzzed_grpc_requests_get_a_client_status(server: ThreadServer, inputs: list, outputs: list, raw: bool):
    m = grpc_codec.messages()
    req = m["ModelInferRequest"](model_name=MODEL)
    for name, dtype, shape, blob in inputs:
        t = req.inputs.add(name=name, datatype=dtype, shape=shape)
        if raw:
            req.raw_input_contents.append(blob)
        else:
            t.contents.bytes_contents.append(blob)
    for name in outputs:
        req.outputs.add(name=name)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = channel.unary_unary(f"/{grpc_codec.SERVICE}/ModelInfer",
                                   request_serializer=m["ModelInferRequest"].SerializeToString,
                                   response_deserializer=m["ModelInferResponse"].FromString)
        try:
            call(req, timeout=30)
        except grpc.RpcError as e:
            assert e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), e.details()


def test_the_service_is_ready_and_answered_no_5xx_after_the_fuzzing(server: ThreadServer):
    from serving_support import metric_value

    assert http().get(f"{server.url}/v2/health/ready").status_code == 200
    assert http().post(f"{server.url}/predict", content=IMAGE).status_code == 200
    text = http().get(f"{server.url}/metrics").text
    total = sum(metric_value(text, "tlops_http_requests_total", status=str(s)) for s in range(500, 600))
    loading = metric_value(text, "tlops_http_requests_total", route="/v2/health/ready", status="503")  # at startup
    assert total - loading == 0


def test_binary_header_length_past_the_body_and_bytes_elements_past_their_data_are_400(server: ThreadServer):
    head = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    blob = struct.pack("<I", 2**31) + b"abcd"  # element 0 declares 2 GiB
    r = infer(server, head + blob, headers={"inference-header-content-length": str(len(head))})
    assert r.status_code == 400
