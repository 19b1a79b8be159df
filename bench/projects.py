"""What the benches that measure whole runs share: a fresh clone of the project with some params changed, and a
command run in it the way a user runs it (this venv's tools first on PATH, a temporary Prefect server rather than a
shared one, no telemetry), exiting with the command's last output when it fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def clone(project: Path, overrides: dict[str, dict] | None = None, reuse: bool = False) -> Path:
    """A clone of this checkout at `project` (replaced, or kept when `reuse`), with `overrides` in its params.yaml."""
    if project.exists() and not reuse:
        shutil.rmtree(project)
    if not project.exists():
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(project)], check=True)
    if overrides:
        set_params(project, overrides)
    return project


def set_params(project: Path, overrides: dict[str, dict]) -> None:
    """Update sections of the project's params.yaml ({section: {key: value}})."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def env() -> dict[str, str]:
    e = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    e.pop("PREFECT_API_URL", None)
    return e


def run(project: Path, *cmd: str) -> float:
    """Run `cmd` (a tool of this venv, e.g. "tlops", "run") in the project; its wall time in seconds."""
    t = time.perf_counter()
    proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=project, env=env(), capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{project.name}: {' '.join(cmd)} failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds
