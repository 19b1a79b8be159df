"""The service over time: readiness, checksums, reloads and swaps under load, overload, SIGTERM, torch-free import."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from serving_support import (
    ROOT,
    ThreadServer,
    export_tiny_model,
    free_port,
    http,
    install_model,
    metric_value,
    png_bytes,
    process_server,
    serve_params,
    wait_for,
)

IMAGE = png_bytes(np.full((24, 24, 3), 90, np.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two valid models with different weights (so different versions) and their versions."""
    root = tmp_path_factory.mktemp("models")
    return {"a": export_tiny_model(root / "a" / "model.onnx", scale=10.0),
            "b": export_tiny_model(root / "b" / "model.onnx", scale=5.0)}


def version_of(path: Path) -> str:
    return Path(f"{path}.sha256").read_text().split()[0][:12]


def served_version(url: str, name: str = "model") -> str | None:
    r = http().get(f"{url}/v2/models/{name}")
    return r.json()["versions"][0] if r.status_code == 200 else None


def test_ready_is_503_until_a_model_loads_while_live_stays_200(models, tmp_path: Path, caplog):
    target = tmp_path / "model.onnx"  # nothing there yet
    with ThreadServer(serve_params(), str(target)) as s:
        assert http().get(f"{s.url}/v2/health/live").status_code == 200
        r = wait_for(f"{s.url}/v2/health/ready", status=503)
        # the client learns what it can act on; the why (a path of the server's) is for the server's log
        assert r.json() == {"ready": False, "error": "model not loaded"} and r.headers["retry-after"] == "1"
        assert "no such file" in caplog.text and str(tmp_path) not in r.text
        assert http().get(f"{s.url}/v2/models/model").status_code == 503
        assert http().post(f"{s.url}/predict", content=IMAGE).status_code == 503
        install_model(models["a"], target)
        assert s.reload() is True
        assert http().get(f"{s.url}/v2/health/ready").status_code == 200
        assert http().post(f"{s.url}/predict", content=IMAGE).status_code == 200


def test_a_model_failing_its_checksum_is_never_served(models, tmp_path: Path, caplog):
    target = tmp_path / "model.onnx"
    install_model(models["a"], target)
    Path(f"{target}.sha256").write_text(f"{'0' * 64}  model.onnx\n")
    with ThreadServer(serve_params(), str(target)) as s:
        r = wait_for(f"{s.url}/v2/health/ready", status=503)
        assert r.json()["error"] == "model not loaded" and "sha256" in caplog.text
        assert s.reload() is False
        for _ in range(3):
            assert http().get(f"{s.url}/v2/health/ready").status_code == 503
            assert http().get(f"{s.url}/v2/health/live").status_code == 200
            time.sleep(0.1)
        text = http().get(f"{s.url}/metrics").text
        assert metric_value(text, "tlops_model_loads_total", result="rejected") >= 2
        assert metric_value(text, "tlops_model_ready") == 0


