"""The README's team setup with auth, on real servers on loopback: `mlflow server --app-name basic-auth` (a worker
registers and moves `champion`, the service resolves it with read-only credentials and cannot move it, nobody without
credentials gets in) and `prefect server start` with an auth string (a run records only with the client's string)."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ROOT
from serving_support import LABELS, export_tiny_model, free_port, wait_for_process

CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@contextmanager
def server(argv: list[str], env: dict[str, str], health: str, log: Path, what: str) -> Iterator[None]:
    """A server in its own process group, up (`health` answers 200) for the body, then stopped with its children."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_process(health, proc, log, 120, what)
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # mlflow server's job consumers and uvicorn workers go with it
        proc.wait(timeout=30)


def password() -> str:
    return f"Pw-{secrets.token_urlsafe(18)}"  # MLflow's policy wants 12+ characters


def login(monkeypatch: pytest.MonkeyPatch, user: str | None, pw: str | None = None) -> None:
    """Act as `user` (None: no credentials), as a worker or the service does: through the environment."""
    for name, value in zip(CREDENTIALS, (user, pw), strict=True):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_with_basic_auth_lets_a_worker_move_champion_and_the_service_only_read_it(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from serving.served_model import ModelSource
    from tlops.core.errors import ConfigError
    from tlops.tracking import registry, runs

    admin_pw, worker_pw, other_pw, serve_pw = password(), password(), password(), password()
    config = tmp_path / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\n"  # any known user reads; nobody else gets in
                      f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
                      f"admin_username = admin\nadmin_password = {admin_pw}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    env |= {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    argv = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    monkeypatch.chdir(tmp_path)  # the resolver's download cache, .tlops/registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("TLOPS_EXPERIMENT", "team-auth")
    name, uri = "team-auth-model", "models:/team-auth-model@champion"
    with server(argv, env, f"{url}/health", tmp_path / "mlflow.log", "mlflow server --app-name basic-auth"):
        login(monkeypatch, None)
        with pytest.raises(MlflowException) as anonymous:
            runs.client().search_registered_models()
        assert anonymous.value.error_code == "UNAUTHENTICATED"

        login(monkeypatch, "admin", admin_pw)  # the README's one-off user setup
        users = get_app_client("basic-auth", tracking_uri=url)
        for user, pw in (("gpu-a", worker_pw), ("gpu-b", other_pw), ("serve", serve_pw)):
            users.create_user(user, pw)
        for kind in ("experiment", "registered_model"):  # a second worker may edit what the first created
            users.grant_user_permission("gpu-b", kind, "*", "EDIT")

        login(monkeypatch, "gpu-a", worker_pw)
        model = export_tiny_model(tmp_path / "model.onnx")
        version = registry.log_onnx_model(model, np.zeros((1, 3, 32, 32), np.float32), name)
        registry.set_alias(name, registry.CHAMPION, version)
        login(monkeypatch, "gpu-b", other_pw)
        registry.set_alias(name, registry.CHAMPION, version)  # the other worker's promotion gate

        login(monkeypatch, "serve", serve_pw)
        loaded = ModelSource(uri).load()  # the service's own resolver, through the server's artifact proxy
        assert loaded.labels == tuple(LABELS) and registry.get_alias_version(name, registry.CHAMPION) == version
        with pytest.raises(MlflowException) as read_only:
            registry.set_alias(name, registry.CHAMPION, version)
        assert read_only.value.error_code == "PERMISSION_DENIED"  # the service's credentials cannot move champion
        login(monkeypatch, None)
        home = tmp_path / "home"  # what a container gets from a mounted ~/.mlflow/credentials
        (home / ".mlflow").mkdir(parents=True)
        (home / ".mlflow" / "credentials").write_text(
            f"[mlflow]\nmlflow_tracking_username = serve\nmlflow_tracking_password = {serve_pw}\n")
        with monkeypatch.context() as m:
            m.setenv("HOME", str(home))
            assert ModelSource(uri).load().sha256 == loaded.sha256

        wrong = f"wrong-{secrets.token_urlsafe(12)}"
        login(monkeypatch, "serve", wrong)
        with pytest.raises(ConfigError) as by_env:
            ModelSource(uri).load()
        login(monkeypatch, None)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://serve:{wrong}@127.0.0.1:{port}")  # requests reads these
        with pytest.raises(ConfigError) as by_uri:
            ModelSource(uri).load()
    for refused in (by_env, by_uri):
        message = str(refused.value)
        assert "refused the credentials" in message and "MLFLOW_TRACKING_PASSWORD" in message
        assert wrong not in message and serve_pw not in message


FLOW = """
from prefect import flow
from orchestration.promotion_lock import promotion_lock

@flow(name="team-auth")
def team_auth() -> str:
    with promotion_lock("team-auth", timeout_s=60):  # the gate's lock: a global concurrency limit on the server
        return "promoted"

state = team_auth(return_state=True)
print(state.state_details.flow_run_id, state.result())
"""

READ_FLOWS = """
from prefect import get_client
with get_client(sync_client=True) as client:
    print([f.name for f in client.read_flows()])
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_prefect_server_with_an_auth_string_records_only_runs_that_send_it(tmp_path: Path) -> None:
    auth = f"admin:{secrets.token_urlsafe(24)}"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    server_env = base | {"PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_SERVER_API_AUTH_STRING": auth,
                         "PREFECT_UI_ENABLED": "false"}
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    client_env = base | {"PREFECT_HOME": str(tmp_path / "client-home"), "PREFECT_API_URL": api}

    def client(code: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=client_env | env, capture_output=True,
                              text=True, timeout=120)

    with server(argv, server_env, f"{api}/health", tmp_path / "prefect.log", "prefect server start"):
        anonymous = client(READ_FLOWS)
        assert anonymous.returncode != 0 and "401 Unauthorized" in anonymous.stderr, anonymous.stderr[-2000:]
        assert client(FLOW).returncode != 0  # a run without the string never starts
        run = client(FLOW, PREFECT_API_AUTH_STRING=auth)
        assert run.returncode == 0, run.stderr[-3000:]
        run_id, result = run.stdout.split()[-2:]
        assert result == "promoted"
        basic = {"Authorization": f"Basic {base64.b64encode(auth.encode()).decode()}"}
        with httpx.Client(base_url=api, timeout=10) as http:
            assert http.get(f"/flow_runs/{run_id}").status_code == 401
            recorded = http.get(f"/flow_runs/{run_id}", headers=basic)
            assert recorded.status_code == 200 and recorded.json()["state_type"] == "COMPLETED"
            assert http.get("/v2/concurrency_limits/tlops-promotion-team-auth", headers=basic).json()["limit"] == 1
        assert client(READ_FLOWS, PREFECT_API_AUTH_STRING=auth).stdout.strip() == "['team-auth']"
