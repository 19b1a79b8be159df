"""Scheduled runs against a real Prefect API: the deployment `tlops deploy` creates, a process worker running it,
the same schedule served in-process, and prefect.yaml for `prefect deploy`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, write_params
from pipeline_support import UP_TO_DATE, dvc_status, lock_entries, toy_workspace

from flows.deploy import cron_schedule, deploy, ensure_process_pool, job_variables
from tlops.core.config import Params, ScheduleParams, load_params
from tlops.core.errors import ConfigError


@pytest.fixture
def toy(workspace: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A toy pipeline (ingest -> env: records the env it ran with) and a schedule section of its own."""
    with toy_workspace(workspace, monkeypatch, ["ingest", "env"]) as ws:
        uid = uuid.uuid4().hex[:6]
        write_params(ws, {"schedule": {"work_pool": f"pool-{uid}", "deployment": f"nightly-{uid}",
                                       "cron": "30 4 * * 1-5", "timezone": "Europe/Berlin",
                                       "env": {"TLOPS_TEST_ENV": "from-the-deployment"},
                                       "retries": 0}})
        yield ws


def read_deployment(name: str):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def wait_for_flow_run(flow_run_id, timeout_s: float = 240):
    """The flow run once it is in a final state (or as it is at the timeout)."""
    from prefect import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if (run.state and run.state.is_final()) or time.monotonic() > deadline:
                return run
            time.sleep(0.5)


@pytest.mark.slow
def test_deploy_creates_a_cron_deployment_on_a_process_pool_and_a_worker_runs_it(toy: Path):
    from prefect.deployments import run_deployment

    params = load_params()
    s = params.schedule
    info = deploy(params)
    assert info["name"] == f"pipeline/{s.deployment}" and info["work_pool_type"] == "process"

    d = read_deployment(info["name"])
    assert d.work_pool_name == s.work_pool
    assert [(x.schedule.cron, x.schedule.timezone, x.active) for x in d.schedules] == \
        [("30 4 * * 1-5", "Europe/Berlin", True)]
    assert d.parameters == {"refresh": True}
    assert d.job_variables == {"env": {"PREFECT_LOGGING_EXTRA_LOGGERS": "tlops", "CUDA_VISIBLE_DEVICES": "0",
                                       "TLOPS_TEST_ENV": "from-the-deployment"}, "working_dir": str(toy)}
    assert d.entrypoint == "flows/pipeline.py:pipeline_flow"

    assert deploy(params)["deployment_id"] == info["deployment_id"]  # redeploying updates it in place
    assert len(read_deployment(info["name"]).schedules) == 1

    flow_run = run_deployment(info["name"], timeout=0)
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", s.work_pool, "--type", "process",
         "--run-once"], cwd=toy.parent, capture_output=True, text=True, timeout=300)
    run = wait_for_flow_run(flow_run.id, timeout_s=30)
    assert run.state.is_completed(), f"{run.state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
    assert (toy / "env.txt").read_text() == "from-the-deployment"
    assert lock_entries(toy) == {"ingest", "env"}
    assert UP_TO_DATE in dvc_status(toy)


@pytest.mark.slow
def test_serve_schedule_serves_the_pipeline_on_its_schedule_in_one_process(toy: Path):
    from prefect.deployments import run_deployment

    s = load_params().schedule
    server = subprocess.Popen(
        [sys.executable, "-c", "from flows.deploy import serve_schedule; from tlops.core.config import load_params; "
         "serve_schedule(load_params())"], cwd=toy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        name = f"pipeline/{s.deployment}"
        deadline = time.monotonic() + 120
        while True:
            try:
                d = read_deployment(name)
                break
            except Exception:  # not registered yet
                assert server.poll() is None, server.stderr.read()
                assert time.monotonic() < deadline, "serve_schedule registered no deployment"
                time.sleep(0.5)
        assert [(x.schedule.cron, x.schedule.timezone) for x in d.schedules] == [("30 4 * * 1-5", "Europe/Berlin")]
        assert d.parameters == {"refresh": True}
        run = wait_for_flow_run(run_deployment(name, timeout=0).id)
        assert run.state.is_completed(), run.state
        assert (toy / "env.txt").read_text() == "from-the-deployment"
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_bad_schedule_values_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"schedule.timezone: 'Mars/Olympus' is not an IANA time zone"):
        cron_schedule(ScheduleParams(timezone="Mars/Olympus"))
    with pytest.raises(ConfigError, match=r"schedule.cron: '61 \* \* \* \*' is not a valid cron expression"):
        cron_schedule(ScheduleParams(cron="61 * * * *"))


