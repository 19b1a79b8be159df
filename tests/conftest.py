"""Shared fixtures: tiny generated data, a real DVC workspace, a real MLflow store, a real Prefect API.

Module-specific fixtures live in the test module that needs them.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from text_support import make_encoder, make_texts


def _session_dir(variable: str, prefix: str) -> None:
    """`variable` set to a temp dir of this process's own (unless already set), removed when the process exits."""
    if variable not in os.environ:
        os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, os.environ[variable], True)


# Prefect reads PREFECT_HOME when first imported: keep its database and settings out of ~/.prefect.
_session_dir("PREFECT_HOME", "tlops-prefect-")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline, telemetry only logs errors
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The hub is offline here; huggingface_hub reads these once, at import: an empty cache of the session's own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_session_dir("HF_HUB_CACHE", "tlops-hf-")

ROOT = Path(__file__).resolve().parents[1]
CODE = ["tlops", "flows", "tasks", "orchestration", "serving", "dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore"]

# Shrinks the real params.yaml so every stage runs in seconds on a random-init tiny backbone.
TINY = {
    "data": {"min_per_class": 2, "val_fraction": 0.25, "test_fraction": 0.25},
    "model": {"backbone": "tiny_test", "weights": "random", "image_size": 32},
    "features": {"batch_size": 16, "augment_views": 0},
    "head": {"epochs": 5, "lrs": [0.01], "weight_decays": [0.0], "patience": 3},
    "finetune": {"epochs": 2, "batch_size": 8, "device": "cpu", "warmup_steps": 2},
    "export": {"int8": False, "calibration_images": 8},
    "evaluate": {"worst_k": 4},
}


