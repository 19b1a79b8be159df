"""The pipeline flow over dvc.yaml against a real Prefect API, real DVC and a real MLflow store.

Toy stages (a few lines each, in the temp workspace) pin the orchestration: order from dvc.yaml, skip and
record exactly as `dvc repro` does, retries, failures, the workspace lock. The slow tests run the real stages
on tiny data.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import make_images, run_cmd, write_params
from pipeline_support import (
    UP_TO_DATE,
    artifacts_of,
    dvc_status,
    lock_entries,
    running_mlflow_runs,
    states,
    task_run_states,
    toy_workspace,
    write_toy_pipeline,
)

from flows.pipeline import pipeline_flow, run_pipeline
from orchestration import dvc_stages
from orchestration import report as pipeline_report
from orchestration.report import StageRecord
from orchestration.workspace import workspace_lock
from tlops.core.errors import ConfigError, DataError, TlopsError, WorkspaceBusyError
from tlops.tracking import registry, runs


@pytest.fixture
def toy(workspace: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The workspace with a toy dvc.yaml: ingest -> double."""
    with toy_workspace(workspace, monkeypatch, ["ingest", "double"]) as ws:
        yield ws


# ------------------------------------------------------------------ toy stages: orchestration


def test_stages_come_from_dvc_yaml_in_dependency_order_and_must_be_python_m(toy: Path):
    with dvc_stages.open_repo() as repo:
        stages = dvc_stages.pipeline_stages(repo)
    assert [s.name for s in stages] == ["ingest", "double"]
    pkg = stages[0].cmd.split()[-1].split(".")[0]
    # The same stages listed dependents-first, plus one whose cmd cannot run in-process.
    (toy / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "double": {"cmd": f"python -m {pkg}.double", "deps": ["raw"], "outs": ["double.txt"]},
        "ingest": {"cmd": f"python -m {pkg}.ingest", "deps": ["src"], "outs": ["raw"]},
        "report": {"cmd": "bash report.sh", "deps": ["double.txt"], "outs": ["report.txt"]}}}))
    with dvc_stages.open_repo() as repo:
        stages = dvc_stages.pipeline_stages(repo)
    assert [s.name for s in stages] == ["ingest", "double", "report"]
    with pytest.raises(ConfigError, match=r"stage report has cmd 'bash report.sh'.*python -m <module>"):
        dvc_stages.stage_module(stages[2])
    with pytest.raises(ConfigError, match="report"):
        run_pipeline()
    assert not (toy / "raw").exists()  # checked before any stage ran
    assert running_mlflow_runs() == []


def test_first_run_runs_every_stage_and_a_second_skips_them_all_with_dvc_agreeing(toy: Path):
    first = run_pipeline()
    assert states(first) == {"ingest": "ran", "double": "ran"}
    assert first["status"] == "updated"
    assert UP_TO_DATE in dvc_status(toy)
    assert lock_entries(toy) == {"ingest", "double"}
    assert task_run_states(first["flow_run_id"], 2) == {"ingest": "Completed", "double": "Completed"}
    artifacts = artifacts_of(first["flow_run_id"])
    assert "| ingest | ran |" in artifacts["tlops-pipeline"] and "| double | ran |" in artifacts["tlops-pipeline"]
    assert artifacts["tlops-mlflow-run"] == f"[MLflow parent run]({first['mlflow_url']})"  # a link artifact
    assert first["mlflow_url"].endswith(f"/runs/{first['mlflow_run_id']}")

    second = run_pipeline()
    assert states(second) == {"ingest": "skipped", "double": "skipped"}
    assert second["status"] == "no change"
    assert task_run_states(second["flow_run_id"], 2) == {"ingest": "Skipped", "double": "Skipped"}
    assert "**No change**" in artifacts_of(second["flow_run_id"])["tlops-pipeline"]
    assert running_mlflow_runs() == []
    # The outputs went into .dvc/cache: DVC restores a deleted one without running anything.
    (toy / "double.txt").unlink()
    run_cmd([sys.executable, "-m", "dvc", "checkout", "double.txt"], toy)
    assert (toy / "double.txt").read_text().startswith("line 0")


