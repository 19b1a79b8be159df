"""Serving benchmark: the ONNX Runtime service per protocol under load on loopback, against `mlflow models serve`
and Seldon MLServer.

    python bench/serving.py [--requests 400] [--concurrency 1,8,32] [--max-seconds 60]
                            [--modes binary,json,predict,grpc,mlflow,mlserver] [--no-mlflow] [--no-mlserver]
                            [--no-eager] [--no-int8]

At each concurrency level, one image per request, it measures the service (`python -m serving`) on:
  binary   POST /v2/models/<name>/infer, FP32 tensor in Triton's binary extension, binary logits back
  json     the same endpoint, the FP32 tensor as JSON data
  predict  POST /predict with PNG/JPEG bytes (the server decodes and preprocesses)
  explain  the same with ?explain=true: the model also computes the class activation maps, the top class's is sent
  grpc     gRPC ModelInfer (Open Inference Protocol) with the FP32 tensor in raw_input_contents
  mlflow   the baseline: `mlflow models serve` (one worker) of the same registered model, POST /invocations
           with the JSON FP32 tensor {"inputs": {"input": [[[[...]]]]}}; the model is
           models:/<export.registered_model>@champion of the pipeline's store (./mlflow.db) when the
           benchmarked model is the pipeline's and the store has a champion, else the benchmarked fp32
           model registered in a temp sqlite store.
  mlserver the second baseline: Seldon MLServer with mlserver-mlflow serving a local copy of that same registered
           model (implementation mlserver_mlflow.MLflowRuntime, parameters.uri = the MLflow model folder) as v2
           model <name>; the json mode's very request bodies to POST /v2/models/<name>/infer (it answers every
           output of the MLflow model, the embedding too, where tlops answers the logits). Its settings are
           MLServer's defaults (parallel_workers 1: one inference process behind the HTTP process; metrics on)
           but debug off, so it writes no per-request access log (tlops writes none). MLServer is no dependency
           of tlops: it runs from its own venv, .tlops/bench/mlserver-venv, made with python3.11 and pip on first
           use (MLSERVER_REQUIREMENTS, onnxruntime pinned to tlops' own) and reused after.
One tlops server serves the four tlops modes (HTTP and gRPC ports). Before any load, each mode's answer
for one image is checked against ONNX Runtime run directly; under load every response's status is
checked. It prints one table (req/s, p50/p99 latency, errors, the server's mean micro-batch), each
mode's throughput over each baseline's at the same concurrency, and json against MLServer on its targets
(at concurrency 1 at least its req/s and no higher p50; at 8 and 32 at least 1.5x its req/s). Then the
cost of drift monitoring: binary at concurrency 8 against that server (serve.drift_window; 500 where params
say 0) and a second one with drift_window 0, alternating between them, the better of --drift-repeats runs
of --drift-requests each.
Also, unless skipped: /predict against the int8 model at concurrency 8, eager PyTorch doing the same
decode + preprocess + forward, and ONNX Runtime directly (fp32 and int8).

The model is the pipeline's own when it exists (models/model.onnx, models/finetuned for eager PyTorch,
models/int8/model.int8.onnx); otherwise a stand-in is built in a temp dir with the same code path:
efficientnet_lite0 (random init) + linear head, 96 px, 10 classes, exported by tlops.export with the
embedding output and a drift reference, and quantized by tlops.export.quantize_int8. The images are
the test split when prepared, else generated 64x64 PNGs; tensor modes send them preprocessed.
Each server runs in its own process, the load generator in another: a lean asyncio HTTP/1.1 client with
one keep-alive connection per concurrent user and prebuilt request bodies, or for gRPC one grpc.aio
channel per user; everything on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tlops.core import paths

STANDIN_CLASSES = 10
STANDIN_SIZE = 96
MODES = ("binary", "json", "predict", "explain", "grpc", "mlflow", "mlserver")
TLOPS_MODES = MODES[:5]
BASELINES = MODES[5:]
PAYLOAD_OF = {"mlserver": "json"}  # modes that send another mode's request bodies, byte for byte
TENSOR_PAYLOADS = 16  # distinct preprocessed tensors sent (JSON bodies of a 224 px tensor are ~3 MB each)
DRIFT_LEVEL = 8
HEADLINE_TARGET, DRIFT_TARGET = 5.0, 5.0
MLSERVER_TARGETS = {1: 1.0, 8: 1.5, 32: 1.5}  # json / mlserver throughput per concurrency (at 1, p50 too)
MLSERVER_VENV = ROOT / paths.STATE_DIR / "bench" / "mlserver-venv"  # MLServer is no dependency of tlops: its own venv
# Versions that load and serve the pipeline's MLflow ONNX model; uvloop 0.23 breaks MLServer 1.7.1's inference
# workers ("There is no current event loop"). onnxruntime is pinned to tlops' own at run time.
MLSERVER_REQUIREMENTS = ("mlserver==1.7.1", "mlserver-mlflow==1.7.1", "mlflow==3.17.2", "onnx==1.23.2",
                         "uvloop==0.21.0")


@dataclass
class Models:
    fp32: Path
    int8: Path | None
    eager: object  # torch nn.Module in eval mode, the same weights as fp32; None when not needed
    note: str
    standin: bool = False


# ---------------------------------------------------------------- models and images


def pipeline_models(need_eager: bool) -> Models | None:
    """The pipeline's exported model (and its fine-tuned PyTorch original when eager PyTorch is measured)."""
    if not paths.ONNX.exists() or (need_eager and not paths.FINETUNE_WEIGHTS.exists()):
        return None
    model = None
    if need_eager:
        from tlops.models.classifier import load_classifier

        model, _ = load_classifier(paths.FINETUNE_DIR)
    int8 = paths.INT8_ONNX if paths.INT8_ONNX.exists() else None
    eager = f" (eager: {paths.FINETUNE_DIR})" if need_eager else ""
    return Models(paths.ONNX, int8, model, f"pipeline model {paths.ONNX}{eager}")


