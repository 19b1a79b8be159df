"""Toy pipelines for the orchestration tests: stages of a few lines, in the temp workspace, and API lookups."""

from __future__ import annotations

import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import run_cmd, write_params

from tlops.tracking import runs

UP_TO_DATE = "Data and pipelines are up to date"

# Toy stage bodies: each becomes <pkg>/<name>.py with `stage_task`, a Prefect task named by the stage.
TOY_BODIES = {
    "ingest": """
        shutil.copytree("src", "raw")
        return {"files": len(os.listdir("raw"))}
    """,
    "double": """
        Path("double.txt").write_text("".join(sorted(p.read_text() for p in Path("raw").iterdir())) * 2)
        return {"epochs": load_params(params_path).head.epochs}
    """,
    "flaky": """
        n = _count("flaky")
        if n < 2:
            raise OSError(f"transient failure {n}")
        Path("flaky.txt").write_text(Path("double.txt").read_text())
        return {"attempts": n}
    """,
    "bad": """
        _count("bad")
        raise DataError("class_0 has 1 valid image, data.min_per_class is 5")
    """,
    "env": """
        Path("env.txt").write_text(os.environ.get("TLOPS_TEST_ENV", "unset"))
        return {}
    """,
    "slow": """
        for _ in range(300):  # short sleeps: under pytest-timeout's SIGALRM, Prefect's timeout cannot cut one long sleep
            time.sleep(0.1)
        Path("slow.txt").write_text("done")
        return {}
    """,
}
TOY_HEADER = """
import os, shutil, time
from pathlib import Path
from prefect import task
from tlops.core.config import load_params
from tlops.core.errors import DataError

def _count(name):
    counter = Path(".attempts") / name
    counter.parent.mkdir(exist_ok=True)
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    return n

@task(name="{stage}")
def stage_task(params_path=None):
"""
TOY_DEPS = {"ingest": ["src"], "double": ["raw"], "flaky": ["double.txt"], "bad": ["raw"], "slow": ["raw"],
            "env": ["raw"]}
TOY_PARAMS = {"double": ["head.epochs"]}


def write_toy_pipeline(ws: Path, stages: list[str]) -> str:
    """dvc.yaml of toy stages (each `python -m <pkg>.<stage>`) and their package; returns the package name."""
    pkg = f"toy_{uuid.uuid4().hex[:8]}"  # unique: each test imports its own stage modules
    (ws / pkg).mkdir()
    (ws / pkg / "__init__.py").write_text("")
    dvc_yaml: dict = {"stages": {}}
    for name in stages:
        code = (TOY_HEADER.replace("{stage}", name) + textwrap.indent(textwrap.dedent(TOY_BODIES[name]), "    ")
                + '\nif __name__ == "__main__":  # as `dvc repro` runs it\n    stage_task.fn()\n')
        (ws / pkg / f"{name}.py").write_text(code)
        dvc_yaml["stages"][name] = {
            "cmd": f"python -m {pkg}.{name}", "deps": [*TOY_DEPS[name], f"{pkg}/{name}.py"],
            **({"params": TOY_PARAMS[name]} if name in TOY_PARAMS else {}),
            "outs": ["raw" if name == "ingest" else f"{name}.txt"]}
    (ws / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    return pkg


def commit(ws: Path) -> None:
    run_cmd(["git", "add", "-A"], ws)
    run_cmd(["git", "commit", "-qm", "test", "--allow-empty"], ws)


def states(summary: dict) -> dict[str, str]:
    return {s["stage"]: s["state"] for s in summary["stages"]}


def dvc_status(ws: Path) -> str:
    return run_cmd([sys.executable, "-m", "dvc", "status"], ws).stdout


def lock_entries(ws: Path) -> set[str]:
    lock = ws / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.exists() else set()


def task_run_states(flow_run_id: str, expected: int, timeout_s: float = 20) -> dict[str, str]:
    """{task run name: state name} of a flow run, as the Prefect API records them (task runs arrive as events)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                         sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100)
        found = {r.name: r.state.name for r in runs if r.state and r.state.is_final()}
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def running_mlflow_runs() -> list:
    c = runs.client()
    return c.search_runs([runs.experiment_id(c)], filter_string="attributes.status = 'RUNNING'")


@contextmanager
def toy_workspace(ws: Path, monkeypatch: pytest.MonkeyPatch, stages: list[str]) -> Iterator[Path]:
    """`ws` (the conftest workspace) with a toy dvc.yaml, its own MLflow experiment and retries without delay."""
    monkeypatch.setenv(runs.EXPERIMENT_ENV, f"test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv(runs.PARENT_ENV, raising=False)
    write_params(ws, {"schedule": {"retries": 2, "retry_delay_s": 0}})
    (ws / "src").mkdir()
    for i in range(3):
        (ws / "src" / f"{i}.txt").write_text(f"line {i}\n")
    write_toy_pipeline(ws, stages)
    commit(ws)
    before = set(sys.modules)
    try:
        yield ws
    finally:
        for name in set(sys.modules) - before:  # each test imports its own toy stage modules
            if name.startswith("toy_"):
                del sys.modules[name]


def artifacts_of(flow_run_id: str) -> dict[str, str]:
    """{key: data} of a flow run's Prefect artifacts."""
    from prefect import get_client

    # A raw filter: the client's read_artifacts with an empty task-run filter would drop flow-level artifacts.
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/artifacts/filter",
                                  json={"flow_runs": {"id": {"any_": [str(flow_run_id)]}}, "limit": 50})
    response.raise_for_status()
    return {a["key"]: a["data"] for a in response.json()}
