"""Who may call the service and what it tells them: API keys per route group (HTTP and gRPC, through tritonclient with
`headers=`), TLS and mutual TLS with certificates made here, Host and Origin checks, slow senders, and nothing leaked
(no password of a registry URI, no DICOM header value, no server path) to a client or a log line."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from conftest import make_images
from serving_support import (
    ThreadServer,
    export_tiny_model,
    free_port,
    http,
    make_certs,
    png_bytes,
    serve_params,
    text_rows_dicom,
    wait_for,
)
from tritonclient.utils import InferenceServerException

from serving import grpc_codec
from tlops.inputs.images import load_image, preprocess

KEY = "k" * 8 + "-test-key-0123456789"
MODEL = "model"
IMAGE = png_bytes(np.full((24, 24, 3), (200, 30, 30), np.uint8))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("model") / f"{MODEL}.onnx")


@pytest.fixture(scope="module")
def keyed(model: Path, monkeypatch_module) -> ThreadServer:
    monkeypatch_module.setenv("TLOPS_TEST_KEY", KEY)
    with ThreadServer(serve_params(api_key_env="TLOPS_TEST_KEY", grpc_port=free_port()), str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        yield s


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


ROUTES = {  # route group -> (method, path, request kwargs)
    "inference": [("post", "/predict", {"content": IMAGE}),
                  ("post", f"/v2/models/{MODEL}/infer", {"json": {"inputs": [
                      {"name": "image", "datatype": "UINT8", "shape": [2, 2, 3], "data": [1] * 12}]}})],
    "metadata": [("get", "/v2", {}), ("get", f"/v2/models/{MODEL}", {})],
    "metrics": [("get", "/metrics", {})],
    "drift": [("get", "/drift", {})],
    "health": [("get", "/v2/health/live", {}), ("get", "/v2/health/ready", {}), ("get", f"/v2/models/{MODEL}/ready", {})],
}


def call(server: ThreadServer, method: str, path: str, kwargs: dict, key: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return getattr(http(), method)(f"{server.url}{path}", headers=headers, **kwargs)


@pytest.mark.parametrize("group", sorted(ROUTES))
def test_a_key_guards_every_route_group_and_health_stays_open(keyed: ThreadServer, group: str):
    for method, path, kwargs in ROUTES[group]:
        without, wrong, right = (call(keyed, method, path, kwargs, k) for k in (None, KEY[:-1] + "x", KEY))
        assert right.status_code == 200, right.text
        if group == "health":
            assert without.status_code == wrong.status_code == 200
        else:
            assert without.status_code == wrong.status_code == 401
            assert without.headers["www-authenticate"].startswith("Bearer")
            assert KEY not in without.text and KEY not in wrong.text


def test_only_the_groups_named_in_api_key_routes_need_the_key(model: Path, monkeypatch):
    monkeypatch.setenv("TLOPS_TEST_KEY", KEY)
    with ThreadServer(serve_params(api_key_env="TLOPS_TEST_KEY", api_key_routes=["inference"]), str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        assert [call(s, *ROUTES["metadata"][0], None).status_code, call(s, *ROUTES["metrics"][0], None).status_code,
                call(s, *ROUTES["drift"][0], None).status_code] == [200, 200, 200]
        assert call(s, *ROUTES["inference"][0], None).status_code == 401
        assert call(s, *ROUTES["inference"][0], KEY).status_code == 200


def test_a_key_that_is_missing_or_short_fails_at_startup_naming_the_setting(model: Path, monkeypatch):
    from serving.app import create_app
    from tlops.core.errors import ConfigError

    monkeypatch.delenv("TLOPS_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="TLOPS_NO_SUCH_KEY is not set"):
        create_app(serve_params(api_key_env="TLOPS_NO_SUCH_KEY"), str(model))
    monkeypatch.setenv("TLOPS_SHORT_KEY", "abc")
    with pytest.raises(ConfigError, match="at least 16") as e:
        create_app(serve_params(api_key_env="TLOPS_SHORT_KEY"), str(model))
    assert "abc" not in str(e.value)


def test_tritonclient_http_and_grpc_need_the_key_and_answer_as_before_with_it(keyed: ThreadServer, tmp_path: Path):
    img = make_images(tmp_path, classes=1, per_class=1, size=24)[0]
    x = preprocess(load_image(img, 10**6), keyed.service.model.spec)[None]
    auth = {"authorization": f"Bearer {KEY}"}
    h = thttp.InferenceServerClient(url=keyed.url.removeprefix("http://"))
    hin = thttp.InferInput("input", list(x.shape), "FP32")
    hin.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        h.infer(MODEL, [hin])
    assert "401" in str(e.value.status())
    via_http = h.infer(MODEL, [hin], headers=dict(auth)).as_numpy("logits")  # tritonclient adds to the dict
    g = tgrpc.InferenceServerClient(url=f"127.0.0.1:{keyed.grpc_port}")
    gin = tgrpc.InferInput("input", list(x.shape), "FP32")
    gin.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        g.infer(MODEL, [gin])
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException):
        g.get_model_metadata(MODEL)  # metadata is guarded too
    assert g.is_server_ready() and g.is_model_ready(MODEL)  # health is not
    via_grpc = g.infer(MODEL, [gin], headers=dict(auth)).as_numpy("logits")
    local = keyed.service.model.run(x).logits
    np.testing.assert_allclose(via_http, local, atol=1e-5)
    np.testing.assert_allclose(via_grpc, local, atol=1e-5)
    h.close()
    g.close()


def test_tls_and_mutual_tls_on_http_and_grpc_with_a_certificate_made_here(model: Path, tmp_path: Path, monkeypatch):
    certs = make_certs(tmp_path / "certs")
    monkeypatch.setenv("TLOPS_TEST_KEY", KEY)
    params = serve_params(tls_cert=str(certs["server_cert"]), tls_key=str(certs["server_key"]),
                          grpc_port=free_port(), api_key_env="TLOPS_TEST_KEY")
    trusting = httpx.Client(verify=ssl.create_default_context(cafile=certs["ca"]), timeout=30)
    with ThreadServer(params, str(model), client=trusting) as s:
        wait_for(f"{s.url}/v2/health/ready", client=trusting)
        assert trusting.post(f"{s.url}/predict", content=IMAGE, headers={"authorization": f"Bearer {KEY}"}
                             ).status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port: no answer
            httpx.get(f"http://127.0.0.1:{params.port}/v2/health/live", timeout=5)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA refuses the certificate
            httpx.get(f"{s.url}/v2/health/live", timeout=5)
        h = thttp.InferenceServerClient(url=f"127.0.0.1:{params.port}", ssl=True,
                                        ssl_context_factory=lambda: ssl.create_default_context(cafile=certs["ca"]))
        assert h.is_server_live() and h.get_model_metadata(MODEL, headers={"authorization": f"Bearer {KEY}"})
        h.close()
        g = tgrpc.InferenceServerClient(url=f"127.0.0.1:{s.grpc_port}", ssl=True,
                                        root_certificates=str(certs["ca"]))
        assert g.is_server_ready()
        g.close()
        with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as channel:  # plaintext gRPC to the TLS port
            live = channel.unary_unary(f"/{grpc_codec.SERVICE}/ServerLive",
                                       request_serializer=grpc_codec.messages()["ServerLiveRequest"].SerializeToString,
                                       response_deserializer=grpc_codec.messages()["ServerLiveResponse"].FromString)
            with pytest.raises(grpc.RpcError):
                live(grpc_codec.messages()["ServerLiveRequest"](), timeout=5)
        trusting.close()  # no idle keep-alive connection for the server's graceful shutdown to wait for

    mutual = serve_params(tls_cert=str(certs["server_cert"]), tls_key=str(certs["server_key"]),
                          tls_client_ca=str(certs["ca"]), grpc_port=free_port())
    with_cert = ssl.create_default_context(cafile=certs["ca"])
    with_cert.load_cert_chain(certs["client_cert"], certs["client_key"])
    client = httpx.Client(verify=with_cert, timeout=30)
    with ThreadServer(mutual, str(model), client=client) as s:
        wait_for(f"{s.url}/v2/health/ready", client=client)
        assert client.post(f"{s.url}/predict", content=IMAGE).status_code == 200
        with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
            httpx.get(f"{s.url}/v2/health/live", verify=ssl.create_default_context(cafile=certs["ca"]), timeout=10)
        g = tgrpc.InferenceServerClient(url=f"127.0.0.1:{s.grpc_port}", ssl=True, root_certificates=str(certs["ca"]),
                                        private_key=str(certs["client_key"]),
                                        certificate_chain=str(certs["client_cert"]))
        assert g.is_server_ready()
        g.close()
        g = tgrpc.InferenceServerClient(url=f"127.0.0.1:{s.grpc_port}", ssl=True, root_certificates=str(certs["ca"]))
        with pytest.raises(InferenceServerException):
            g.is_server_ready()
        g.close()
        client.close()


def test_tlops_predict_url_with_a_key_and_tls(model: Path, tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from tlops.cli import app

    certs = make_certs(tmp_path / "certs")
    monkeypatch.setenv("TLOPS_TEST_KEY", KEY)
    params = serve_params(tls_cert=str(certs["server_cert"]), tls_key=str(certs["server_key"]),
                          api_key_env="TLOPS_TEST_KEY")
    img = tmp_path / "red.png"
    img.write_bytes(IMAGE)
    trusting = httpx.Client(verify=ssl.create_default_context(cafile=certs["ca"]), timeout=30)
    with ThreadServer(params, str(model), client=trusting) as s:
        wait_for(f"{s.url}/v2/health/ready", client=trusting)
        args = ["predict", str(img), "--url", s.url, "--ca", str(certs["ca"]), "--json", "--top-k", "1"]
        ok = CliRunner().invoke(app, [*args, "--api-key-env", "TLOPS_TEST_KEY"])
        refused = CliRunner().invoke(app, args)
        trusting.close()
    assert ok.exit_code == 0, ok.output
    assert '"label": "class_0"' in ok.output
    assert refused.exit_code == 1 and "API key" in refused.output and KEY not in refused.output


def test_a_rebinding_host_and_a_foreign_page_are_refused(keyed: ThreadServer):
    url = f"{keyed.url}/v2/health/live"
    assert http().get(url, headers={"host": "attacker.example"}).status_code == 421
    assert http().get(url, headers={"host": f"localhost:{keyed.params.port}"}).status_code == 200
    foreign = {"origin": "http://attacker.example", "content-type": "text/plain"}  # a "simple" request: no preflight
    r = http().post(f"{keyed.url}/predict", content=IMAGE, headers={**foreign, "authorization": f"Bearer {KEY}"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    same = {"origin": keyed.url, "authorization": f"Bearer {KEY}"}  # the service's own page
    assert http().post(f"{keyed.url}/predict", content=IMAGE, headers=same).status_code == 200


def test_cors_answers_only_for_a_configured_origin(model: Path):
    origin = "https://dashboard.example"
    with ThreadServer(serve_params(cors_origins=[origin]), str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        pre = http().options(f"{s.url}/predict", headers={"origin": origin, "access-control-request-method": "POST"})
        assert pre.headers.get("access-control-allow-origin") == origin
        assert http().post(f"{s.url}/predict", content=IMAGE, headers={"origin": origin}).status_code == 200
        assert http().post(f"{s.url}/predict", content=IMAGE,
                           headers={"origin": "https://other.example"}).status_code == 403


def test_slow_headers_and_slow_bodies_lose_their_connection(model: Path):
    with ThreadServer(serve_params(header_timeout_s=1, body_timeout_s=1), str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        with socket.create_connection(("127.0.0.1", s.params.port), timeout=20) as slow:
            slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
            assert slow.recv(1024) == b""  # the server closed it (recv would time out otherwise)
        with socket.create_connection(("127.0.0.1", s.params.port), timeout=20) as slow:
            slow.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n" + IMAGE[:10])
            answer = slow.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer
        assert http().get(f"{s.url}/v2/health/ready").status_code == 200


def test_readiness_of_a_registry_uri_with_a_password_shows_no_password(model: Path, monkeypatch, caplog):
    secret = "s3cr3t-pw-417"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{secret}@127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    caplog.set_level(logging.INFO)
    with ThreadServer(serve_params(), "models:/tlops-classifier@champion") as s:
        r = wait_for(f"{s.url}/v2/health/ready", status=503)
        deadline = time.monotonic() + 30
        while s.service.status == "loading" and time.monotonic() < deadline:  # until the resolve has failed
            time.sleep(0.2)
        answers = [r.text, http().get(f"{s.url}/v2/models/tlops-classifier").text, http().get(f"{s.url}/drift").text]
    assert s.service.status.startswith("no model loaded")
    assert r.json()["error"] == "model not loaded"
    assert not [a for a in answers if secret in a or "127.0.0.1" in a]
    assert "rejected" in caplog.text and secret not in caplog.text


def test_a_dicom_with_a_name_in_rows_is_a_400_and_the_name_is_nowhere(keyed: ThreadServer, caplog, tmp_path: Path):
    name = "DOE^JOHNATHAN"
    data = text_rows_dicom(name)
    assert name.encode() in data
    caplog.set_level(logging.DEBUG)
    auth = {"authorization": f"Bearer {KEY}"}
    r = http().post(f"{keyed.url}/predict", content=data, headers=auth)
    element = struct.pack("<I", len(data)) + data  # BYTES in Triton's binary form
    header = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(element)}}]}).encode()
    v2 = http().post(f"{keyed.url}/v2/models/{MODEL}/infer", content=header + element,
                     headers={**auth, "inference-header-content-length": str(len(header))})
    assert r.status_code == 400 and r.json()["reason"] == "corrupt" and name not in r.text
    assert v2.status_code == 400 and name not in v2.text
    assert name not in caplog.text and "DOE" not in caplog.text
