"""flows/drift_check.py against a stand-in service that answers GET /drift only: which folder it adapts to, the key
it presents, the CA it trusts. The loop with the real service and Prefect API is in test_deploy.py."""

from __future__ import annotations

import datetime
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows.drift_check import drift_check_flow, read_drift
from tlops.core.errors import ConfigError, TlopsError

DRIFTED = {"window": 60, "embedding": 1.95, "prediction": 0.019, "confidence": 0.154, "threshold": 1.0,
           "drifted": True, "input_kind": "image"}
KEY = "k" * 24


class StandIn(ThreadingHTTPServer):
    """Answers GET /drift with `answer`; with `key`, 401 unless `Authorization: Bearer <key>`; keeps each header."""

    def __init__(self, answer: dict, key: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer, self.key, self.seen = answer, key, []

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: StandIn

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        auth = self.headers.get("Authorization")
        self.server.seen.append(auth)
        ok = self.path == "/drift" and (self.server.key is None or auth == f"Bearer {self.server.key}")
        body = json.dumps(self.server.answer if ok else {"error": "unauthorized"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def running(server: StandIn) -> Iterator[StandIn]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def keyed() -> Iterator[StandIn]:
    """A drifted service that wants KEY, and names a folder of its choosing in /drift, as an old one did."""
    with running(StandIn({**DRIFTED, "log_inputs": "/srv/chosen-by-the-service"}, key=KEY)) as server:
        yield server


def test_the_folder_is_the_operators_never_the_one_the_service_names(keyed: StandIn, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TLOPS_TEST_KEY", KEY)
    check = {"url": keyed.url, "api_key_env": "TLOPS_TEST_KEY", "dry_run": True}
    with pytest.raises(ConfigError, match="--target"):
        drift_check_flow.fn(**check)
    result = drift_check_flow.fn(target=str(tmp_path / "inputs"), **check)
    assert result["set_params"] == {"adapt.target": str(tmp_path / "inputs"), "adapt.method": "auto"}


def test_the_first_key_of_the_key_file_is_sent_as_a_bearer_token_and_never_printed(
        keyed: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture):
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n{'n' * 24}\n")  # the next key, for rotation, comes second
    result = drift_check_flow.fn(url=keyed.url, api_key_file=str(keys), target=str(tmp_path), dry_run=True)
    assert result["drifted"] and keyed.seen == [f"Bearer {KEY}"]
    assert KEY not in capsys.readouterr().out + json.dumps(result)


def test_a_service_that_wants_a_key_says_which_setting_gives_it(keyed: StandIn, tmp_path: Path):
    with pytest.raises(TlopsError, match="answered 401: it wants an API key: set serve.api_key_env"):
        read_drift(keyed.url)
    with pytest.raises(TlopsError, match="refused the key") as e:
        read_drift(keyed.url, key="w" * 24)
    assert "w" * 24 not in str(e.value)
    with pytest.raises(ConfigError, match="TLOPS_NOT_SET is not set"):
        drift_check_flow.fn(url=keyed.url, api_key_env="TLOPS_NOT_SET", target=str(tmp_path), dry_run=True)
    assert keyed.seen == [None, "Bearer " + "w" * 24]  # a missing key is found before anything is sent


def private_ca(folder: Path) -> tuple[Path, ssl.SSLContext]:
    """(the CA's PEM file, a server context whose certificate for 127.0.0.1 that CA signed)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("tlops test CA", ca_key, "tlops test CA", ca_key, ca=True)
    server_cert = cert("127.0.0.1", server_key, "tlops test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (folder / "server.pem").write_bytes(server_cert.public_bytes(pem) + server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.pem")
    return folder / "ca.pem", context


def test_ca_verifies_a_service_certificate_that_a_private_ca_signed(tmp_path: Path):
    ca, context = private_ca(tmp_path)
    server = StandIn(DRIFTED)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with running(server) as s:
        assert read_drift(s.url, ca=str(ca))["drifted"]
        with pytest.raises(TlopsError, match="CERTIFICATE_VERIFY_FAILED"):
            read_drift(s.url)  # the system's CAs do not know it
    with pytest.raises(ConfigError, match="--ca .*missing.pem: not a readable PEM"):
        read_drift(server.url, ca=str(tmp_path / "missing.pem"))


def test_the_cli_takes_the_folder_and_the_key_reference_from_the_params(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    import flows.drift_check
    from tlops.cli import app

    seen: dict = {}
    monkeypatch.setattr(flows.drift_check, "drift_check_flow", lambda **kw: seen.update(kw))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("serve:\n  log_inputs: logged\n  api_key_env: TLOPS_API_KEY\n")
    out = CliRunner().invoke(app, ["drift-check", "--ca", "ca.pem"])
    assert out.exit_code == 0, out.output
    assert seen["target"] == str(tmp_path / "logged") and seen["ca"] == str(tmp_path / "ca.pem")
    assert (seen["api_key_env"], seen["api_key_file"]) == ("TLOPS_API_KEY", None)
    assert (seen["auto_approve"], seen["approval_timeout"]) == (False, 24 * 3600)
    out = CliRunner().invoke(app, ["drift-check", "--target", "elsewhere", "--auto-approve"])
    assert seen["target"] == str(tmp_path / "elsewhere") and seen["auto_approve"]
