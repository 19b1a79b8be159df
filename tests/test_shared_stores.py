"""Shared stores on real servers: an MLflow tracking server on PostgreSQL with its artifacts on S3 (moto's server),
the tiny pipeline tracked and registered through it, and a DVC remote on the same S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    S3_KEYS,
    create_database,
    free_tcp_port,
    make_images,
    make_workspace,
    run_cmd,
    run_stage_tasks,
    s3_client,
    write_params,
)
from serving_support import wait_for_process

ALL = ("ingest", "prepare", "features", "audit", "train_head", "finetune", "ingest_target", "adapt", "evaluate", "export")


@pytest.fixture(scope="module")
def mlflow_server(postgres_server: str, s3_server: str, tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server` as the README's recipe runs it: PostgreSQL backend store, artifacts proxied to s3://."""
    s3_client(s3_server).create_bucket(Bucket="tlops-mlflow")
    backend = create_database(postgres_server, "mlflow")
    port = free_tcp_port()
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    env = {**os.environ, **S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": s3_server}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                                 "--artifacts-destination", "s3://tlops-mlflow/artifacts", "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_process(f"{url}/health", proc, log, 120, "mlflow server")
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_pipeline_tracks_and_registers_through_a_server_on_postgres_and_s3(mlflow_server: str, s3_server: str,
                                                                               tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    make_images(tmp_path / "images", classes=3, per_class=8, size=32)
    ws = make_workspace(tmp_path / "ws")
    write_params(ws, {"data": {"source": "imagefolder", "path": str(tmp_path / "images")}})
    run_stage_tasks(ws, ALL, mlflow_server, "shared-stores")
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("shared-stores")
    stages = {r.info.run_name for r in c.search_runs([exp.experiment_id])}
    assert {"ingest", "finetune", "export"} <= stages
    champion = c.get_model_version_by_alias("tlops-classifier", "champion")
    assert champion.version == "1" and c.get_model_version_by_alias("tlops-classifier", "candidate").version == "1"
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/tlops-classifier@champion",
                                                     dst_path=str(tmp_path / "back")))
    assert any(p.suffix == ".onnx" for p in local.rglob("*")), sorted(local.rglob("*"))  # via the server's proxy
    keys = [o["Key"] for o in s3_client(s3_server).list_objects_v2(Bucket="tlops-mlflow").get("Contents", [])]
    assert any(k.endswith(".onnx") for k in keys)  # the bytes live on S3, not on the server's disk


def test_a_dvc_remote_on_s3_moves_a_data_version_between_clones(s3_server: str, workspace: Path, tmp_path: Path,
                                                                 mlflow_store: str) -> None:
    s3_client(s3_server).create_bucket(Bucket="tlops-dvc")
    make_images(tmp_path / "images", classes=3, per_class=6, size=24)
    write_params(workspace, {"data": {"source": "imagefolder", "path": str(tmp_path / "images")}})
    env = {**S3_KEYS}
    dvc = [sys.executable, "-m", "dvc"]
    run_cmd([*dvc, "repro", "prepare"], workspace, env=env)
    run_cmd([*dvc, "remote", "add", "-d", "store", "s3://tlops-dvc/cache"], workspace)
    run_cmd([*dvc, "remote", "modify", "store", "endpointurl", s3_server], workspace)
    run_cmd([*dvc, "push"], workspace, env=env)
    run_cmd(["git", "add", "-A"], workspace)
    run_cmd(["git", "commit", "-qm", "data version on s3"], workspace)
    clone = tmp_path / "clone"
    run_cmd(["git", "clone", "-q", str(workspace), str(clone)], tmp_path)
    run_cmd([*dvc, "pull", "--with-deps", "prepare"], clone, env=env)
    manifest = "data/prepared/manifest.csv"
    assert (clone / manifest).read_bytes() == (workspace / manifest).read_bytes()
    assert "Data and pipelines are up to date." in run_cmd([*dvc, "status", "prepare"], clone, env=env).stdout
    out = run_cmd([*dvc, "repro", "prepare"], clone, env=env).stdout
    assert "Running stage" not in out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_workers_in_their_own_clones_share_the_stores_and_one_champion_is_decided(
        mlflow_server: str, s3_server: str, prefect_api: str, tmp_path: Path) -> None:
    """Two runs at once, each in its own clone (as two workers' deployments run), with --sync: both finish, both
    register, and the promotion gate (serialised by the Prefect server) leaves one champion."""
    from mlflow import MlflowClient

    s3_client(s3_server).create_bucket(Bucket="tlops-team")
    make_images(tmp_path / "images", classes=3, per_class=8, size=32)
    origin = make_workspace(tmp_path / "origin")
    write_params(origin, {"data": {"source": "imagefolder", "path": str(tmp_path / "images")},
                          "export": {"registered_model": "team-model"}})
    dvc = [sys.executable, "-m", "dvc"]
    run_cmd([*dvc, "remote", "add", "-d", "team", "s3://tlops-team/cache"], origin)
    run_cmd([*dvc, "remote", "modify", "team", "endpointurl", s3_server], origin)
    run_cmd(["git", "add", "-A"], origin)
    run_cmd(["git", "commit", "-qm", "team setup"], origin)
    clones = [tmp_path / f"worker{i}" for i in (1, 2)]
    for clone in clones:
        run_cmd(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    env = {**os.environ, **S3_KEYS, "MLFLOW_TRACKING_URI": mlflow_server, "PREFECT_API_URL": prefect_api,
           "TLOPS_EXPERIMENT": "team", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    procs = [subprocess.Popen([sys.executable, "-m", "tlops.cli", "run", "--sync"], cwd=clone, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for clone in clones]
    outputs = [p.communicate(timeout=800)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    c = MlflowClient(mlflow_server)
    versions = sorted(c.search_model_versions("name = 'team-model'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    champion = c.get_model_version_by_alias("team-model", "champion").version
    promoted = [v.version for v in versions if v.tags.get("promotion.promoted") == "True"]
    # the first through the gate had no champion; the second was compared with it (same data: a tie never promotes)
    assert champion == promoted[-1] and len(promoted) >= 1
    second = next(v for v in versions if v.version != promoted[0])
    assert second.tags["promotion.champion_version"] == promoted[0]
    keys = [o["Key"] for o in s3_client(s3_server).list_objects_v2(Bucket="tlops-team").get("Contents", [])]
    assert keys  # both runs pushed their outputs to the team's DVC remote


def test_the_promotion_lock_admits_one_run_at_a_time_even_after_someone_widened_it(prefect_api: str) -> None:
    import threading

    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from orchestration.promotion_lock import promotion_lock

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="tlops-promotion-lock-test", limit=5))
    inside: list[int] = []
    overlaps: list[int] = []

    def run(i: int) -> None:
        with promotion_lock("lock-test", timeout_s=60):
            inside.append(i)
            if len(inside) > 1:
                overlaps.append(i)
            time.sleep(1.0)
            inside.remove(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not overlaps and not any(t.is_alive() for t in threads)