def test_deploy_without_a_prefect_server_says_how_to_start_one(tmp_path: Path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}), pytest.raises(ConfigError, match="prefect server start"):
        deploy(Params(), root=tmp_path)


def test_prefect_yaml_declares_the_deployment_that_tlops_deploy_creates(workspace: Path, prefect_api: str):
    """`prefect deploy` reads prefect.yaml; its values must be params.yaml's schedule section."""
    text = (ROOT / "prefect.yaml").read_text()
    (workspace / "prefect.yaml").write_text(text)
    spec = yaml.safe_load(text)["deployments"][0]
    s = load_params().schedule
    assert spec["name"] == s.deployment and spec["work_pool"]["name"] == s.work_pool
    assert spec["schedules"][0]["cron"] == s.cron and spec["schedules"][0]["timezone"] == s.timezone
    assert spec["work_pool"]["job_variables"]["env"] == job_variables(s, workspace)["env"]
    assert spec["parameters"] == {"refresh": True}

    ensure_process_pool(s.work_pool)
    env = {**os.environ, "PWD": str(workspace)}
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=workspace,
                          env=env, capture_output=True, text=True, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Deployment 'pipeline/nightly' successfully created" in output
    d = read_deployment(f"pipeline/{s.deployment}")
    assert d.work_pool_name == s.work_pool
    assert [(x.schedule.cron, x.schedule.timezone) for x in d.schedules] == [(s.cron, s.timezone)]
    assert d.parameters == {"refresh": True}
    assert d.job_variables["working_dir"] == str(workspace)
    assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(workspace)}}]


@pytest.mark.slow
def test_drift_check_auto_approved_starts_the_deployment_on_the_given_folder_and_the_run_sets_adapt_target(
        toy: Path, tmp_path: Path):
    """The loop: a drifting service -> `tlops drift-check --auto-approve` -> a deployment run whose params point
    adapt at the folder the operator named (the one the service keeps its inputs in)."""
    from conftest import make_images
    from serving_support import ThreadServer, export_tiny_model, serve_params, wait_for
    from test_serving_drift import post_all, shifted_images

    from flows.drift_check import drift_check_flow

    info = deploy(load_params())
    reference = make_images(tmp_path / "reference", classes=3, per_class=20, size=24)
    model = export_tiny_model(tmp_path / "model.onnx", reference_images=reference)
    logged = tmp_path / "logged"
    check = {"deployment": info["name"], "target": str(logged)}
    with ThreadServer(serve_params(drift_window=60, log_inputs=str(logged), log_sample=1.0), str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        post_all(s.url, make_images(tmp_path / "live", classes=3, per_class=20, size=24, seed=1))
        calm = drift_check_flow(url=s.url, **check)
        assert not calm["drifted"] and calm["flow_run_id"] is None
        post_all(s.url, shifted_images(tmp_path / "shifted", 60))
        result = drift_check_flow(url=s.url, auto_approve=True, **check)
        again = drift_check_flow(url=s.url, **check)  # still drifted: the queued run is enough, nobody is asked
    assert result["drifted"] and result["set_params"] == {"adapt.target": str(logged), "adapt.method": "auto"}
    assert result["approval"] == "auto"
    assert again["already_pending"] and again["flow_run_id"] == result["flow_run_id"] and "approval" not in again
    assert len(list(logged.iterdir())) == 120  # every distinct image, sample 1.0

    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", load_params().schedule.work_pool, "--type",
         "process", "--run-once"], cwd=toy.parent, capture_output=True, text=True, timeout=300)
    run = wait_for_flow_run(result["flow_run_id"], timeout_s=30)
    assert run.state.is_completed(), f"{run.state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
    assert run.parameters["set_params"] == result["set_params"]
    after = load_params(toy / "params.yaml")  # the run wrote them, comments and all, as dvc exp run -S does
    assert (after.adapt.target, after.adapt.method) == (str(logged), "auto")
    assert after.schedule.deployment == load_params().schedule.deployment


@pytest.fixture(scope="module")
def drifted_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(url, folder): a running service whose window holds 60 images of another domain, every one kept in folder."""
    from conftest import make_images
    from serving_support import ThreadServer, export_tiny_model, serve_params, wait_for
    from test_serving_drift import post_all, shifted_images

    tmp = tmp_path_factory.mktemp("drifted")
    model = export_tiny_model(tmp / "model.onnx", reference_images=make_images(tmp / "reference", per_class=20))
    logged = tmp / "logged"
    with ThreadServer(serve_params(drift_window=60, log_inputs=str(logged), log_sample=1.0), str(model)) as s:
        wait_for(f"{s.url}/v2/health/ready")
        post_all(s.url, shifted_images(tmp / "shifted", 60))
        yield s.url, logged


def check_in_background(**kwargs) -> tuple[threading.Thread, dict]:
    """drift_check_flow(**kwargs) in a thread (it blocks while paused); the dict gets its result."""
    from flows.drift_check import drift_check_flow

    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(drift_check_flow(**kwargs)), daemon=True)
    thread.start()
    return thread, out


def paused_check(deployment: str, timeout_s: float = 30):
    """(the paused drift-check flow run for `deployment`, the description it asks approval with)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.input.actions import read_flow_run_input
    from prefect.input.run_input import keyset_from_paused_state

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            mine = [r for r in runs if r.parameters.get("deployment") == deployment]
            if mine:  # the description is written just after the pause
                description = read_flow_run_input(keyset_from_paused_state(mine[0].state)["description"],
                                                  flow_run_id=mine[0].id)
                if description:
                    return mine[0], description
            time.sleep(0.2)
    raise AssertionError(f"no drift-check for {deployment} paused within {timeout_s:g} s")


def runs_of(deployment: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        d = client.read_deployment_by_name(deployment)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])))


def test_drift_check_pauses_for_approval_describing_the_folder_and_starts_the_run_once_approved(
        toy: Path, drifted_service: tuple[str, Path], monkeypatch: pytest.MonkeyPatch):
    from prefect.flow_runs import resume_flow_run

    import flows.drift_check

    monkeypatch.setattr(flows.drift_check, "APPROVAL_POLL_S", 0.5)
    url, logged = drifted_service
    info = deploy(load_params())
    thread, result = check_in_background(url=url, deployment=info["name"], target=str(logged))
    paused, description = paused_check(info["name"])
    size = sum(f.stat().st_size for f in logged.iterdir())
    assert f"`{logged}`: 60 files" in description and f"({size} bytes)" in description
    embedding = flows.drift_check.read_drift(url)["embedding"]
    assert f"embedding shift {embedding:.3f} (threshold 1.000)" in description, description
    assert runs_of(info["name"]) == []  # nothing starts while a person decides

    resume_flow_run(paused.id, run_input={"approve": True})
    thread.join(timeout=30)
    assert result["approval"] == "approved" and result["flow_run_id"], result
    [run] = runs_of(info["name"])
    assert str(run.id) == result["flow_run_id"]
    assert run.parameters["set_params"] == {"adapt.target": str(logged), "adapt.method": "auto"}


def test_drift_check_rejected_starts_nothing_and_says_so(toy: Path, drifted_service: tuple[str, Path],
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture):
    from prefect.flow_runs import resume_flow_run

    import flows.drift_check

    monkeypatch.setattr(flows.drift_check, "APPROVAL_POLL_S", 0.5)
    url, logged = drifted_service
    info = deploy(load_params())
    caplog.set_level(logging.INFO, logger="prefect.flow_runs")  # where log_prints sends the flow's prints
    thread, result = check_in_background(url=url, deployment=info["name"], target=str(logged))
    paused, _ = paused_check(info["name"])
    resume_flow_run(paused.id, run_input={"approve": False})
    thread.join(timeout=30)
    assert result["approval"] == "rejected" and result["flow_run_id"] is None, result
    assert runs_of(info["name"]) == []
    assert "rejected: started nothing" in caplog.text


def test_drift_check_unanswered_within_the_approval_timeout_starts_nothing(
        toy: Path, drifted_service: tuple[str, Path], monkeypatch: pytest.MonkeyPatch):
    import flows.drift_check

    monkeypatch.setattr(flows.drift_check, "APPROVAL_POLL_S", 0.5)
    url, logged = drifted_service
    info = deploy(load_params())
    result = flows.drift_check.drift_check_flow(url=url, deployment=info["name"], target=str(logged),
                                                approval_timeout=1)
    assert result["approval"] == "timed out" and result["flow_run_id"] is None, result
    assert runs_of(info["name"]) == []