# The files whose tests wait longest on servers, installs and subprocesses: started first, so that with one file per
# worker (make test: pytest-xdist --dist loadfile) no long file is left alone at the end. Order only, never a skip.
LONG_FIRST = ("test_pools.py", "test_shared_stores.py", "test_team_auth.py", "test_sweep.py", "test_serve_install.py",
              "test_crash_recovery.py", "test_pipeline.py", "test_deploy.py", "test_adapt.py", "test_distributed.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: test order within a file kept


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


def make_domain_images(folder: Path, domain: str, per_class: int = 16, size: int = 32, seed: int = 0,
                       flat: bool = False) -> list[Path]:
    """Three patterns (horizontal stripes, vertical stripes, a checkerboard) at a random phase: light on a dark
    background ("source"), or faint on a bright, tinted, noisier one ("target"): one task in two domains."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    written = []
    for c in range(3):
        d = folder if flat else folder / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            period = rng.integers(5, 9)
            phase = rng.integers(0, period, 2)
            h, v = ((yy + phase[0]) % period) < period // 2, ((xx + phase[1]) % period) < period // 2
            mask = (h, v, h ^ v)[c][..., None]
            if domain == "source":
                a = np.where(mask, 200.0, 30.0) + rng.normal(0, 8, (size, size, 3))
            else:
                tint = rng.uniform([120, 60, 10], [200, 140, 60])
                a = tint + np.where(mask, 45.0, 0.0) + rng.normal(0, 20, (size, size, 3))
            p = d / f"{domain}_{c}_{i:03d}.png"
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(p)
            written.append(p)
    return written


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (CRC fixed), without allocating the pixels."""
    buf = io.BytesIO()
    Image.new("L", (4, 4), 7).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature(8) + length(4) + type(4)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def make_messy_images(folder: Path, per_class: int = 6) -> dict:
    """make_images' 3 classes plus every awkward file prepare must handle; returns what to expect of each.

    {"good": [paths that must reach the manifest], "bad": {path: quarantine reason}, "hidden": [paths]},
    paths relative to `folder`.
    """
    good = [p.relative_to(folder).as_posix() for p in make_images(folder, classes=3, per_class=per_class)]

    def save(rel: str, img: Image.Image, **kw) -> None:
        img.save(folder / rel, **kw)
        good.append(rel)

    save("class_0/cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100)  # pure red
    save("class_0/gray16.png", Image.fromarray(np.full((6, 6), 32768, np.uint16)))  # mid grey in 16 bits
    save("class_1/rgba.png", Image.new("RGBA", (6, 6), (255, 0, 0, 0)))  # fully transparent -> white
    pal = Image.new("P", (6, 6))
    pal.putpalette([0, 0, 255] * 256)
    save("class_1/palette.png", pal)  # every palette entry is blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save("class_2/exif_rotated.jpg", Image.new("RGB", (20, 10), (10, 200, 30)), exif=exif.tobytes())

    rng = np.random.default_rng(1)
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(jpg, format="JPEG", quality=90)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png, format="PNG")
    corrupt = bytearray(jpg.getvalue())
    dht = corrupt.find(b"\xff\xc4")
    corrupt[dht + 5 : dht + 25] = b"\xff" * 20  # a garbled Huffman table: the header parses, decoding fails
    bad = {
        "class_0/corrupt.jpg": (bytes(corrupt), "corrupt"),
        "class_1/truncated.png": (png.getvalue()[: len(png.getvalue()) // 2], "truncated"),
        "class_2/notes.jpg": (b"this is a text file, not a JPEG\n", "not_an_image"),
        "class_0/empty.png": (b"", "empty_file"),
        "class_1/bomb.png": (_png_declaring(20000, 20000), "too_many_pixels"),
    }
    for rel, (data, _) in bad.items():
        (folder / rel).write_bytes(data)

    hidden = [".DS_Store", "class_0/.DS_Store", "class_1/.ipynb_checkpoints/img_000-checkpoint.png"]
    (folder / "class_1/.ipynb_checkpoints").mkdir()
    for rel in hidden:
        (folder / rel).write_bytes(b"\x00\x00\x00\x01Bud1" if rel.endswith("DS_Store") else png.getvalue())
    return {"good": sorted(good), "bad": {rel: reason for rel, (_, reason) in bad.items()}, "hidden": hidden}


def run_cmd(args: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with the test's interpreter first on PATH (so dvc's `python` is ours)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    proc = subprocess.run(args, check=False, cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_workspace(ws: Path) -> Path:
    """A fresh git + DVC repo at `ws` holding a copy of the project code and tiny params."""
    ws.mkdir(parents=True)
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
    return ws


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh git + DVC repo holding a copy of the project code and tiny params; cwd is set to it."""
    ws = make_workspace(tmp_path / "ws")
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


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory: pytest.TempPathFactory, mlflow_store: str) -> Path:
    """A workspace after ingest -> prepare -> features -> train_head -> finetune (-> ingest_target -> adapt, no target:
    the fine-tuned model passes through) on generated images (tiny backbone).

    Built once per session by the real stage tasks, in-process; tests use a copy (`trained`).
    """
    root = tmp_path_factory.mktemp("trained")
    make_images(root / "images", classes=3, per_class=10, size=40)
    ws = make_workspace(root / "ws")
    write_params(ws, {"data": {"source": "imagefolder", "path": str(root / "images")}})
    run_stage_tasks(ws, (*TRAINING_STAGES, "ingest_target", "adapt"), mlflow_store, "trained-workspace")
    return ws


TRAINING_STAGES = ("ingest", "prepare", "features", "audit", "train_head", "finetune")


def run_stage_tasks(ws: Path, stages: tuple[str, ...], mlflow_store: str, experiment: str) -> None:
    """Run the named stages' Prefect tasks (their plain functions, `.fn`) in order, in-process, in `ws`."""
    import importlib

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_store)
        mp.setenv("TLOPS_EXPERIMENT", experiment)
        for stage in stages:
            getattr(importlib.import_module(f"tasks.{stage}"), stage).fn()


def use_copy(src: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of a session- or module-built workspace as cwd, with the test's interpreter on PATH."""
    shutil.copytree(src, dest, symlinks=True)
    monkeypatch.chdir(dest)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return dest


@pytest.fixture
def trained(trained_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of trained_workspace as cwd."""
    return use_copy(trained_workspace, tmp_path / "trained", monkeypatch)


# ---------------------------------------------------------------- text


ALL_STAGES = (*TRAINING_STAGES, "ingest_target", "adapt", "evaluate", "export")


def text_params(texts: Path, encoder: Path, **over) -> dict:
    base = {"data": {"source": "textfolder", "path": str(texts), "near_duplicates": None},
            "model": {"backbone": f"hf:{encoder}", "weights": None, "image_size": None, "max_tokens": 24},
            "head": {"epochs": 40, "lrs": [0.03], "patience": 40},
            "finetune": {"unfreeze_groups": 2, "lr": 0.003, "head_lr": 0.003, "epochs": 3},
            "export": {"int8": True, "int8_max_drop": 1.0}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v}
    return base


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder(tmp_path_factory.mktemp("encoder") / "tiny-bert")


@pytest.fixture(scope="session")
def text_workspace(tmp_path_factory: pytest.TempPathFactory, encoder_dir: Path, mlflow_store: str) -> Path:
    """A workspace after every stage on generated texts (tiny encoder), run by the real stage tasks in-process."""
    root = tmp_path_factory.mktemp("text")
    make_texts(root / "texts", per_class=12)
    ws = make_workspace(root / "ws")
    write_params(ws, text_params(root / "texts", encoder_dir))
    run_stage_tasks(ws, ALL_STAGES, mlflow_store, "text-workspace")
    return ws


# ---------------------------------------------------------------- shared stores: PostgreSQL, S3


S3_KEYS = {"AWS_ACCESS_KEY_ID": "tlops-test", "AWS_SECRET_ACCESS_KEY": "tlops-test", "AWS_DEFAULT_REGION": "us-east-1"}


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on loopback: its endpoint URL; S3_KEYS are accepted."""
    from moto.server import ThreadedMotoServer

    port = free_tcp_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else (Path(shutil.which("initdb")).parent if shutil.which("initdb") else None)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL (Debian's `postgresql` binaries: initdb + pg_ctl in a temp dir, loopback only, trust auth);
    its URI prefix postgresql://postgres@127.0.0.1:<port>. As root the server runs as the `postgres` user."""
    import pwd

    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="tlops-pg-", dir="/tmp"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        user = pwd.getpwnam("postgres")
        for p in (root, sock):
            os.chown(p, user.pw_uid, user.pw_gid)
        root.chmod(0o755)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_tcp_port()
    run_cmd([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"], root)
    run_cmd([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
             f"-h 127.0.0.1 -p {port} -k {sock}", "start"], root)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        run_cmd([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], root, check=False)
        shutil.rmtree(root, ignore_errors=True)


def create_database(uri: str, name: str) -> str:
    """A new database on the server at `uri`; its URI."""
    import psycopg

    with psycopg.connect(f"{uri}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{uri}/{name}"
