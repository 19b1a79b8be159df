"""Helpers shared by the serving tests: a tiny exported classifier, a real uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tlops.core.config import ServeParams
from tlops.inputs.images import PreprocessSpec

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["class_0", "class_1", "class_2"]
SPEC = PreprocessSpec(input_size=32, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def export_tiny_model(path: Path, scale: float = 10.0, spec: PreprocessSpec = SPEC,
                      labels: list[str] = LABELS, reference_images: list[Path] | None = None) -> Path:
    """A tiny torch CNN whose logit c is `scale` x the mean of normalised channel c, exported like tlops does.

    make_images paints class c with channel c boosted, so this model classifies those images correctly
    and with clear margins (top-1 never hinges on rounding). With `reference_images`, the model also outputs its
    pooled embedding (the 3 channel means) and carries the drift reference of those images, as an export does.
    """
    import onnx
    import torch

    from tlops.onnx import metadata

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(3, len(labels))
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
                self.conv.bias.zero_()
                self.fc.weight.copy_(scale * torch.eye(len(labels), 3))
                self.fc.bias.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            embedding = self.pool(self.conv(x)).flatten(1)
            return (self.fc(embedding), embedding) if reference_images else self.fc(embedding)

    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, 3, spec.input_size, spec.input_size)
    outputs = ["logits", "embedding"] if reference_images else ["logits"]
    torch.onnx.export(Tiny().eval(), (x,), str(path), input_names=["input"], output_names=outputs,
                      dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}, opset_version=17,
                      dynamo=False)
    model = onnx.load(str(path))
    meta = {metadata.LABELS: json.dumps(labels), metadata.PREPROCESS: spec.to_json(),
            metadata.INPUT_SIZE: str(spec.input_size), metadata.BACKBONE: "tiny_cnn", metadata.DATA_VERSION: "test",
            metadata.GIT_COMMIT: "0" * 40, metadata.MLFLOW_RUN_ID: "", metadata.PARAMS_HASH: "test",
            metadata.CREATED: "2024-01-01T00:00:00Z"}
    if reference_images:
        from tlops.onnx import drift

        meta[metadata.DRIFT_REFERENCE] = drift.to_json(drift.outputs_reference(path, reference_images, spec, 10**7))
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(path))
    metadata.write_sha256(path)
    return path


def export_trusted_model(path: Path, fit_images: list[Path], temperature: float = 2.0, seed: int = 0,
                         spec: PreprocessSpec = SPEC, labels: list[str] = LABELS):
    """The tiny_test backbone + a linear head exported as the export stage does (tlops.export.served): calibrated by
    `temperature`, an OOD fit on `fit_images` with its threshold at their 95th percentile, and the class activation
    maps. Returns the PyTorch module it was exported from (its outputs are the reference)."""
    import torch

    from tlops.evaluate import ood
    from tlops.export.lineage import build_metadata, write_metadata
    from tlops.export.onnx_export import export_onnx
    from tlops.export.served import Served
    from tlops.inputs.model_input import preprocess_batches
    from tlops.models.backbones import create_backbone
    from tlops.models.classifier import Classifier
    from tlops.models.heads import build_head
    from tlops.onnx import metadata

    bb = create_backbone("tiny_test", weights="random", image_size=spec.input_size)
    torch.manual_seed(seed)
    model = Classifier(bb.model, build_head("linear", bb.num_features, len(labels), 8, 0.0)).eval()
    x = np.concatenate(list(preprocess_batches([str(p) for p in fit_images], spec, 10**7)))
    with torch.inference_mode():
        embedding = model.backbone(torch.from_numpy(x)).numpy()
    fit = ood.fit_parts([embedding], np.arange(len(x)) % len(labels), len(labels), [embedding])
    threshold = ood.threshold(ood.combined_score(fit, [embedding]))
    served = Served(model, temperature, fit, "image")
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(served, spec.input_size, path, 17, served.outputs)
    meta = build_metadata(labels, spec, "tiny_test", "test", "0" * 40, "", "test")
    meta.update({metadata.TEMPERATURE: repr(temperature), metadata.EXPLAIN: "image",
                 metadata.OOD: json.dumps({"score": "mahalanobis", "threshold": threshold, "tpr": 0.95})})
    from tlops.onnx import drift

    meta[metadata.DRIFT_REFERENCE] = drift.to_json(drift.outputs_reference(path, fit_images, spec, 10**7))
    write_metadata(path, meta)
    metadata.write_sha256(path)
    return served


def install_model(src: Path, dst: Path) -> None:
    """Put a model and its sidecar at dst the way an export does: each file replaced atomically."""
    for a, b in ((src, dst), (Path(f"{src}.sha256"), Path(f"{dst}.sha256"))):
        tmp = b.with_name(f".{b.name}.tmp")
        tmp.write_bytes(a.read_bytes())
        os.replace(tmp, b)


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_params(**overrides) -> ServeParams:
    base = {"host": "127.0.0.1", "port": free_port(), "max_batch": 8, "max_wait_ms": 5, "max_queue": 64,
            "timeout_ms": 10_000, "max_body_bytes": 200_000, "max_pixels": 1_000_000, "reload_s": 0, "threads": 1,
            "grpc_port": None}
    return ServeParams(**{**base, **overrides})


@functools.cache
def http() -> httpx.Client:
    """One shared client: creating an httpx.Client costs ~0.2 s (its TLS context), too much per request."""
    return httpx.Client(timeout=30.0)


def wait_for_process(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    """Until `url` answers 200, failing with the end of `log` if the process `what` exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{what} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what} not ready within {timeout:g} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def wait_for(url: str, status: int = 200, timeout: float = 20.0, client: httpx.Client | None = None
             ) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = (client or http()).get(url, timeout=2.0)
            if r.status_code == status:
                return r
            last = r.status_code
        except httpx.TransportError as e:
            last = e
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer {status} within {timeout}s (last: {last})")


