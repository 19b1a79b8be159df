"""`tlops sweep`: a grid of params, one deployment run per combination on the work pool, compared when all finish.

    tlops sweep --grid model.backbone=efficientnet_lite0,resnet50 --grid finetune.lr=1e-3,3e-3 --concurrency 2

Each combination is a flow run of the `sweep-trial` deployment (on the pool of schedule.work_pool; its Prefect
concurrency limit is --concurrency), so any worker of the pool may take it: on one machine, two process workers;
across machines, one per GPU box. A trial never shares a workspace: it clones the project (git clone of the folder
the sweep started in, so its committed params and code) into .tlops/sweeps/<sweep>/<trial>, points the clone's DVC
cache at the project's (a stage whose inputs another trial already ran is restored from DVC's run cache, not rerun:
trials with the same backbone extract features once), and runs `tlops run -S key=value ...` there. Each trial
records into its clone's MLflow store (or the shared server, MLFLOW_TRACKING_URI); the sweep itself opens one parent
run in the project's store and logs each trial as a child run with its params and test scores, then prints the table.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow

from tlops.core import paths
from tlops.core.errors import ConfigError, TlopsError

DEPLOYMENT = "sweep"
SWEEPS_DIR = paths.STATE_DIR / "sweeps"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
PRUNED = re.compile(r"tune trial \d+ pruned after fine-tuning epoch")  # tlops.tuning.pruning's TrialPruned


def combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the grid's order."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def trial_name(index: int, changes: dict[str, Any]) -> str:
    """A folder-safe name: the trial's number and its values."""
    text = "-".join(str(v) for v in changes.values())
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60]


@flow(name="sweep-trial", log_prints=True)
def trial_flow(origin: str, folder: str, set_params: dict[str, Any], registered_model: str | None = None,
               env: dict[str, str] | None = None, until: str | None = None) -> Any:
    """One combination: a clone of `origin` at `folder` sharing its DVC cache, `tlops run -S ...` in it (with `env`
    added to its environment: a `tlops tune` trial's study; `until`: its last stage). A tune trial its pruner
    stopped ends in a COMPLETED state named Pruned. Run again on the same folder, the stages already up to date
    there are skipped."""
    clone = Path(folder)
    if not (clone / ".git").exists():
        clone.parent.mkdir(parents=True, exist_ok=True)
        _run(["git", "clone", "-q", origin, str(clone)], Path(origin))
        _run([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(Path(origin) / ".dvc" / "cache")], clone)
    changes = {**({"export.registered_model": registered_model} if registered_model else {}), **set_params}
    args = [arg for k, v in changes.items() for arg in ("-S", f"{k}={v if isinstance(v, str) else json.dumps(v)}")]
    args += ["--until", until] if until else []
    run_env = {k: v for k, v in os.environ.items() if k not in ("PREFECT__FLOW_RUN_ID", "TLOPS_PARENT_RUN_ID")}
    if run_env.get("MLFLOW_TRACKING_URI", "").startswith("sqlite"):  # one sqlite file, one writer: the clone's own
        run_env.pop("MLFLOW_TRACKING_URI")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tlops.cli", "run", *args], cwd=clone, env={**run_env, **(env or {})},
                          text=True, capture_output=True)
    print(proc.stdout[-2000:])
    if proc.returncode != 0:
        reason = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()[-1]
        if PRUNED.search(reason):
            from prefect.states import Completed

            return Completed(name="Pruned", message=reason.removeprefix("error: "))
        raise TlopsError(f"trial {clone.name} failed: {reason}")
    return {"folder": str(clone), "seconds": round(time.perf_counter() - started, 1)}


def _run(argv: list[str], cwd: Path) -> None:
    proc = subprocess.run(argv, cwd=cwd, text=True, capture_output=True)
    if proc.returncode != 0:
        raise TlopsError(f"{' '.join(argv[:3])} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")


def deploy_trials(root: Path, pool: str, concurrency: int) -> str:
    """The sweep-trial deployment on `pool` (a process pool, created if missing), at most `concurrency` at once."""
    from flows.deploy import RUN_ENV, ensure_process_pool

    ensure_process_pool(pool)
    deployment = trial_flow.from_source(source=str(root), entrypoint="flows/sweep.py:trial_flow").to_deployment(
        name=DEPLOYMENT, work_pool_name=pool, concurrency_limit=concurrency, tags=["tlops", "sweep"],
        job_variables={"env": RUN_ENV, "working_dir": str(root)},
        description="one combination of a tlops sweep, in its own clone")
    deployment.apply()
    return f"{trial_flow.name}/{DEPLOYMENT}"


def sweep(grid: dict[str, list[Any]], pool: str, concurrency: int = 2, timeout_s: float = 6 * 3600,
          root: Path | None = None, poll_s: float = 2.0, registered_model: str | None = None) -> dict[str, Any]:
    """Start every combination on the pool, wait for all, log them under one MLflow parent run; the results, best
    first by the trials' own selection metric."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    from flows.deploy import _require_server
    from tlops.core.config import load_params
    from tlops.tracking import runs

    root = (root or Path.cwd()).resolve()
    if not grid:
        raise ConfigError("tlops sweep needs at least one --grid key=value1,value2")
    load_params()
    for changes in combinations(grid):  # every combination must be valid params before anything starts
        _validate(changes)
    _require_server("tlops sweep")
    name = deploy_trials(root, pool, concurrency)
    sweep_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    trials = []
    for i, changes in enumerate(combinations(grid)):
        folder = root / SWEEPS_DIR / sweep_id / trial_name(i, changes)
        parameters = {"origin": str(root), "folder": str(folder), "set_params": changes,
                      "registered_model": registered_model}
        run = run_deployment(name, parameters=parameters, timeout=0, tags=["sweep", sweep_id])
        trials.append({"trial": folder.name, "params": changes, "folder": folder, "flow_run_id": str(run.id)})
    print(f"sweep {sweep_id}: {len(trials)} runs of {name} on pool {pool!r} (at most {concurrency} at once)",
          file=sys.stderr)  # progress; stdout is the result's (tlops sweep --json)
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            states = {t["flow_run_id"]: client.read_flow_run(t["flow_run_id"]).state for t in trials}
            if all(s is not None and s.type.value in FINAL for s in states.values()):
                break
            if time.monotonic() > deadline:
                raise TlopsError(f"sweep {sweep_id}: not finished within {timeout_s:g} s; its runs keep going")
            time.sleep(poll_s)
    for t in trials:
        t["state"] = states[t["flow_run_id"]].type.value
        t.update(_scores(t["folder"]) if t["state"] == "COMPLETED" else {"error": states[t["flow_run_id"]].message})
    rows = sorted(trials, key=lambda t: (t.get("score") is None, -(t.get("score") or 0.0)))
    parent = _log_to_mlflow(runs, sweep_id, grid, rows)
    return {"sweep": sweep_id, "deployment": name, "mlflow_parent_run_id": parent,
            "trials": [{k: (str(v) if k == "folder" else v) for k, v in t.items()} for t in rows]}


def _validate(changes: dict[str, Any]) -> None:
    """The params a trial would run with, validated here (a typo fails the sweep before any run starts)."""
    from tlops.core.config import set_params

    try:
        set_params(changes, dry_run=True)
    except ConfigError as e:
        raise ConfigError(f"--grid {changes}: {e}") from None


def _scores(folder: Path) -> dict[str, Any]:
    metrics_path = folder / paths.METRICS
    return _scores_of(json.loads(metrics_path.read_text())) if metrics_path.exists() else {}


def _scores_of(m: dict[str, Any]) -> dict[str, Any]:
    """A run's test scores from its reports/metrics.json."""
    metric = m.get("metric", "accuracy")
    exported = m.get("exported", {})
    return {"metric": metric, "score": exported.get(metric), "head": m.get("head", {}).get(metric),
            "finetuned": m.get("finetuned", {}).get(metric), "selected": m.get("selected")}


def _log_to_mlflow(runs: Any, sweep_id: str, grid: dict[str, list[Any]], rows: list[dict]) -> str:
    """One parent run for the sweep in the project's store, one child run per trial with its params and scores."""
    c = runs.client()
    exp = runs.experiment_id(c)
    parent = c.create_run(exp, run_name=f"sweep-{sweep_id}", tags={"tlops.kind": "sweep"}).info.run_id
    c.log_param(parent, "grid", json.dumps(grid))
    for t in rows:
        child = c.create_run(exp, run_name=t["trial"], tags={"mlflow.parentRunId": parent, "tlops.kind": "trial",
                                                              "state": t["state"], "flow_run_id": t["flow_run_id"],
                                                              "folder": str(t["folder"])}).info.run_id
        for k, v in t["params"].items():
            c.log_param(child, k, v)
        for k in ("score", "head", "finetuned"):
            if isinstance(t.get(k), (int, float)):
                c.log_metric(child, f"test_{k}", float(t[k]))
        c.set_terminated(child, "FINISHED" if t["state"] == "COMPLETED" else "FAILED")
    c.set_terminated(parent, "FINISHED" if all(t["state"] == "COMPLETED" for t in rows) else "FAILED")
    return parent


def table(result: dict[str, Any]) -> Any:
    """The comparison as a rich Table, best first."""
    from rich.table import Table

    rows = result["trials"]
    keys = list(rows[0]["params"]) if rows else []
    metric = next((t["metric"] for t in rows if t.get("metric")), "accuracy")
    tab = Table(title=f"sweep {result['sweep']} (test {metric}; MLflow parent run {result['mlflow_parent_run_id']})")
    for col in ("rank", *keys, f"exported {metric}", "head only", "fine-tuned", "selected", "state"):
        tab.add_column(col, justify="right" if col not in keys and col not in ("selected", "state") else "left")
    fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    for i, t in enumerate(rows, 1):
        tab.add_row(str(i), *(str(t["params"][k]) for k in keys), fmt(t.get("score")), fmt(t.get("head")),
                    fmt(t.get("finetuned")), t.get("selected") or "-", t["state"])
    return tab
