"""`tlops run` killed with SIGKILL in the middle of fine-tuning, then run again: nothing is lost or half-recorded, the
orphaned MLflow runs end KILLED, and fine-tuning resumes to exactly the weights of a run that was never killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import make_images, make_workspace, run_cmd, write_params
from pipeline_support import UP_TO_DATE
from test_pipeline import servers_using

from tlops.core import paths
from tlops.core.io import sha256_file
from tlops.tracking import runs

# Slow enough per epoch (96 px, 40 images a class) that the kill lands between two checkpoints.
PARAMS = {"model": {"image_size": 96}, "finetune": {"epochs": 5}}


def _workspace(root: Path, images: Path) -> tuple[Path, dict[str, str]]:
    ws = make_workspace(root)
    write_params(ws, {**PARAMS, "data": {"source": "imagefolder", "path": str(images)},
                      "export": {"registered_model": f"crash-{uuid.uuid4().hex[:8]}"}})
    run_cmd(["git", "commit", "-qam", "params"], ws)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # a temporary Prefect server per run
    env |= {"PREFECT_HOME": str(root / "prefect-home"), runs.EXPERIMENT_ENV: f"crash-{uuid.uuid4().hex[:8]}",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    env.pop(runs.PARENT_ENV, None)
    return ws, env


def _tlops_run(ws: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(["tlops", "run"], cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _runs(env: dict[str, str]) -> list:
    c = runs.client()
    exp = c.get_experiment_by_name(env[runs.EXPERIMENT_ENV])
    return c.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
def test_sigkill_during_finetune_then_rerun_resumes_to_the_uninterrupted_weights(tmp_path: Path):
    images = tmp_path / "images"
    make_images(images, classes=3, per_class=40, size=48)
    ws, env = _workspace(tmp_path / "killed", images)
    checkpoint = ws / paths.CHECKPOINT_DIR / "epoch_0002.pt"

    run = subprocess.Popen(["tlops", "run"], cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not checkpoint.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert run.poll() is None, "the run ended before the kill: fine-tuning is too fast for this test"
        assert checkpoint.exists(), "no second checkpoint within the time limit"
        servers = [p.pid for p in psutil.Process(run.pid).children(recursive=True)]
        run.kill()  # SIGKILL: no handler, no finally, no atexit in the run
    finally:
        run.kill()
        run.wait()
    killed_pid = str(run.pid)

    # The temporary Prefect server went with its run.
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in servers) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert servers and not [p for p in servers if psutil.pid_exists(p)
                            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert servers_using(tmp_path / "killed" / "prefect-home") == []

    # dvc.lock parses and holds the stages that finished, nothing of the one that was cut off.
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"ingest", "prepare", "features", "audit", "train_head"}
    status = run_cmd([sys.executable, "-m", "dvc", "status"], ws).stdout
    assert {"finetune:", "evaluate:", "export:"} <= {line.strip() for line in status.splitlines()}
    assert not {"ingest:", "prepare:", "features:", "audit:", "train_head:"} & {line.strip() for line in status.splitlines()}
    orphans = {r.info.run_id: r.data.tags.get("stage", "pipeline") for r in _runs(env)
               if r.data.tags.get(runs.TAG_PID) == killed_pid and r.info.status == "RUNNING"}
    assert sorted(orphans.values()) == ["finetune", "pipeline"]  # left RUNNING by the dead process

    _tlops_run(ws, env)
    [finetune] = [r for r in _runs(env) if r.data.tags.get("stage") == "finetune" and r.info.status == "FINISHED"]
    assert finetune.data.metrics["resumed_epochs"] >= 2  # from the last checkpoint, not from the start
    assert {r.info.status for r in _runs(env) if r.info.run_id in orphans} == {"KILLED"}
    resumed = sha256_file(ws / paths.FINETUNE_WEIGHTS)

    fresh, fresh_env = _workspace(tmp_path / "uninterrupted", images)
    _tlops_run(fresh, fresh_env)
    assert sha256_file(fresh / paths.FINETUNE_WEIGHTS) == resumed
    assert UP_TO_DATE in run_cmd([sys.executable, "-m", "dvc", "status"], ws).stdout