class ThreadServer:
    """The real app under a real uvicorn server in a background thread of the test process."""

    def __init__(self, params: ServeParams, model: str, client: httpx.Client | None = None) -> None:
        import uvicorn

        from serving.app import create_app, uvicorn_config

        self.params, self.client = params, client  # client: one that trusts the test CA, for a TLS server
        self.app = create_app(params, model)
        self.server = uvicorn.Server(uvicorn_config(self.app, params, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"{'https' if params.tls_cert else 'http'}://{params.host}:{params.port}"

    @property
    def service(self):
        return self.app.state.service

    @property
    def grpc_port(self) -> int | None:
        return self.app.state.grpc_port

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_for(f"{self.url}/v2/health/live", client=self.client)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def reload(self) -> bool:
        return self.service.request_reload().result(timeout=30)


@contextlib.contextmanager
def process_server(params_yaml: Path, model: str, port: int, cwd: Path) -> Iterator[subprocess.Popen]:
    """`python -m serving` in a subprocess (real signals); killed at the end if still running."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--params", str(params_yaml), "--model", model,
                             "--port", str(port)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`, from Prometheus text format."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def make_certs(folder: Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate it signed, as PEM files:
    {ca, server_cert, server_key, client_cert, client_key}."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, key, issuer_name, issuer_key, ca: bool, usage=None, san=None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False,
                                              data_encipherment=False, key_agreement=False, encipher_only=False,
                                              decipher_only=False), critical=True)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("tlops test CA", ca_key, name("tlops test CA"), ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = issue("localhost", server_key, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = issue("a client", client_key, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    out = {}
    for label, obj in (("ca", ca), ("server_cert", server), ("client_cert", client)):
        out[label] = folder / f"{label}.pem"
        out[label].write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    for label, key in (("server_key", server_key), ("client_key", client_key)):
        out[label] = folder / f"{label}.pem"
        out[label].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return out


def text_rows_dicom(name: str) -> bytes:
    """A DICOM whose Rows is written as explicit VR LO holding a person's name (a hostile or broken writer)."""
    import pydicom
    from pydicom.dataelem import DataElement

    from tlops.inputs import dicom

    ds = pydicom.dcmread(io.BytesIO(dicom.encode(np.zeros((8, 8), np.uint16))), force=True)
    ds[0x00280010] = DataElement(0x00280010, "LO", name)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