def test_dvc_repro_then_pipeline_skips_all_and_pipeline_then_dvc_repro_does_nothing(toy: Path):
    run_cmd([sys.executable, "-m", "dvc", "repro"], toy)
    assert states(run_pipeline()) == {"ingest": "skipped", "double": "skipped"}
    (toy / "src" / "3.txt").write_text("line 3\n")
    assert states(run_pipeline()) == {"ingest": "ran", "double": "ran"}
    out = run_cmd([sys.executable, "-m", "dvc", "repro"], toy).stdout
    assert "didn't change, skipping" in out and "Running stage" not in out


def test_changed_param_reruns_its_stages_and_a_seen_value_is_restored_from_the_run_cache(toy: Path):
    run_pipeline()
    write_params(toy, {"head": {"epochs": 7}, "schedule": {"retries": 2, "retry_delay_s": 0}})
    changed = run_pipeline()
    assert states(changed) == {"ingest": "skipped", "double": "ran"}
    assert "params.yaml" in changed["stages"][1]["reason"]
    assert UP_TO_DATE in dvc_status(toy)

    write_params(toy, {"schedule": {"retries": 2, "retry_delay_s": 0}})  # back to the first value
    back = run_pipeline()
    assert states(back) == {"ingest": "skipped", "double": "cached"}
    assert task_run_states(back["flow_run_id"], 2)["double"] == "Cached"
    assert UP_TO_DATE in dvc_status(toy)


def test_refresh_reruns_ingest_and_reports_no_change_on_the_same_data_and_force_reruns_all(toy: Path):
    run_pipeline()
    refreshed = run_pipeline(refresh=True)
    assert states(refreshed) == {"ingest": "ran", "double": "skipped"}
    assert refreshed["status"] == "no change"
    assert refreshed["stages"][0]["reason"] == "forced"
    assert states(run_pipeline(force=True)) == {"ingest": "ran", "double": "ran"}


def test_until_runs_a_stage_and_what_it_depends_on_and_the_next_run_goes_on_from_there(toy: Path):
    write_toy_pipeline(toy, ["ingest", "double", "flaky"])
    with pytest.raises(ConfigError, match=r"no stage 'triple' \(its stages: ingest, double, flaky\)"):
        run_pipeline(until="triple")
    assert not (toy / "raw").exists()
    first = run_pipeline(until="double")
    assert states(first) == {"ingest": "ran", "double": "ran"}
    assert lock_entries(toy) == {"ingest", "double"} and not (toy / ".attempts" / "flaky").exists()
    # as `dvc repro double` leaves it: the rest of the pipeline is what the next run does
    assert states(run_pipeline()) == {"ingest": "skipped", "double": "skipped", "flaky": "ran"}


def test_a_transient_failure_is_retried(toy: Path):
    write_toy_pipeline(toy, ["ingest", "double", "flaky"])
    summary = run_pipeline()
    assert states(summary)["flaky"] == "ran"
    assert (toy / ".attempts" / "flaky").read_text() == "2"
    assert UP_TO_DATE in dvc_status(toy)


def test_a_data_error_fails_the_flow_run_at_once_and_is_not_recorded(toy: Path):
    write_toy_pipeline(toy, ["ingest", "bad", "double"])
    state = pipeline_flow(return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError, match="min_per_class"):
        state.result()
    assert (toy / ".attempts" / "bad").read_text() == "1"  # permanent: no retry
    assert lock_entries(toy) == {"ingest"}  # nothing recorded for `bad`, and `double` after it never ran
    assert running_mlflow_runs() == []


def test_a_stage_over_its_timeout_fails_with_a_message_naming_the_limit(toy: Path):
    write_params(toy, {"schedule": {"retries": 0, "stage_timeout_s": 1}})
    write_toy_pipeline(toy, ["ingest", "slow"])
    with pytest.raises(TlopsError, match=r"stage slow ran longer than schedule.stage_timeout_s=1 s"):
        run_pipeline()
    assert not (toy / "slow.txt").exists()  # cut off: the stage writes it only after 30 s
    assert "slow" not in lock_entries(toy)
    assert running_mlflow_runs() == []