def standin_models(workdir: Path, calibration: list[bytes], int8: bool) -> Models:
    """efficientnet_lite0 (random init) + linear head, exported (logits + embedding, with a drift reference) and
    quantized with the pipeline's functions."""
    import torch

    from tlops.export.lineage import build_metadata, write_metadata
    from tlops.export.onnx_export import export_onnx
    from tlops.export.served import Served
    from tlops.export.verify import quantize_int8
    from tlops.inputs.images import load_image, preprocess
    from tlops.models.backbones import create_backbone
    from tlops.models.classifier import Classifier
    from tlops.models.heads import build_head
    from tlops.onnx import drift, metadata, runtime

    torch.manual_seed(0)
    bb = create_backbone("efficientnet_lite0", weights="random", image_size=STANDIN_SIZE)
    model = Classifier(bb.model, build_head("linear", bb.num_features, STANDIN_CLASSES, 256, 0.0)).eval()
    fp32 = workdir / "model.onnx"
    served = Served(model, explain="image")  # as the export stage builds it: explanation only when asked
    export_onnx(served, bb.spec.input_size, fp32, 17, served.outputs)
    meta = build_metadata([f"class_{i}" for i in range(STANDIN_CLASSES)], bb.spec, bb.name, None, None, None, "bench")
    meta[metadata.EXPLAIN] = "image"  # what the export stage records for a linear head on pooled features
    batches = [np.stack([preprocess(load_image(b, 10**8), bb.spec) for b in calibration[i:i + 8]])
               for i in range(0, min(len(calibration), 64), 8)]
    sess = runtime.session(fp32, cpu_only=True)
    outs = [sess.run([metadata.OUTPUT, metadata.EMBEDDING], {metadata.INPUT: x}) for x in batches]
    meta[metadata.DRIFT_REFERENCE] = drift.to_json(drift.reference(np.concatenate([o[0] for o in outs]),
                                                                    np.concatenate([o[1] for o in outs])))
    write_metadata(fp32, meta)
    metadata.write_sha256(fp32)
    q = None
    if int8:
        q = quantize_int8(fp32, workdir / "model.int8.onnx", batches)
        metadata.write_sha256(q)
    note = (f"stand-in: {bb.name} random init + linear head, {STANDIN_SIZE} px, {STANDIN_CLASSES} classes "
            "(no models/model.onnx + models/finetuned here; run `tlops run` for the real one)")
    return Models(fp32, q, model, note, standin=True)


def bench_images(n: int) -> tuple[list[bytes], str]:
    """PNG/JPEG bytes: the prepared test split when there is one, else generated 64x64 PNGs."""
    if paths.MANIFEST.exists():
        from tlops.data.manifest import load_manifest

        rows = load_manifest(paths.MANIFEST).rows_in("test")[:n]
        if rows:
            return [Path(r.path).read_bytes() for r in rows], f"{len(rows)} test-split images from {paths.MANIFEST}"
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        a[..., i % 3] += 150
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, f"{n} generated 64x64 PNGs"


# ---------------------------------------------------------------- request payloads, one folder per mode


def write_payloads(folder: Path, mode: str, images: list[bytes], tensors: list[np.ndarray], name: str) -> Path:
    """The request bodies of `mode`, prebuilt (NNNN.bin) with meta.json: {path, content_type, headers per body}.

    Tensor modes send the images preprocessed ([1, 3, S, S] float32), as a client that preprocesses would."""
    folder = folder / mode
    folder.mkdir(parents=True)
    headers: list[dict[str, str]] = []
    bodies: list[bytes] = []
    if mode in ("predict", "explain"):
        path = "/predict" if mode == "predict" else "/predict?explain=true"
        ctype, bodies = "application/octet-stream", list(images)
        headers = [{} for _ in bodies]
    elif mode == "binary":
        path, ctype = f"/v2/models/{name}/infer", "application/octet-stream"
        for x in tensors:
            raw = np.ascontiguousarray(x, "<f4").tobytes()
            head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                           "parameters": {"binary_data_size": len(raw)}}],
                               "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
            bodies.append(head + raw)
            headers.append({"Inference-Header-Content-Length": str(len(head))})
    elif mode == "json":
        path, ctype = f"/v2/models/{name}/infer", "application/json"
        for x in tensors:
            bodies.append(json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                                  "data": x.ravel().tolist()}]}).encode())
            headers.append({})
    elif mode == "mlflow":  # MLflow's tensor format: {"inputs": {<input name>: nested list}}
        path, ctype = "/invocations", "application/json"
        bodies = [json.dumps({"inputs": {"input": x.tolist()}}).encode() for x in tensors]
        headers = [{} for _ in bodies]
    elif mode == "grpc":
        from serving.grpc_codec import SERVICE, messages

        path, ctype, request = f"/{SERVICE}/ModelInfer", "application/grpc", messages()["ModelInferRequest"]
        for x in tensors:
            msg = request(model_name=name)
            msg.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
            msg.raw_input_contents.append(np.ascontiguousarray(x, "<f4").tobytes())
            bodies.append(msg.SerializeToString())
            headers.append({})
    else:
        raise ValueError(mode)
    for i, b in enumerate(bodies):
        (folder / f"{i:04d}.bin").write_bytes(b)
    (folder / "meta.json").write_text(json.dumps({"mode": mode, "path": path, "content_type": ctype,
                                                  "headers": headers}))
    return folder


