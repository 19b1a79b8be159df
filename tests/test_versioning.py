"""Data versioning with real DVC: ingest -> prepare, no-op repro, the data version, push/clone/pull.

One `dvc repro prepare` on the issue's acceptance folder (good images, every bad-file kind, hidden files) is shared
by the module; each test works on its own copy of that workspace.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_messy_images, make_workspace, run_cmd, write_params

from tlops.data.manifest import load_manifest
from tlops.data.version import data_version

# End to end: real DVC runs real stage processes, which talk to the session's Prefect server.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def dvc(*args: str, cwd: Path, env: dict | None = None) -> str:
    return run_cmd([sys.executable, "-m", "dvc", *args], cwd, env=env).stdout


def git(*args: str, cwd: Path) -> str:
    return run_cmd(["git", *args], cwd).stdout


def locked_raw_md5(root: Path) -> str:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    (out,) = [o for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/raw"]
    return out["md5"]


def use_folder(workspace: Path, folder: Path) -> None:
    """Point data.source at an image folder (faster than digits) and commit that."""
    write_params(workspace, {"data": {"source": "imagefolder", "path": str(folder)}})
    git("commit", "-qam", "imagefolder source", cwd=workspace)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory, mlflow_store: str) -> tuple[Path, dict]:
    """A workspace on the acceptance folder (make_messy_images) after one `dvc repro prepare`, built once.

    Returns the workspace and what make_messy_images says to expect of each file.
    """
    root = tmp_path_factory.mktemp("versioning")
    expected = make_messy_images(root / "src")
    ws = make_workspace(root / "ws")
    use_folder(ws, root / "src")
    out = dvc("repro", "prepare", cwd=ws, env={"MLFLOW_TRACKING_URI": mlflow_store})
    assert out.index("Running stage 'ingest'") < out.index("Running stage 'prepare'")
    return ws, expected


@pytest.fixture
def repro_ws(reproduced: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the reproduced workspace (git, DVC cache and all) as the cwd: each test may change it."""
    ws = tmp_path / "ws"
    shutil.copytree(reproduced[0], ws, symlinks=True)
    monkeypatch.chdir(ws)
    return ws


def test_repro_twice_runs_nothing_the_second_time_and_the_version_is_dvc_locks(repro_ws: Path):
    out = dvc("repro", "prepare", cwd=repro_ws)
    assert "Running stage" not in out and "Data and pipelines are up to date." in out
    assert data_version() == locked_raw_md5(repro_ws)
    assert data_version(repro_ws) == data_version()  # repeat calls agree (served from DVC's state)
    assert "Data and pipelines are up to date." in dvc("status", "prepare", cwd=repro_ws)


def test_a_one_byte_change_to_one_image_changes_the_version_and_marks_prepare_changed(repro_ws: Path):
    before = data_version()
    image = sorted((repro_ws / "data/raw/class_1").iterdir())[3]
    raw = bytearray(image.read_bytes())
    raw[-5] ^= 0x01
    image.write_bytes(bytes(raw))
    assert data_version() != before
    status = dvc("status", "prepare", cwd=repro_ws)
    prepare_part = status.split("prepare:")[1]
    assert "changed deps" in prepare_part and "data/raw" in prepare_part


def test_a_fresh_clone_pulls_the_same_data_version_without_rerunning_ingest(repro_ws: Path, tmp_path: Path):
    version = data_version()
    dvc("remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=repro_ws)
    dvc("push", cwd=repro_ws)
    git("add", "-A", cwd=repro_ws)
    git("commit", "-qm", "data version", cwd=repro_ws)
    clone = tmp_path / "clone"
    git("clone", "-q", str(repro_ws), str(clone), cwd=tmp_path)
    assert not (clone / "data/raw").exists()
    dvc("pull", "--with-deps", "prepare", cwd=clone)
    assert data_version(clone) == version == locked_raw_md5(clone)
    assert "Data and pipelines are up to date." in dvc("status", "prepare", cwd=clone)
    assert (clone / "data/prepared/manifest.csv").read_bytes() == (repro_ws / "data/prepared/manifest.csv").read_bytes()


def test_acceptance_prepare_quarantines_the_bad_files_and_keeps_cmyk_and_16bit(
        repro_ws: Path, reproduced: tuple[Path, dict]):
    expected = reproduced[1]
    manifest = [r.path for r in load_manifest().rows]
    assert manifest == [f"data/raw/{rel}" for rel in expected["good"]]
    assert {"data/raw/class_0/cmyk.jpg", "data/raw/class_0/gray16.png"} <= set(manifest)
    report = json.loads((repro_ws / "reports/data.json").read_text())
    reasons = {q["path"]: q["reason"] for q in report["quarantined"]}
    assert reasons == {f"data/raw/{rel}": reason for rel, reason in expected["bad"].items()}
    assert len(set(reasons.values())) == 5
    text = (repro_ws / "data/prepared/manifest.csv").read_text() + json.dumps(report)
    assert ".DS_Store" not in text and ".ipynb_checkpoints" not in text
    assert "totals.quarantined" in dvc("metrics", "show", cwd=repro_ws)
