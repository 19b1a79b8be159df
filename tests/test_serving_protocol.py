"""The v2 protocol as real clients speak it: Triton's HTTP client with its defaults (binary tensor data), the binary
extension byte by byte, gRPC through tritonclient.grpc and a bare grpcio stub, on one real server (HTTP + gRPC)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from conftest import make_images
from serving_support import SPEC, ThreadServer, export_tiny_model, free_port, http, metric_value, serve_params, wait_for
from tritonclient.utils import InferenceServerException

from serving import grpc_codec
from tlops.inputs.images import load_image, preprocess

MODEL = "model"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("images"), classes=3, per_class=2, size=24)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, images: list[Path]):
    model = export_tiny_model(tmp_path_factory.mktemp("model") / f"{MODEL}.onnx", reference_images=images)
    with ThreadServer(serve_params(grpc_port=free_port(), max_wait_ms=20), str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        yield s


@pytest.fixture(scope="module")
def triton_http(server: ThreadServer):
    client = thttp.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def triton_grpc(server: ThreadServer):
    client = tgrpc.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


def fp32_of(path: Path) -> np.ndarray:
    return preprocess(load_image(path, 10**6), SPEC)[None]


def json_logits(server: ThreadServer, name: str, array: np.ndarray, datatype: str) -> np.ndarray:
    body = {"inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype,
                        "data": array.ravel().tolist()}]}
    r = http().post(f"{server.url}/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


# ---------------------------------------------------------------- tritonclient.http, default arguments


def test_triton_http_client_health_and_metadata(triton_http):
    assert triton_http.is_server_live() and triton_http.is_server_ready() and triton_http.is_model_ready(MODEL)
    assert "binary_tensor_data" in triton_http.get_server_metadata()["extensions"]
    meta = triton_http.get_model_metadata(MODEL)
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "label", "label_index", "embedding"]
    assert {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]


def test_triton_http_default_binary_fp32_uint8_int64_and_bytes_inputs_match_json(server, triton_http, images):
    path = images[0]
    x, pixels = fp32_of(path), np.asarray(load_image(path, 10**6))[None]
    expected = json_logits(server, "input", x, "FP32")
    cases = [("input", x, "FP32"), ("image", pixels, "UINT8"), ("image", pixels.astype(np.int64), "INT64"),
             ("image_bytes", np.array([path.read_bytes()], dtype=object), "BYTES")]
    for name, array, datatype in cases:
        inp = thttp.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)  # binary_data=True: the client's default
        result = triton_http.infer(MODEL, [inp])  # no outputs named: the client asks for binary outputs
        np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4, err_msg=f"{name} {datatype}")


def test_triton_http_requested_outputs_binary_and_json(triton_http, images):
    x = np.concatenate([fp32_of(p) for p in images])
    inp = thttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    names = ["logits", "probabilities", "label", "label_index", "embedding"]
    for binary in (True, False):
        result = triton_http.infer(MODEL, [inp], outputs=[thttp.InferRequestedOutput(n, binary_data=binary)
                                                          for n in names])
        logits, probs = result.as_numpy("logits"), result.as_numpy("probabilities")
        assert logits.shape == probs.shape == (len(images), 3)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        assert result.as_numpy("label_index").dtype == np.int64
        assert list(result.as_numpy("label_index")) == list(logits.argmax(1))
        labels = [v.decode() if isinstance(v, bytes) else str(v) for v in result.as_numpy("label")]
        assert labels == [p.parent.name for p in images]
        assert result.as_numpy("embedding").shape == (len(images), 3)


def test_mixed_binary_and_json_inputs_answer_in_input_order(server, triton_http, images):
    a, b = fp32_of(images[0]), np.asarray(load_image(images[3], 10**6))[None]
    first = thttp.InferInput("input", list(a.shape), "FP32").set_data_from_numpy(a)  # binary
    second = thttp.InferInput("image", list(b.shape), "UINT8").set_data_from_numpy(b, binary_data=False)  # JSON
    result = triton_http.infer(MODEL, [first, second], outputs=[thttp.InferRequestedOutput("logits")])
    logits = result.as_numpy("logits")
    assert logits.shape == (2, 3)
    np.testing.assert_allclose(logits[0], json_logits(server, "input", a, "FP32")[0], atol=1e-4)
    np.testing.assert_allclose(logits[1], json_logits(server, "image", b, "UINT8")[0], atol=1e-4)


# ---------------------------------------------------------------- the binary extension, byte by byte


def binary_request(inputs: list[dict], blobs: list[bytes], header_length: int | str | bytes | None = None,
                   **extra) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": inputs, **extra}).encode()
    length = len(header) if header_length is None else header_length
    return header + b"".join(blobs), {"Inference-Header-Content-Length": length if isinstance(length, bytes)
                                      else str(length),
                                      "Content-Type": "application/octet-stream"}


X = np.zeros((1, 3, 32, 32), np.float32)
FP32_IN = {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "parameters": {"binary_data_size": X.nbytes}}


def test_binary_output_body_is_json_header_then_raw_tensors(server):
    body, headers = binary_request([FP32_IN], [X.tobytes()], parameters={"binary_data_output": True})
    r = http().post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    size = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:size])
    [out] = head["outputs"]
    assert out["parameters"]["binary_data_size"] == 12 and "data" not in out
    logits = np.frombuffer(r.content[size:], "<f4")
    np.testing.assert_allclose(logits, json_logits(server, "input", X, "FP32").ravel(), atol=1e-6)


def _bytes_tensor(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


MALFORMED = {
    "header length not a number": ([FP32_IN], [X.tobytes()], "abc"),
    "header length negative": ([FP32_IN], [X.tobytes()], "-5"),
    "header length past the body": ([FP32_IN], [X.tobytes()], 10**9),
    "header length zero": ([FP32_IN], [X.tobytes()], 0),
    "header length cuts the json": ([FP32_IN], [X.tobytes()], 10),
    "sizes do not add up (extra bytes)": ([FP32_IN], [X.tobytes(), b"\0" * 16], None),
    "size beyond the body": ([FP32_IN], [X.tobytes()[:100]], None),
    "negative size": ([{**FP32_IN, "parameters": {"binary_data_size": -4}}], [X.tobytes()], None),
    "size not an integer": ([{**FP32_IN, "parameters": {"binary_data_size": "12288"}}], [X.tobytes()], None),
    "size does not fit the shape": ([{**FP32_IN, "shape": [2, 3, 32, 32]}], [X.tobytes()], None),
    "data and binary both": ([{**FP32_IN, "data": [0.0]}], [X.tobytes()], None),
    "bytes element past the end": ([{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 8}}], [struct.pack("<I", 100) + b"abcd"], None),
    "bytes elements fewer than the shape": ([{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                                              "parameters": {"binary_data_size": 7}}], [_bytes_tensor(b"abc")], None),
    "too many samples": ([{"name": "image", "datatype": "UINT8", "shape": [1000, 1, 1, 3],
                           "parameters": {"binary_data_size": 3000}}], [b"\0" * 3000], None),
    "header length not ascii digits": ([FP32_IN], [X.tobytes()], b"\xb2"),  # "²": a digit to str.isdigit
    "bytes not an image": ([{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                             "parameters": {"binary_data_size": 9}}], [_bytes_tensor(b"hello")], None),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_binary_requests_answer_4xx_and_the_service_stays_ready(server, case):
    inputs, blobs, length = MALFORMED[case]
    body, headers = binary_request(inputs, blobs, length)
    r = http().post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert r.status_code in (400, 415), r.text
    assert r.json()["error"]
    assert http().get(f"{server.url}/v2/health/ready").status_code == 200


def test_binary_data_size_without_the_header_is_refused(server):
    r = http().post(f"{server.url}/v2/models/{MODEL}/infer", content=json.dumps({"inputs": [FP32_IN]}).encode())
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]


# ---------------------------------------------------------------- gRPC


def test_triton_grpc_client_with_defaults(server, triton_grpc, images):
    assert triton_grpc.is_server_live() and triton_grpc.is_server_ready() and triton_grpc.is_model_ready(MODEL)
    assert "binary_tensor_data" in triton_grpc.get_server_metadata().extensions
    meta = triton_grpc.get_model_metadata(MODEL)
    assert meta.name == MODEL and meta.platform == "onnxruntime_onnx"
    assert [o.name for o in meta.outputs][:2] == ["logits", "probabilities"]
    path = images[1]
    x, pixels = fp32_of(path), np.asarray(load_image(path, 10**6))[None]
    expected = json_logits(server, "input", x, "FP32")
    for name, array, datatype in [("input", x, "FP32"), ("image", pixels, "UINT8"),
                                  ("image_bytes", np.array([path.read_bytes()], dtype=object), "BYTES")]:
        inp = tgrpc.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        result = triton_grpc.infer(MODEL, [inp])
        np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4, err_msg=name)
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = triton_grpc.infer(MODEL, [inp], outputs=[tgrpc.InferRequestedOutput("label"),
                                                       tgrpc.InferRequestedOutput("label_index")],
                               request_id="r-1")
    assert result.as_numpy("label")[0] == path.parent.name.encode()
    assert result.get_response().id == "r-1"


def test_grpc_errors_map_to_status_codes_and_share_the_metrics(server, triton_grpc):
    inp = tgrpc.InferInput("input", [1, 3, 16, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(InferenceServerException) as bad_shape:
        triton_grpc.infer(MODEL, [inp])
    assert bad_shape.value.status() == "StatusCode.INVALID_ARGUMENT" and "shape" in bad_shape.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        triton_grpc.get_model_metadata("other")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    text = http().get(f"{server.url}/metrics").text
    route = "/inference.GRPCInferenceService/ModelInfer"
    assert metric_value(text, "tlops_http_requests_total", route=route, status="200") >= 1
    assert metric_value(text, "tlops_http_requests_total", route=route, status="400") >= 1
    assert http().get(f"{server.url}/v2/health/ready").status_code == 200


def test_bare_grpcio_stub_with_typed_contents(server, images):
    m = grpc_codec.messages()
    x = fp32_of(images[2])
    request = m["ModelInferRequest"](model_name=MODEL)
    t = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="label_index")
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = channel.unary_unary(f"/{grpc_codec.SERVICE}/ModelInfer",
                                   request_serializer=m["ModelInferRequest"].SerializeToString,
                                   response_deserializer=m["ModelInferResponse"].FromString)
        response = call(request, timeout=10)
        assert response.outputs[0].name == "label_index" and list(response.outputs[0].shape) == [1]
        assert np.frombuffer(response.raw_output_contents[0], "<i8")[0] == int(images[2].parent.name[-1])
        too_big = m["ModelInferRequest"](model_name=MODEL, raw_input_contents=[b"\0" * 300_000])
        too_big.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
        with pytest.raises(grpc.RpcError) as e:
            call(too_big, timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # serve.max_body_bytes holds for gRPC too


def test_the_proto_descriptor_is_compiled_from_the_proto_file(tmp_path: Path):
    """serving/proto/grpc_predict_v2.binpb must be what protoc makes of grpc_predict_v2.proto (`make proto`)."""
    grpc_tools = pytest.importorskip("grpc_tools.protoc")
    proto = grpc_codec.DESCRIPTOR.with_suffix(".proto")
    out = tmp_path / "out.binpb"
    assert grpc_tools.main(["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}", str(proto)]) == 0
    assert out.read_bytes() == grpc_codec.DESCRIPTOR.read_bytes()


def test_proto_fields_agree_with_triton_clients_messages():
    """Field names and numbers of every message we share with Triton's gRPC client (wire compatibility)."""
    from tritonclient.grpc import service_pb2

    def fields(desc, prefix=""):
        out = {f"{prefix}{f.name}": (f.number, f.type) for f in desc.fields}
        for nested in desc.nested_types:
            out.update(fields(nested, f"{prefix}{nested.name}."))
        return out

    for name, cls in grpc_codec.messages().items():
        ours, theirs = fields(cls.DESCRIPTOR), fields(getattr(service_pb2, name).DESCRIPTOR)
        assert {k: theirs.get(k) for k in ours} == ours, name
