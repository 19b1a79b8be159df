"""Benchmark of `tlops run`, each a fresh process, in a temporary copy of the project with its real params.yaml.

Prints the wall time of a full run and its orchestration overhead = wall time - the stages' own compute, as a
fraction of the wall time (target <= 10%), for a fresh clone and again with Prefect's and MLflow's stores in place
(`--force`, checkpoints removed), and the wall time of a run in which every stage is cached (target <= 15 s).
A stage's own compute is the length of its MLflow stage run, which opens and closes inside the stage
task; everything else (interpreter start, imports, the Prefect API, DVC's status checks, hashing and caching of
outputs, the MLflow parent run, artifacts) is overhead. Without PREFECT_API_URL each `tlops run` starts a
temporary Prefect server; `--server` also times a cached and a full run against a running `prefect server`.

    python bench/pipeline.py [--workdir DIR] [--server]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_project(dest: Path) -> Path:
    """A fresh clone of the project's committed state, as a user's first checkout would be."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True)  # .dvc/config: analytics off
    return dest


def timed_run(project: Path, env: dict[str, str], label: str, *args: str) -> float:
    """Wall seconds of `tlops run` in a new process; exits with its output if it fails."""
    return timed_command(project, env, label, ["tlops", "run", *args])


def timed_command(project: Path, env: dict[str, str], label: str, argv: list[str]) -> float:
    """Wall seconds of a project command (from the venv) in a new process; exits with its output if it fails."""
    log = project.parent / f"{label.replace(' ', '-').replace(',', '')}.log"
    # Output to a file, not a pipe: the wall time ends when the command exits, whatever its children hold open.
    with open(log, "w") as out:
        started = time.perf_counter()
        code = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=project, env=env, stdout=out,
                              stderr=out).returncode
        wall = time.perf_counter() - started
    if code != 0:
        sys.exit(f"{label}: {' '.join(argv)} exited {code}\n{log.read_text()[-6000:]}")
    return wall


def from_scratch(project: Path, env: dict[str, str], label: str, argv: list[str]) -> float:
    """timed_command of a forced full run: without its checkpoints, finetune would resume its finished run."""
    shutil.rmtree(project / "checkpoints", ignore_errors=True)
    return timed_command(project, env, label, argv)


def report_full_run(label: str, wall: float, tracking_uri: str) -> None:
    """Per stage: seconds in the pipeline and its own compute; then the overhead of the whole run."""
    in_pipeline, compute = last_run_stages(tracking_uri)
    print(f"{label}\n  {'stage':<12}{'in pipeline s':>15}{'own compute s':>15}")
    for stage in in_pipeline or compute:  # `dvc repro` logs no per-stage pipeline seconds
        seconds = f"{in_pipeline[stage]:.1f}" if stage in in_pipeline else "-"
        print(f"  {stage:<12}{seconds:>15}{compute.get(stage, 0.0):>15.1f}")
    own = sum(compute.values())
    overhead = wall - own
    print(f"  wall {wall:.1f} s, stages' own compute {own:.1f} s, orchestration overhead {overhead:.1f} s "
          f"= {overhead / wall:.1%} of the wall time (target <= 10%)")


def last_run_stages(tracking_uri: str) -> tuple[dict[str, float], dict[str, float]]:
    """Of the latest pipeline run: ({stage: seconds in the pipeline}, {stage: seconds of its MLflow stage run})."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri)
    exp = c.get_experiment_by_name("tlops").experiment_id
    parent = c.search_runs([exp], filter_string="tags.`tlops.kind` = 'pipeline'",
                           order_by=["attributes.start_time DESC"], max_results=1)[0]
    in_pipeline = {k.removeprefix("seconds_"): v for k, v in parent.data.metrics.items()
                   if k.startswith("seconds_") and k != "seconds_total"}
    children = sorted(c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"),
                      key=lambda r: r.info.start_time)
    compute = {r.info.run_name: (r.info.end_time - r.info.start_time) / 1000 for r in children}
    return in_pipeline, compute


def start_prefect_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A `prefect server start` of our own on a free port, and its API URL once it answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    sys.exit(f"prefect server did not start (exit code {server.poll()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="where to make the project copy (default: a temp dir, removed)")
    ap.add_argument("--server", action="store_true",
                    help="also time a cached and a full run against a running Prefect server")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="tlops-bench-", dir=args.workdir))
    try:
        project = make_project(base / "project")
        tracking_uri = f"sqlite:///{project / 'mlflow.db'}"
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "PREFECT_HOME": str(base / "prefect-home"), "MLFLOW_TRACKING_URI": tracking_uri}
        env.pop("PREFECT_API_URL", None)
        env.pop("TLOPS_PARENT_RUN_ID", None)

        full = timed_run(project, env, "full run")
        report_full_run("full run on a fresh clone (creates the Prefect and MLflow stores):", full, tracking_uri)
        cached = timed_run(project, env, "cached run")
        print(f"cached run (every stage skipped), temporary Prefect server: wall {cached:.1f} s (target <= 15 s)")
        forced = from_scratch(project, env, "forced run", ["tlops", "run", "--force"])
        report_full_run("full run with the stores in place (`tlops run --force`), temporary Prefect server:", forced,
                        tracking_uri)
        wall = from_scratch(project, env, "dvc repro", ["dvc", "repro", "--force"])
        report_full_run("the same stages by plain `dvc repro --force` (one process per stage), for comparison:", wall,
                        tracking_uri)
        if args.server:
            server, url = start_prefect_server(env)
            try:
                served = {**env, "PREFECT_API_URL": url}
                with_server = timed_run(project, served, "cached run server")
                print(f"cached run against a running Prefect server: wall {with_server:.1f} s")
                forced = from_scratch(project, served, "forced run server", ["tlops", "run", "--force"])
                report_full_run("full run (`--force`) against a running Prefect server:", forced, tracking_uri)
            finally:
                server.terminate()
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
