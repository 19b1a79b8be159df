"""tlops sweep: a grid as deployment runs on a process pool, taken by two real process workers at once, each trial in
its own clone, compared at the end and logged under one MLflow parent run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_images, run_cmd, write_params

POOL = "sweep-test"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_grid_runs_its_trials_on_two_workers_at_once(workspace: Path, prefect_api: str, capsys) -> None:
    from flows.sweep import table
    from tlops.tracking import runs

    make_images(workspace.parent / "images", classes=3, per_class=8, size=32)
    write_params(workspace, {"data": {"source": "imagefolder", "path": str(workspace.parent / "images")}})
    run_cmd(["git", "add", "-A"], workspace)
    run_cmd(["git", "commit", "-qm", "sweep base"], workspace)
    workers = [subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type",
                                 "process", "--limit", "1", "--name", f"w{i}"], cwd=workspace,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:  # the command, as a user runs it
        out = run_cmd([sys.executable, "-m", "tlops.cli", "sweep", "--grid", "finetune.lr=1e-3,3e-3", "--grid",
                       "head.dropout=0.3", "--concurrency", "2", "--pool", POOL, "--timeout", "720", "--json"],
                      workspace)
        result = json.loads(out.stdout)
    finally:
        for w in workers:
            w.send_signal(signal.SIGINT)
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
    trials = result["trials"]
    assert [t["state"] for t in trials] == ["COMPLETED"] * 2, trials
    assert sorted((t["params"]["finetune.lr"], t["params"]["head.dropout"]) for t in trials) == \
        [(0.001, 0.3), (0.003, 0.3)]
    scores = [t["score"] for t in trials]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    folders = {t["folder"] for t in trials}
    assert len(folders) == 2 and not (workspace / "reports/metrics.json").exists()  # never the project's workspace
    for t in trials:
        params = (Path(t["folder"]) / "params.yaml").read_text()
        assert f"lr: {t['params']['finetune.lr']}" in params and f"dropout: {t['params']['head.dropout']}" in params
        assert "registered_model: tlops-classifier-sweep" in params  # never the production champion's model
    c = runs.client()
    children = c.search_runs([runs.experiment_id(c)],
                             f"tags.mlflow.parentRunId = '{result['mlflow_parent_run_id']}'")
    assert len(children) == 2 and all("test_score" in r.data.metrics for r in children)
    from rich.console import Console

    Console(width=200).print(table(result))
    out = capsys.readouterr().out
    assert out.count("COMPLETED") == 2 and "fine-tuned" in out
    from prefect import get_client

    with get_client(sync_client=True) as client:
        d = client.read_deployment_by_name("sweep-trial/sweep")
        assert (d.concurrency_limit or d.global_concurrency_limit.limit) == 2
        first, second = (client.read_flow_run(t["flow_run_id"]) for t in trials)
    # both workers busy at once: the two trials' runs overlap in time
    assert first.start_time < second.end_time and second.start_time < first.end_time