def test_a_second_run_is_rejected_naming_the_holder_or_waits_up_to_lock_timeout(toy: Path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from orchestration.workspace import "
         "workspace_lock\nwith workspace_lock(Path('.tlops/pipeline.lock')):\n print('held', flush=True); "
         "time.sleep(60)"], cwd=toy, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusyError, match=rf"is busy: another pipeline run holds .*pid {holder.pid}"):
            run_pipeline()
    finally:
        holder.kill()
        holder.wait()
    assert not (toy / "dvc.lock").exists()
    assert running_mlflow_runs() == []

    write_params(toy, {"schedule": {"lock_timeout_s": 30}})
    held = threading.Event()

    def hold() -> None:
        with workspace_lock(Path(".tlops/pipeline.lock")):
            held.set()
            time.sleep(2)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    summary = run_pipeline()  # with lock_timeout_s 0 this would be rejected
    thread.join()
    assert summary["status"] == "updated"


# ------------------------------------------------------------------ the real stages, tiny data


@pytest.fixture
def real(workspace: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project's own dvc.yaml on a generated image folder, tiny params, its own MLflow experiment."""
    monkeypatch.setenv(runs.EXPERIMENT_ENV, f"test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv(runs.PARENT_ENV, raising=False)
    make_images(workspace.parent / "images", classes=3, per_class=8)
    write_params(workspace, {"data": {"source": "imagefolder", "path": str(workspace.parent / "images")}})
    return workspace


@pytest.mark.slow
def test_real_pipeline_runs_end_to_end_then_skips_then_reruns_only_after_a_finetune_param(real: Path):
    first = run_pipeline()
    stages = ["ingest", "prepare", "features", "audit", "train_head", "finetune", "ingest_target", "adapt", "evaluate", "export"]
    assert states(first) == dict.fromkeys(stages, "ran")
    assert set(first["metrics"]) == {"head", "finetuned"}
    assert first["data_version"] and first["data_version"].endswith(".dir")
    assert UP_TO_DATE in dvc_status(real)

    second = run_pipeline()
    assert states(second) == dict.fromkeys(stages, "skipped")
    assert second["status"] == "no change"

    params = yaml.safe_load((real / "params.yaml").read_text())
    lr = params["finetune"]["lr"]
    params["finetune"]["lr"] = lr * 2
    (real / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run_pipeline()
    ran = {name for name, state in states(third).items() if state == "ran"}
    assert ran == {"finetune", "adapt", "evaluate", "export"}
    assert UP_TO_DATE in dvc_status(real)
    c = runs.client()
    children = c.search_runs([runs.experiment_id(c)],
                             filter_string=f"tags.mlflow.parentRunId = '{third['mlflow_run_id']}'")
    assert sorted(r.info.run_name for r in children) == ["adapt", "evaluate", "export", "finetune"]
    assert running_mlflow_runs() == []

    # Back to the first lr: DVC's run cache has that export, but restoring it would skip the registry and the
    # gate; export runs again, registers a new candidate and compares it with today's champion.
    params["finetune"]["lr"] = lr
    (real / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = run_pipeline()
    assert states(fourth)["export"] == "ran"
    name = params["export"]["registered_model"]
    assert fourth["promotion"]["candidate_version"] == registry.get_alias_version(name, registry.CANDIDATE)
    assert fourth["promotion"]["candidate_version"] != third["promotion"]["candidate_version"]


@pytest.mark.slow
def test_tlops_stage_runs_one_stage_as_a_prefect_flow_run_and_refuses_an_unknown_stage(real: Path):
    for stage in ("ingest", "prepare"):
        run_cmd([sys.executable, "-m", "tlops.cli", "stage", stage], real)
    from tlops.data.manifest import load_manifest

    assert len(load_manifest(real / "data/prepared/manifest.csv").rows) == 24
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        flows_run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["prepare"])))
    assert any(r.state.is_completed() for r in flows_run)
    unknown = run_cmd([sys.executable, "-m", "tlops.cli", "stage", "nosuch"], real, check=False)
    assert unknown.returncode == 2 and "no stage named 'nosuch'" in unknown.stderr


@pytest.mark.slow
def test_real_prepare_failing_on_data_fails_the_flow_and_leaves_dvc_and_mlflow_consistent(real: Path):
    write_params(real, {"data": {"source": "imagefolder", "path": str(real.parent / "images"), "min_per_class": 50}})
    state = pipeline_flow(return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError, match="min_per_class"):
        state.result()
    assert lock_entries(real) == {"ingest"}
    assert running_mlflow_runs() == []
    c = runs.client()
    prepare_runs = c.search_runs([runs.experiment_id(c)], filter_string="tags.stage = 'prepare'")
    assert [r.info.status for r in prepare_runs] == ["FAILED"]  # one attempt: a data error is not retried


@pytest.mark.slow
def test_tlops_run_without_a_prefect_server_uses_a_temporary_one_and_leaves_nothing_behind(toy: Path,
                                                                                          tmp_path: Path):
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "INFO",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    proc = subprocess.run(["tlops", "run"], cwd=toy, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "Error logging to API" not in output
    assert lock_entries(toy) == {"ingest", "double"}

    # The server kept its database: the run and its logs reached it before it stopped, and it did stop.
    with sqlite3.connect(home / "prefect.db") as db:
        assert db.execute("select flow.name, flow_run.state_type from flow_run join flow on flow.id = flow_run.flow_id"
                          ).fetchall() == [("pipeline", "COMPLETED")]
        assert sorted(n for (n,) in db.execute("select name from task_run")) == ["double", "ingest"]
        assert db.execute("select count(*) from log where message like '%Finished in state Completed%'"
                          ).fetchone()[0] >= 3
    assert servers_using(home) == []


def servers_using(prefect_home: Path) -> list[int]:
    """Pids of live Prefect API servers started with this PREFECT_HOME (Linux /proc)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"prefect.server.api.server:create_app" in cmdline and f"PREFECT_HOME={prefect_home}".encode() in environ:
            pids.append(int(proc.name))
    return pids


# ------------------------------------------------------------------ pieces without a pipeline run


def test_the_workspace_lock_is_released_when_its_holder_is_killed(tmp_path: Path):
    lock = tmp_path / ".tlops" / "pipeline.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from pathlib import Path; from orchestration.workspace import workspace_lock\n"
         f"with workspace_lock(Path({str(lock)!r})):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkspaceBusyError, match=f"pid {holder.pid}"):
        with workspace_lock(lock):
            pass
    holder.kill()  # SIGKILL: no cleanup ran, the kernel drops the flock
    holder.wait()
    with workspace_lock(lock):
        assert "pid" in lock.read_text()
    assert lock.read_text() == ""


def test_the_run_outcome_and_its_report():
    ran = StageRecord("ingest", "ran", 1.0, "forced", outputs_changed=False)
    skipped = StageRecord("prepare", "skipped", 0.1, "unchanged since dvc.lock")
    assert pipeline_report.outcome([ran, skipped]) == "no change"  # a refresh that found the same data
    assert pipeline_report.outcome([StageRecord("ingest", "ran", 1.0, "", outputs_changed=True), skipped]) == \
        "updated"
    assert pipeline_report.outcome([StageRecord("ingest", "failed", 1.0, "DataError: x")]) == "failed"

    summary = pipeline_report.summarise([ran, skipped], 2.0, "abc.dir", "r1", "http://mlflow/#/x", None)
    text = pipeline_report.markdown(summary)
    assert "| ingest | ran | 1.0 | forced |" in text and "**No change**" in text and "`abc.dir`" in text
    assert pipeline_report.mlflow_run_url("http://mlflow:5000/", "3", "r1") == "http://mlflow:5000/#/experiments/3/runs/r1"
    assert pipeline_report.mlflow_run_url("sqlite:///x/mlflow.db", "3", "r1").startswith("http://127.0.0.1:5000/#/")
    assert pipeline_report.promotion_line({"promoted": False, "reason": "0.95 < champion 0.97"}) == \
        "not promoted (0.95 < champion 0.97)"
