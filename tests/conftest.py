"""Shared fixtures: tiny generated data, a real DVC workspace, a real MLflow store, a real Prefect API.

Module-specific fixtures live in the test module that needs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

# Prefect reads PREFECT_HOME when first imported: keep its database and settings out of ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tlops-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parents[1]
CODE = ["tlops", "flows", "tasks", "serving", "dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore"]

# Shrinks the real params.yaml so every stage runs in seconds on a random-init tiny backbone.
TINY = {
    "data": {"min_per_class": 2, "val_fraction": 0.25, "test_fraction": 0.25},
    "model": {"backbone": "tiny_test", "weights": "random", "image_size": 32},
    "features": {"batch_size": 16},
    "head": {"epochs": 5, "lrs": [0.01], "weight_decays": [0.0], "patience": 3},
    "finetune": {"epochs": 2, "batch_size": 8, "device": "cpu", "warmup_epochs": 0.5},
    "export": {"int8": False, "calibration_images": 8},
    "evaluate": {"worst_k": 4},
}


def deep_update(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_update(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_params(root: Path, overrides: dict | None = None, tiny: bool = True) -> dict:
    """Write root/params.yaml = the project's params.yaml, shrunk (TINY) and overridden."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if tiny:
        params = deep_update(params, TINY)
    params = deep_update(params, overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def make_images(folder: Path, classes: int = 3, per_class: int = 8, size: int = 24, seed: int = 0) -> list[Path]:
    """Distinct, learnable PNGs: each class is a different colour and shape, plus noise."""
    rng = np.random.default_rng(seed)
    written = []
    for c in range(classes):
        d = folder / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            a[..., c % 3] += 150
            lo = (c * 5) % (size // 2)
            a[lo : lo + size // 3, :, :] = 255 - 40 * c
            p = d / f"img_{i:03d}.png"
            Image.fromarray(a).save(p)
            written.append(p)
    return written


def run_cmd(args: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with the test's interpreter first on PATH (so dvc's `python` is ours)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh git + DVC repo holding a copy of the project code and tiny params; cwd is set to it."""
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in CODE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, ws / name)
    write_params(ws)
    run_cmd(["git", "init", "-q", "-b", "main"], ws)
    run_cmd(["git", "config", "user.email", "test@tlops"], ws)
    run_cmd(["git", "config", "user.name", "tlops test"], ws)
    run_cmd([sys.executable, "-m", "dvc", "init", "-q"], ws)
    run_cmd([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], ws)
    run_cmd(["git", "add", "-A"], ws)
    run_cmd(["git", "commit", "-qm", "workspace"], ws)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return ws


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One migrated MLflow sqlite store for the whole session (migrating takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    import mlflow

    mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # creates and migrates the schema once
    return uri


@pytest.fixture(autouse=True)
def _mlflow_env(mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test tracks into the session's temp store, never into the project's mlflow.db."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)


@pytest.fixture(scope="session")
def prefect_api():
    """One real temporary Prefect server for the session (it takes ~8 s to start)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        yield PREFECT_API_URL.value()
    os.environ.pop("PREFECT_API_URL", None)