def check_answer(mode: str, target: str, folder: Path, ref_logits: np.ndarray, labels: list[str]) -> str:
    """One request of `mode` (payload 0, image 0) before any load: the answer must be 200 and agree with ONNX
    Runtime run directly on the same tensor. Returns "" or what is wrong."""
    meta = json.loads((folder / "meta.json").read_text())
    body = (folder / "0000.bin").read_bytes()
    if mode == "grpc":
        import grpc

        from serving.grpc_codec import messages

        with grpc.insecure_channel(target) as ch:
            call = ch.unary_unary(meta["path"], request_serializer=lambda b: b,
                                  response_deserializer=messages()["ModelInferResponse"].FromString)
            try:
                out = call(body, timeout=60)
            except grpc.RpcError as e:
                return f"{e.code().name}: {e.details()}"
        got = np.frombuffer(out.raw_output_contents[0], "<f4")
    else:
        import httpx

        from tlops.onnx import metadata

        r = httpx.post(f"{target}{meta['path']}", content=body, timeout=60,
                       headers={"Content-Type": meta["content_type"], **meta["headers"][0]})
        if r.status_code != 200:
            return f"{r.status_code} {r.text[:200]}"
        if mode == "binary":
            hl = r.headers.get("inference-header-content-length")
            if hl is None:
                return "binary_data_output: no Inference-Header-Content-Length in the response"
            got = np.frombuffer(r.content[int(hl):], "<f4")
        elif mode in ("json", "mlserver"):  # MLServer answers every output of the MLflow model: pick the logits
            outs = r.json()["outputs"]
            got = np.array(next((o for o in outs if o["name"] == metadata.OUTPUT), outs[0])["data"], np.float32)
        elif mode == "mlflow":
            pred = r.json()["predictions"]
            got = np.array(pred["logits"] if isinstance(pred, dict) else pred, np.float32).ravel()
        else:  # predict: the top-1 label
            top = r.json()["predictions"][0]["top_k"][0]["label"]
            want = labels[int(ref_logits.argmax())]
            return "" if top == want else f"top-1 {top!r}, ONNX Runtime directly: {want!r}"
    if got.shape != ref_logits.shape:
        return f"logits of shape {got.shape}, expected {ref_logits.shape}"
    diff = float(np.abs(got - ref_logits).max())
    return "" if diff <= 1e-3 else f"logits differ from ONNX Runtime directly by up to {diff:.2g}"


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def start_server(model: Path, workdir: Path, serve: dict, tag: str) -> tuple[subprocess.Popen, str, str | None]:
    """`python -m serving` on free ports; (process, HTTP URL, gRPC target or None) once it is ready."""
    port = free_port()
    params = workdir / f"params-{tag}.yaml"
    params.write_text(json.dumps({"serve": {**serve, "host": "127.0.0.1", "reload_s": 0}}))  # JSON is YAML
    log = workdir / f"server-{tag}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serving", "--params", str(params), "--model", str(model),
                                 "--port", str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    _wait_ready(f"{url}/v2/health/ready", proc, log, 120, stop_server)
    grpc_port = serve.get("grpc_port")
    return proc, url, f"127.0.0.1:{grpc_port}" if grpc_port else None


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float, stop) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; the end of {log}:\n{_log_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise SystemExit(f"{url} did not answer 200 within {timeout:g}s; the end of {log}:\n{_log_tail(log)}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group a start_new_session process leads (it and the workers it spawned); SIGKILL what
    is left of it after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or the group never looks empty
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def mlflow_model(models: Models, workdir: Path, registered: str) -> tuple[str, str, str]:
    """(model URI, tracking URI, what it is) for the baselines: the pipeline store's champion when the
    benchmarked model is the pipeline's and the store holds one, else models.fp32 registered in a temp store."""
    from tlops.core.io import sha256_file
    from tlops.tracking import registry, runs

    if not models.standin and ((ROOT / paths.MLFLOW_DB).exists() or os.environ.get("MLFLOW_TRACKING_URI")):
        version = registry.get_alias_version(registered, registry.CHAMPION)
        if version is not None:
            tags = registry.get_version_tags(registered, version)
            same = "the same file" if tags.get("sha256") == sha256_file(models.fp32) else \
                f"NOT byte-identical to {models.fp32} (registered from {tags.get('source_file', '?')})"
            return (f"models:/{registered}@{registry.CHAMPION}", runs.tracking_uri(),
                    f"models:/{registered}@{registry.CHAMPION} = version {version} of the pipeline store, {same}")
    import logging

    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from tlops.onnx import metadata, runtime

    runs._quiet_mlflow()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    store = workdir / "mlflow"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("bench", artifact_location=(store / "artifacts").as_uri())
    sess = runtime.session(models.fp32, cpu_only=True)
    size = metadata.spec_of(metadata.read_metadata(models.fp32)).input_size
    x = np.zeros((1, 3, size, size), np.float32)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x}), strict=True))
    name = "tlops-bench"
    # stderr: mlflow's eprint of "Successfully registered model ..."; exceptions still propagate
    with mlflow.start_run(experiment_id=exp), contextlib.redirect_stderr(io.StringIO()):
        info = mlflow.onnx.log_model(onnx.load_model(str(models.fp32)), name="model", registered_model_name=name,
                                     signature=infer_signature({"input": x}, outs), await_registration_for=0,
                                     pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                                     onnx_execution_providers=["CPUExecutionProvider"])
    client.set_registered_model_alias(name, "champion", str(info.registered_model_version))
    return f"models:/{name}@champion", uri, f"models:/{name}@champion: {models.fp32} registered in a temp store"


def start_mlflow(model_uri: str, tracking_uri: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` (its own process group: it spawns uvicorn workers); (process, URL) once /ping is 200."""
    port = free_port()
    exe = Path(sys.executable).parent / "mlflow"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = workdir / "mlflow-serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*cmd, "models", "serve", "-m", model_uri, "--env-manager", "local",
                                 "--host", "127.0.0.1", "-p", str(port)], cwd=workdir, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(f"{url}/ping", proc, log, 300, stop_group)
    return proc, url


def mlserver_python() -> Path:
    """The Python of MLServer's own venv (MLSERVER_VENV): made with python3.11 and filled by pip on first use,
    reused while it holds the same requirements."""
    from importlib.metadata import version

    reqs = [*MLSERVER_REQUIREMENTS, f"onnxruntime=={version('onnxruntime')}"]  # the same runtime as tlops'
    python = MLSERVER_VENV / "bin" / "python"
    done = MLSERVER_VENV / "tlops-requirements.txt"  # written once pip succeeded: what the venv holds
    if python.exists() and done.exists() and done.read_text().split() == reqs:
        return python
    MLSERVER_VENV.parent.mkdir(parents=True, exist_ok=True)
    log = MLSERVER_VENV.parent / "mlserver-venv-install.log"
    print(f"mlserver: installing {' '.join(reqs)} into {MLSERVER_VENV} (once; minutes; log {log})", flush=True)
    base = shutil.which("python3.11") or sys.executable
    steps = [] if python.exists() else [[base, "-m", "venv", str(MLSERVER_VENV)]]
    with open(log, "w") as out:
        for cmd in [*steps, [str(python), "-m", "pip", "install", *reqs]]:
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode != 0:
                raise SystemExit(f"{' '.join(cmd[:4])} ... failed; the end of {log}:\n{_log_tail(log)}")
    done.write_text("\n".join(reqs) + "\n")
    return python


def mlserver_versions(python: Path) -> str:
    code = ("from importlib.metadata import version as v; "
            "print(', '.join(f'{p} {v(p)}' for p in ('mlserver', 'mlserver-mlflow', 'mlflow', 'onnxruntime')))")
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def local_model(model_uri: str, tracking_uri: str, dst: Path) -> Path:
    """The MLflow model folder behind `model_uri`, downloaded from its store (what MLServer's parameters.uri names)."""
    import mlflow

    from tlops.tracking import runs

    runs._quiet_mlflow()
    mlflow.set_tracking_uri(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


def start_mlserver(python: Path, model_dir: Path, name: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    """`mlserver start` of the MLflow model folder as v2 model `name` (its own process group: it spawns its inference
    worker); (process, URL) once the model is ready.

    MLServer's defaults (parallel_workers 1: one inference process behind the HTTP one; metrics on) but debug off,
    which drops the per-request access log that tlops does not write either; gRPC and metrics on free ports."""
    folder = workdir / "mlserver"  # settings.json and the model repository: model-settings.json, found by a scan
    folder.mkdir()
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    http, grpc_port, metrics = ports
    (folder / "settings.json").write_text(json.dumps({"host": "127.0.0.1", "http_port": http, "grpc_port": grpc_port,
                                                      "metrics_port": metrics, "debug": False}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": name, "implementation": "mlserver_mlflow.MLflowRuntime", "parameters": {"uri": str(model_dir)}}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    log = workdir / "mlserver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(python.parent / "mlserver"), "start", str(folder)], cwd=folder,
                                env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{http}"
    _wait_ready(f"{url}/v2/models/{name}/ready", proc, log, 300, stop_group)
    return proc, url


# ---------------------------------------------------------------- load generator (its own process)


def run_load(target: str, folder: Path, concurrency: int, requests: int, max_seconds: float) -> dict:
    """The load generator in its own process, so its CPU use is not the server's event loop's."""
    out = subprocess.run([sys.executable, __file__, "--loadgen", target, "--payloads", str(folder),
                          "--concurrency", str(concurrency), "--requests", str(requests),
                          "--max-seconds", str(max_seconds)], capture_output=True, text=True, cwd=ROOT,
                         timeout=max_seconds + 120)
    if out.returncode != 0:
        raise SystemExit(f"load generator failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class _Conn:
    """One keep-alive HTTP/1.1 connection speaking just enough protocol to POST and read a sized or chunked reply.

    A hand-rolled client on asyncio streams costs a fraction of httpx's CPU per request, so on a small
    machine the load generator measures the server rather than itself.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send a complete request (head + body); (status, the headers that matter here, body)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request)
        status_line = await self.reader.readline()
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() in ("content-length", "connection", "transfer-encoding", "inference-header-content-length"):
                headers[name.lower()] = value.strip().lower()
        if headers.get("transfer-encoding") == "chunked":
            chunks = []
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                chunks.append(await self.reader.readexactly(size + 2))
            await self.reader.readline()
            payload = b"".join(c[:-2] for c in chunks)
        else:
            payload = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":
            self.writer.close()
            self.writer = None
        return int(status_line.split()[1]), headers, payload


def _http_senders(target: str, meta: dict, bodies: list[bytes], concurrency: int) -> list:
    host, port = target.removeprefix("http://").split(":")
    requests = []  # complete HTTP requests, built before timing
    for body, extra in zip(bodies, meta["headers"], strict=True):
        head = (f"POST {meta['path']} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {meta['content_type']}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in extra.items()) + f"Content-Length: {len(body)}\r\n\r\n")
        requests.append(head.encode() + body)
    binary = meta["mode"] == "binary"

    def sender(conn: _Conn):
        async def send(i: int) -> str | None:
            try:
                status, headers, payload = await conn.post(requests[i % len(requests)])
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                conn.writer = None
                return repr(e)
            if status != 200:
                return f"{status} {payload[:120]!r}"
            if binary and "inference-header-content-length" not in headers:
                return f"200 without Inference-Header-Content-Length: {payload[:80]!r}"
            return None
        return send

    return [sender(_Conn(host, int(port))) for _ in range(concurrency)]


def _grpc_senders(target: str, meta: dict, bodies: list[bytes], concurrency: int) -> tuple[list, list]:
    import grpc
    from grpc import aio

    from serving.grpc_codec import messages

    m = messages()
    reqs = [m["ModelInferRequest"].FromString(b) for b in bodies]  # messages, serialized per call as a client does
    options = [("grpc.use_local_subchannel_pool", 1),  # a connection per user, like the HTTP client's
               ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    channels = [aio.insecure_channel(target, options=options) for _ in range(concurrency)]

    def sender(channel):
        call = channel.unary_unary(meta["path"], request_serializer=m["ModelInferRequest"].SerializeToString,
                                   response_deserializer=m["ModelInferResponse"].FromString)

        async def send(i: int) -> str | None:
            try:
                out = await call(reqs[i % len(reqs)], timeout=60)
            except grpc.aio.AioRpcError as e:
                return f"{e.code().name} {(e.details() or '')[:120]}"
            return None if out.raw_output_contents else "a response without raw_output_contents"
        return send

    return [sender(ch) for ch in channels], channels


async def _loadgen(target: str, folder: Path, concurrency: int, requests: int, max_seconds: float) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    bodies = [p.read_bytes() for p in sorted(folder.glob("*.bin"))]
    channels: list = []
    if meta["mode"] == "grpc":
        senders, channels = _grpc_senders(target, meta, bodies, concurrency)
    else:
        senders = _http_senders(target, meta, bodies, concurrency)
    # open every connection (and warm every path) before timing: connection setup is not what is measured
    warm = await asyncio.gather(*(send(i) for i, send in enumerate(senders)))
    latencies: list[float] = []
    errors: list[str] = [f"warm-up: {e}" for e in warm if e]
    next_i = 0
    t_start = time.perf_counter()
    deadline = t_start + max_seconds

    async def worker(send) -> None:
        nonlocal next_i
        while next_i < requests and time.perf_counter() < deadline:
            i, next_i = next_i, next_i + 1
            t0 = time.perf_counter()
            error = await send(i)
            latencies.append(time.perf_counter() - t0)
            if error:
                errors.append(error)

    await asyncio.gather(*(worker(s) for s in senders))
    elapsed = time.perf_counter() - t_start
    for ch in channels:
        await ch.close()
    lat = np.array(latencies or [0.0]) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": elapsed,
            "throughput": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": len(errors), "error_examples": errors[:3]}


def batch_stats(url: str) -> tuple[float, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
           if s.name in ("tlops_batch_size_sum", "tlops_batch_size_count")}
    return got.get("tlops_batch_size_sum", 0.0), got.get("tlops_batch_size_count", 0.0)


def measured(url: str, target: str, folder: Path, c: int, args: argparse.Namespace, requests: int | None = None
             ) -> dict:
    """run_load with the tlops server's mean micro-batch over the run."""
    before = batch_stats(url)
    r = run_load(target, folder, c, requests or args.requests, args.max_seconds)
    after = batch_stats(url)
    r["mean_batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
    return r


# ---------------------------------------------------------------- eager PyTorch and direct ORT


def eager_torch(model: object, images: list[bytes], spec: object, batch: int, max_seconds: float) -> dict:
    """Images/s of eager PyTorch doing the same work per request: decode + preprocess + forward."""
    import torch

    from tlops.inputs.images import load_image, preprocess

    def step(chunk: list[bytes]) -> None:
        x = torch.from_numpy(np.stack([preprocess(load_image(b, 10**8), spec) for b in chunk]))
        with torch.inference_mode():
            model(x)

    step(images[:batch])  # warm-up
    done, t0 = 0, time.perf_counter()
    while done < len(images) and time.perf_counter() - t0 < max_seconds:
        chunk = images[done:done + batch]
        step(chunk)
        done += len(chunk)
    return {"batch": batch, "throughput": done / (time.perf_counter() - t0)}


def ort_direct(fp32: Path, int8: Path | None, spec: object, images: list[bytes]) -> dict:
    from tlops.export.verify import benchmark
    from tlops.inputs.images import load_image, preprocess

    x = np.stack([preprocess(load_image(b, 10**8), spec) for b in images[:32]])
    out = {"fp32": benchmark(fp32, x, repeats=40)}
    if int8 is not None:
        out["int8"] = benchmark(int8, x, repeats=40)
    return out


def observe_cost(model: Path, n: int = 5000) -> float | None:
    """Seconds of drift.Monitor.observe per one-image request on this model's reference (None: it has none)."""
    from tlops.onnx import drift, metadata

    monitor = drift.Monitor.from_metadata(metadata.read_metadata(model), 500, 1.0)
    if monitor is None or not monitor.k:
        return None
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, len(monitor.ref["classes"]))).astype(np.float32)
    embedding = rng.standard_normal((1, monitor.ref["embedding"]["dim"])).astype(np.float32)
    for _ in range(100):
        monitor.observe(logits, embedding)
    t0 = time.perf_counter()
    for _ in range(n):
        monitor.observe(logits, embedding)
    return (time.perf_counter() - t0) / n


# ---------------------------------------------------------------- main


def cpu_line() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")),
                 platform.processor())
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    return f"{model}, {os.cpu_count()} cores, VNNI {'yes' if vnni else 'no'}"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="cap per concurrency level")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {','.join(MODES)}")
    ap.add_argument("--no-mlflow", action="store_true", help="skip `mlflow models serve` (mode mlflow)")
    ap.add_argument("--no-mlserver", action="store_true", help="skip Seldon MLServer (mode mlserver)")
    ap.add_argument("--no-eager", action="store_true", help="skip eager PyTorch")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 server run (and the stand-in's int8)")
    ap.add_argument("--no-drift", action="store_true", help="skip the drift monitoring cost (needs mode binary)")
    ap.add_argument("--drift-repeats", type=int, default=2, help="runs each with drift on and off; the best counts")
    ap.add_argument("--drift-requests", type=int, default=2000,
                    help="requests per drift run (capped by --max-seconds): the difference is small, runs must be long")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="override serve.threads (ORT intra-op threads)")
    ap.add_argument("--loadgen", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--payloads", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := sorted(set(modes) - set(MODES)):
        ap.error(f"--modes: unknown {unknown}; choose from {','.join(MODES)}")
    skip = {"mlflow": args.no_mlflow, "mlserver": args.no_mlserver}
    args.modes = [m for m in MODES if m in modes and not skip.get(m)]
    args.levels = [int(c) for c in args.concurrency.split(",")] if not args.loadgen else None
    return args


def mlserver_verdict(results: dict[tuple[str, int], dict], levels: list[int]) -> str:
    """json FP32 against MLServer on MLSERVER_TARGETS: its throughput ratio per concurrency, at 1 the p50 too."""
    lines = ["json FP32 / MLServer at the same concurrency:"]
    for c, target in MLSERVER_TARGETS.items():
        if c not in levels:
            lines.append(f"  c={c:<3} not measured (--concurrency)")
            continue
        t, m = results[("json", c)], results[("mlserver", c)]
        x = t["throughput"] / m["throughput"] if m["throughput"] > 0 else float("inf")
        met = x >= target and (c != 1 or t["p50_ms"] <= m["p50_ms"])
        p50 = f", p50 {t['p50_ms']:.1f} vs {m['p50_ms']:.1f} ms" if c == 1 else ""
        want = f">= {target:g}x" + (", p50 no higher" if c == 1 else "")
        lines.append(f"  c={c:<3} {x:.2f}x req/s{p50} (target {want}): {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def drift_cost(model: Path, work: Path, serve: dict, on_url: str, folder: Path, args: argparse.Namespace,
               runs: dict[str, list[dict]]) -> dict:
    """Binary FP32 at DRIFT_LEVEL against the running server (drift on) and a second one with drift_window 0, run
    one after the other, alternating, after a warm-up run of the new one (the first is warm); returns GET /drift
    of the first. Alternating keeps a slow change of the machine's speed out of the comparison."""
    import httpx

    grpc_port = free_port() if serve.get("grpc_port") else None  # identical but for drift_window: gRPC too
    proc, off_url, _ = start_server(model, work, {**serve, "drift_window": 0, "grpc_port": grpc_port}, "fp32-nodrift")
    try:
        run_load(off_url, folder, DRIFT_LEVEL, args.requests, args.max_seconds)  # warm-up, not counted
        for _ in range(args.drift_repeats):
            for kind, url in (("on", on_url), ("off", off_url)):
                runs[kind].append(measured(url, url, folder, DRIFT_LEVEL, args, args.drift_requests))
    finally:
        stop_server(proc)
    return httpx.get(f"{on_url}/drift", timeout=10).json()


def main() -> int:
    args = parse_args()
    if args.loadgen:
        print(json.dumps(asyncio.run(_loadgen(args.loadgen, Path(args.payloads), int(args.concurrency),
                                              args.requests, args.max_seconds))))
        return 0
    os.chdir(ROOT)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from tlops.core.config import load_params
    from tlops.inputs.images import load_image, preprocess
    from tlops.onnx import metadata, runtime

    params = load_params()
    serve = params.serve.model_dump(exclude={"model", "host", "port"})
    if args.threads:
        serve["threads"] = args.threads
    serve["drift_window"] = serve["drift_window"] or 500  # monitoring on in the main server; off: drift_window 0
    serve["grpc_port"] = free_port() if "grpc" in args.modes else None
    tlops_modes = [m for m in args.modes if m in TLOPS_MODES]
    drift = "binary" in args.modes and not args.no_drift and args.drift_repeats > 0
    mlserver = mlserver_python() if "mlserver" in args.modes else None  # before any load: an install fails early
    with tempfile.TemporaryDirectory(prefix="tlops-bench-") as tmp:
        work = Path(tmp)
        images, images_note = bench_images(args.images)
        models = pipeline_models(not args.no_eager) or standin_models(work, images, not args.no_int8)
        meta = metadata.read_metadata(models.fp32)
        spec, labels = metadata.spec_of(meta), metadata.labels_of(meta)
        name = models.fp32.stem  # the v2 API's model name
        tensors = [preprocess(load_image(b, 10**8), spec)[None] for b in images[:TENSOR_PAYLOADS]]
        sess = runtime.session(models.fp32, cpu_only=True)
        ref_logits = sess.run([metadata.OUTPUT], {metadata.INPUT: tensors[0]})[0][0]
        kinds = dict.fromkeys(PAYLOAD_OF.get(m, m) for m in args.modes)
        built = {k: write_payloads(work / "payloads", k, images, tensors, name) for k in kinds}
        payloads = {m: built[PAYLOAD_OF.get(m, m)] for m in args.modes}
        print(f"model:  {models.note}")
        print(f"images: {images_note}; input {spec.input_size} px; tensor modes send {len(tensors)} of them "
              f"preprocessed ([1, 3, {spec.input_size}, {spec.input_size}] FP32)")
        print(f"cpu:    {cpu_line()}")
        print(f"server: max_batch={serve['max_batch']} max_wait_ms={serve['max_wait_ms']} threads={serve['threads']} "
              f"drift_window={serve['drift_window']}")
        print(f"modes:  {', '.join(args.modes)}; concurrency {args.concurrency}; {args.requests} requests or "
              f"{args.max_seconds:g} s per level", flush=True)

        results: dict[tuple[str, int], dict] = {}
        drift_runs: dict[str, list[dict]] = {"on": [], "off": []}
        drift_state, checks, baseline_notes = None, {}, {}

        def check(mode: str, target: str) -> None:
            checks[mode] = check_answer(mode, target, payloads[mode], ref_logits, labels)
            if checks[mode]:
                print(f"  check {mode}: FAILED: {checks[mode]}", flush=True)

        def baseline(mode: str, url: str) -> None:
            check(mode, url)
            for c in args.levels:
                r = run_load(url, payloads[mode], c, args.requests, args.max_seconds)
                results[(mode, c)] = {**r, "mean_batch": None}
                print(f"  {mode} c={c}: {r['throughput']:.1f} req/s", flush=True)

        if tlops_modes or drift:
            proc, url, grpc_target = start_server(models.fp32, work, serve, "fp32")
            try:
                for mode in tlops_modes:
                    target = grpc_target if mode == "grpc" else url
                    check(mode, target)
                    for c in args.levels:
                        results[(mode, c)] = measured(url, target, payloads[mode], c, args)
                        print(f"  {mode} c={c}: {results[(mode, c)]['throughput']:.1f} req/s", flush=True)
                if drift:
                    drift_state = drift_cost(models.fp32, work, serve, url, payloads["binary"], args, drift_runs)
            finally:
                stop_server(proc)
        if models.int8 is not None and not args.no_int8 and "predict" in args.modes:
            proc, url, _ = start_server(models.int8, work, {**serve, "grpc_port": None}, "int8")
            try:
                results[("predict int8", DRIFT_LEVEL)] = measured(url, url, payloads["predict"], DRIFT_LEVEL, args)
            finally:
                stop_server(proc)
        if baselines := [m for m in BASELINES if m in args.modes]:
            model_uri, tracking_uri, registered = mlflow_model(models, work, params.export.registered_model)
        if "mlflow" in baselines:
            proc, url = start_mlflow(model_uri, tracking_uri, work)
            try:
                baseline("mlflow", url)
            finally:
                stop_group(proc)
            baseline_notes["mlflow"] = "`mlflow models serve --env-manager local` (1 worker), POST /invocations"
        if "mlserver" in baselines:
            model_dir = local_model(model_uri, tracking_uri, work / "mlserver-model")
            proc, url = start_mlserver(mlserver, model_dir, name, work)
            try:
                baseline("mlserver", url)
            finally:
                stop_group(proc)
            baseline_notes["mlserver"] = (
                f"`mlserver start` ({mlserver_versions(mlserver)}), mlserver_mlflow.MLflowRuntime on a local copy\n"
                f"            of the model folder, POST /v2/models/{name}/infer with the json mode's bodies; "
                "parallel_workers 1\n            (its default: one inference process behind the HTTP one), debug off "
                f"(no access log, as tlops), metrics on;\n            venv {MLSERVER_VENV}")

        print(f"\none image per request, {args.requests} requests or {args.max_seconds:g} s per level; batch: the "
              "tlops server's mean micro-batch")
        if baseline_notes:
            print(f"baselines serve {registered}:")
            for mode, note in baseline_notes.items():
                print(f"  {mode}: {note}")
        if checks:
            print("answers for image 0 agree with ONNX Runtime directly: "
                  + ", ".join(f"{m} {'ok' if not e else 'NO'}" for m, e in checks.items()))
        print(f"{'mode':<14}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'batch':>7}")
        for (mode, c), r in results.items():
            batch = f"{r['mean_batch']:>7.1f}" if r["mean_batch"] is not None else f"{'-':>7}"
            print(f"{mode:<14}{c:>5}{r['throughput']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['errors']:>8}"
                  f"{batch}")
            for e in r["error_examples"]:
                print(f"      error: {e}")

        for base in baseline_notes:
            print(f"\nthroughput / {base} at the same concurrency:")
            for mode in tlops_modes:
                ratios = [f"c={c} {results[(mode, c)]['throughput'] / results[(base, c)]['throughput']:.2f}x"
                          for c in args.levels if results[(base, c)]["throughput"] > 0]
                print(f"  {mode:<8} " + "  ".join(ratios))
        if ("binary", 8) in results and ("mlflow", 8) in results and results[("mlflow", 8)]["throughput"] > 0:
            x = results[("binary", 8)]["throughput"] / results[("mlflow", 8)]["throughput"]
            print(f"binary FP32 / mlflow models serve at concurrency 8: {x:.2f}x (target >= {HEADLINE_TARGET:g}x)")
        if "json" in args.modes and "mlserver" in baseline_notes:
            print(mlserver_verdict(results, args.levels))

        if drift:
            on = max(drift_runs["on"], key=lambda r: r["throughput"])
            off = max(drift_runs["off"], key=lambda r: r["throughput"])

            def runs(rs: list[dict]) -> str:
                return ", ".join(f"{r['throughput']:.1f}" for r in rs)

            print(f"\ndrift monitoring, binary FP32 at concurrency {DRIFT_LEVEL}, best of {args.drift_repeats} runs of "
                  f"{args.drift_requests} requests or {args.max_seconds:g} s, alternating between the two servers:")
            print(f"  on  (drift_window {serve['drift_window']}): {on['throughput']:.1f} req/s (runs: "
                  f"{runs(drift_runs['on'])}), p50 {on['p50_ms']:.1f} ms, p99 {on['p99_ms']:.1f} ms")
            print(f"  off (drift_window 0):   {off['throughput']:.1f} req/s (runs: {runs(drift_runs['off'])}), "
                  f"p50 {off['p50_ms']:.1f} ms, p99 {off['p99_ms']:.1f} ms")
            if drift_state and drift_state.get("error"):
                print(f"  note: the monitor was not running, so this measures nothing: {drift_state['error']}")
            elif drift_state:
                print(f"  the monitor held {drift_state.get('window')} samples (embedding score "
                      f"{drift_state.get('embedding')})")
            cost = 100 * (off["throughput"] - on["throughput"]) / off["throughput"]
            median = {k: float(np.median([r["throughput"] for r in rs])) for k, rs in drift_runs.items()}
            print(f"drift monitoring costs {cost:.1f}% of throughput, best against best (target <= "
                  f"{DRIFT_TARGET:g}%); median against median: {100 * (1 - median['on'] / median['off']):.1f}%")
            spread = max(100 * (1 - min(t) / max(t)) for t in
                         ([r["throughput"] for r in rs] for rs in drift_runs.values()))
            if args.drift_repeats > 1 and abs(cost) <= spread:
                print(f"  (within the run-to-run spread of {spread:.1f}% at one setting: more --drift-repeats or "
                      "--drift-requests, or a quiet machine, to resolve it)")
            per_request = observe_cost(models.fp32)
            if per_request is not None:
                print(f"  measured directly: the monitor's work per request (one image) is {per_request * 1e6:.0f} us, "
                      f"{100 * per_request * on['throughput']:.1f}% of one core at {on['throughput']:.0f} req/s")

        if not args.no_eager and models.eager is not None:
            import torch

            # Eager PyTorch at its best thread count: OpenMP threads can thrash when cores are shared.
            print(f"\neager PyTorch {torch.__version__}, decode + preprocess + forward in one process, no HTTP:")
            eager = {}
            for b in (1, 8):
                for threads in sorted({1, os.cpu_count() or 1}):
                    torch.set_num_threads(threads)
                    r = eager_torch(models.eager, images * 4, spec, b, min(20.0, args.max_seconds))
                    print(f"  batch {b:>2}, {threads} threads: {r['throughput']:.1f} images/s")
                    if r["throughput"] > eager.get(b, {"throughput": 0.0})["throughput"]:
                        eager[b] = r
            if ("predict", 8) in results:
                s8 = results[("predict", 8)]["throughput"]
                e1, e8 = s8 / eager[1]["throughput"], s8 / eager[8]["throughput"]
                print(f"service /predict at concurrency 8 / best eager PyTorch batch 1: {e1:.2f}x"
                      f"   (/ best eager batch 8: {e8:.2f}x)")

        direct = ort_direct(models.fp32, None if args.no_int8 else models.int8, spec, images)
        print("\nONNX Runtime directly (tlops.export.benchmark, 32 preprocessed images):")
        for kind, r in direct.items():
            print(f"  {kind}: batch-1 latency {r['latency_ms']:.2f} ms, batch-32 throughput {r['throughput_ips']:.0f}"
                  " images/s")
        if "int8" in direct:
            speed = direct["int8"]["throughput_ips"] / direct["fp32"]["throughput_ips"]
            lat = direct["fp32"]["latency_ms"] / direct["int8"]["latency_ms"]
            print(f"  int8 / fp32: {speed:.2f}x throughput, {lat:.2f}x batch-1 latency")
            if ("predict int8", 8) in results and ("predict", 8) in results:
                http = results[("predict int8", 8)]["throughput"] / results[("predict", 8)]["throughput"]
                print(f"  through the service (/predict) at concurrency 8: {http:.2f}x")
        total_errors = (sum(r["errors"] for r in results.values())
                        + sum(r["errors"] for rs in drift_runs.values() for r in rs))
        failed = [m for m, e in checks.items() if e]
        print(f"\nerrors in total: {total_errors}" + (f"; answer checks failed: {', '.join(failed)}" if failed else ""))
        return 1 if total_errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