@pytest.mark.parametrize("damage", ["checksum mismatch", "not onnx", "no metadata", "external data"])
def test_a_bad_new_model_is_rejected_and_the_old_one_keeps_serving(models, tmp_path: Path, damage: str):
    target = tmp_path / "model.onnx"
    install_model(models["a"], target)
    with ThreadServer(serve_params(), str(target)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        if damage == "checksum mismatch":
            target.write_bytes(models["b"].read_bytes())  # sidecar still names model a
        else:
            from tlops.onnx.metadata import write_sha256

            if damage == "not onnx":
                target.write_bytes(b"this is not a protobuf")
            elif damage == "external data":  # its weights in a file beside it, which ONNX Runtime would read
                import onnx

                onnx.save(onnx.load(str(models["b"])), str(target), save_as_external_data=True,
                          all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
            else:
                import onnx

                m = onnx.load(str(models["b"]))
                del m.metadata_props[:]
                onnx.save(m, str(target))
            write_sha256(target)  # a valid checksum: the failure must come from loading itself
        assert s.reload() is False
        assert served_version(s.url) == version_of(models["a"])
        assert http().get(f"{s.url}/v2/health/ready").status_code == 200
        assert http().post(f"{s.url}/predict", content=IMAGE).status_code == 200
        text = http().get(f"{s.url}/metrics").text
        assert metric_value(text, "tlops_model_loads_total", result="rejected") == 1
        assert metric_value(text, "tlops_model_info", version=version_of(models["a"])) == 1


@pytest.fixture
def registry_ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """cwd in a fresh folder (downloads land in its .tlops/registry), a fresh experiment; a fresh model name."""
    import uuid

    from tlops.tracking import runs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(runs.EXPERIMENT_ENV, f"serving-{uuid.uuid4().hex[:8]}")
    return f"tiny-{uuid.uuid4().hex[:8]}"


def _register(path: Path, name: str) -> tuple[str, str]:
    """Register an exported file in the real MLflow registry: (its version, the version the service reports)."""
    from tlops.core.io import sha256_file
    from tlops.tracking import registry

    version = registry.log_onnx_model(path, np.zeros((1, 3, 32, 32), np.float32), name)
    return version, sha256_file(registry.download_model_file(name, version))[:12]


def _rejected(url: str) -> float:
    return metric_value(http().get(f"{url}/metrics").text, "tlops_model_loads_total", result="rejected")


@pytest.mark.slow
def test_polling_follows_the_champion_alias_under_load_and_rejects_a_tampered_copy(models, registry_ws: str):
    from tlops.tracking import registry

    name = registry_ws
    v1, served1 = _register(models["a"], name)
    registry.set_alias(name, registry.CHAMPION, v1)
    with ThreadServer(serve_params(reload_s=0.1), f"models:/{name}@champion") as s:
        wait_for(f"{s.url}/v2/health/ready")
        assert served_version(s.url, name) == served1
        log: list[tuple[int, str | None]] = []
        stop = threading.Event()
        threads = _load(s.url, stop, log, workers=4)
        v2, served2 = _register(models["b"], name)
        registry.set_alias(name, registry.CHAMPION, v2)  # the alias moves under concurrent requests
        deadline = time.monotonic() + 30
        while served_version(s.url, name) != served2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served_version(s.url, name) == served2

        v3, _ = _register(models["a"], name)  # a third version, whose local copy is then tampered with
        copy = registry.download_model_file(name, v3)
        copy.write_bytes(copy.read_bytes()[:-1] + b"\x00")
        registry.set_alias(name, registry.CHAMPION, v3)
        deadline = time.monotonic() + 30
        while _rejected(s.url) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert _rejected(s.url) >= 1
        assert served_version(s.url, name) == served2  # the old version keeps serving
    assert len(log) > 10 and {code for code, _ in log} == {200}, [x for x in log if x[0] != 200][:5]
    assert {v for _, v in log} == {served1, served2}


def test_full_queue_answers_503_at_once_and_a_slow_answer_504(models):
    # Requests wait up to 20 s for a batch to fill, so the first two sit in the queue (max_queue 2) until their
    # timeout: the others, sent once the queue holds two, are refused at once, before the two time out.
    params = serve_params(max_queue=2, max_batch=32, max_wait_ms=20_000, timeout_ms=3000)
    with ThreadServer(params, str(models["a"])) as s:
        wait_for(f"{s.url}/v2/health/ready")

        async def burst() -> tuple[list[int], list[int]]:
            finished: list[int] = []  # request indices in the order their answers arrived
            async with httpx.AsyncClient(timeout=30) as c:
                async def one(i: int) -> int:
                    r = await c.post(f"{s.url}/predict", content=IMAGE)
                    finished.append(i)
                    return r.status_code

                queued = [asyncio.create_task(one(i)) for i in range(2)]
                while s.service.batcher.depth < 2:  # state, not a sleep: both are in the queue
                    await asyncio.sleep(0.01)
                refused = await asyncio.gather(*(one(i) for i in range(2, 6)))
                return [*(await asyncio.gather(*queued)), *refused], finished

        codes, finished = asyncio.run(burst())
    assert codes == [504, 504, 503, 503, 503, 503]
    assert sorted(finished[:4]) == [2, 3, 4, 5]  # refused at once: before the queued two time out


def _load(url: str, stop: threading.Event, log: list[tuple[int, str | None]], workers: int = 6
          ) -> list[threading.Thread]:
    def worker() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post(f"{url}/predict", content=IMAGE)
                    log.append((r.status_code, r.json().get("model_version")))
                except httpx.HTTPError as e:
                    log.append((-1, repr(e)))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.slow
def test_sighup_swaps_the_model_under_load_with_no_failed_request(models, tmp_path: Path):
    target = tmp_path / "models" / "model.onnx"
    target.parent.mkdir()
    install_model(models["a"], target)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"serve": {"max_batch": 16, "max_wait_ms": 100, "reload_s": 0, "threads": 1,
                                                "grpc_port": None}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process_server(params, str(target), port, cwd=tmp_path) as proc:
        wait_for(f"{url}/v2/health/ready", timeout=60)
        log: list[tuple[int, str | None]] = []
        stop = threading.Event()
        threads = _load(url, stop, log)
        time.sleep(0.5)
        install_model(models["b"], target)
        proc.send_signal(signal.SIGHUP)
        wait_until = time.monotonic() + 20
        while served_version(url) != version_of(models["b"]) and time.monotonic() < wait_until:
            time.sleep(0.05)
        time.sleep(0.5)
        target.write_bytes(b"corrupt")  # a broken update: rejected, b keeps serving
        proc.send_signal(signal.SIGHUP)
        wait_until = time.monotonic() + 20
        while (metric_value(http().get(f"{url}/metrics").text, "tlops_model_loads_total", result="rejected") < 1
               and time.monotonic() < wait_until):
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert len(log) > 20 and {code for code, _ in log} == {200}, [x for x in log if x[0] != 200][:5]
        assert {v for _, v in log} == {version_of(models["a"]), version_of(models["b"])}
        assert served_version(url) == version_of(models["b"])


@pytest.mark.slow
def test_sigterm_lets_in_flight_requests_finish_then_exits(models, tmp_path: Path):
    params = tmp_path / "params.yaml"  # requests wait up to 1 s for a batch: they are in flight at SIGTERM
    params.write_text(yaml.safe_dump({"serve": {"max_batch": 64, "max_wait_ms": 1000, "reload_s": 0, "grpc_port": None}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process_server(params, str(models["a"]), port, cwd=tmp_path) as proc:
        wait_for(f"{url}/v2/health/ready", timeout=60)
        answers: list[int] = []
        clients = [httpx.Client(timeout=30) for _ in range(4)]

        def request(c: httpx.Client) -> None:
            try:
                answers.append(c.post(f"{url}/predict", content=IMAGE).status_code)
            except httpx.HTTPError:
                answers.append(-1)

        inflight = [threading.Thread(target=request, args=(c,)) for c in clients]
        for t in inflight:
            t.start()
        deadline = time.monotonic() + 10  # the 4 requests plus this /metrics one
        while (metric_value(http().get(f"{url}/metrics").text, "tlops_http_requests_in_flight") < 5
               and time.monotonic() < deadline):
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for t in inflight:
            t.join(timeout=30)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert answers == [200] * 4, proc.stdout.read()
        with pytest.raises(httpx.ConnectError):
            http().get(f"{url}/v2/health/live")


def test_service_and_local_predict_import_no_torch_and_no_mlflow(models, tmp_path: Path):
    code = f"""
import sys
from pathlib import Path
import serving.app, serving.predict, serving.client, serving.protocol, serving.batcher, serving.prometheus
import tlops.core.config, tlops.inputs.images, tlops.core.io
from tlops.core.config import ServeParams
serving.app.create_app(ServeParams(model={str(models['a'])!r}))
Path({str(tmp_path / 'x.png')!r}).write_bytes({IMAGE!r})
print(serving.predict.predict_files({str(models['a'])!r}, [{str(tmp_path / 'x.png')!r}], top_k=1))
heavy = sorted(m for m in ("torch", "torchvision", "timm", "mlflow", "prefect") if m in sys.modules)
assert not heavy, heavy
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr


def test_registry_models_need_no_sidecar_but_plain_files_do(models, tmp_path: Path, registry_ws: str):
    from serving.predict import predict_files
    from serving.served_model import ModelSource
    from tlops.core.errors import ConfigError, ModelIntegrityError
    from tlops.tracking import registry

    version, served = _register(models["a"], registry_ws)
    registry.set_alias(registry_ws, registry.CHAMPION, version)
    copy = registry.download_model_file(registry_ws, version)  # as MLflow stores it: no sidecar beside it
    assert not Path(f"{copy}.sha256").exists()
    image = tmp_path / "x.png"
    image.write_bytes(IMAGE)
    [result] = predict_files(f"models:/{registry_ws}@champion", [image], top_k=1)
    assert result["model_name"] == registry_ws and result["model_version"] == served
    bare = tmp_path / "bare" / "model.onnx"  # the same bytes as a plain file, with no sidecar to check them by
    bare.parent.mkdir()
    bare.write_bytes(copy.read_bytes())
    with pytest.raises(ModelIntegrityError, match="sha256"):
        predict_files(bare, [image])
    with pytest.raises(ConfigError, match="models:/<name>@<alias>"):
        ModelSource("models:/tiny")


def test_a_swap_to_a_model_of_other_labels_is_counted_and_logged(models, tmp_path: Path, caplog):
    target = tmp_path / "model.onnx"
    install_model(models["a"], target)
    other = export_tiny_model(tmp_path / "other" / "model.onnx", labels=["cat", "dog", "eel"])
    with ThreadServer(serve_params(), str(target)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        install_model(models["b"], target)  # same task: a plain swap
        assert s.reload()
        install_model(other, target)
        with caplog.at_level("WARNING", logger="serving"):
            assert s.reload()
        text = http().get(f"{s.url}/metrics").text
        assert metric_value(text, "tlops_model_task_changes_total") == 1
        assert http().get(f"{s.url}/v2/models/model").json()["parameters"]["labels"] == ["cat", "dog", "eel"]
    warned = [r.getMessage() for r in caplog.records if "another task" in r.getMessage()]
    assert len(warned) == 1 and "class_0" in warned[0] and "cat" in warned[0]
