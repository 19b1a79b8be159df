"""The serving install: `pip install "tlops[serve]"` serves and predicts without the training stack.

A fast check reads the source: every third-party module the serving path can import belongs to the base
dependencies, the serve extra or what they require. The slow one builds a wheel, installs it with the serve extra
into a fresh venv, and runs `tlops serve` and `tlops predict` from there (no params.yaml: the defaults).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest
from architecture import closure, graph, module_files, third_party_imports
from conftest import ROOT
from packaging.requirements import Requirement
from serving_support import LABELS, export_tiny_model, free_port, png_bytes, wait_for_process

from tlops.core.config import ServeParams

PACKAGES = ("tlops", "flows", "tasks", "orchestration", "serving")  # what the wheel holds
# onnx is in the serve extra: the service parses a model with it to refuse external data before ONNX Runtime loads it
TRAINING_STACK = ("torch", "torchvision", "timm", "prefect", "dvc", "mlflow", "onnxscript")
# Imported lazily, inside functions of serving-path modules that the service and `tlops predict` never call (or
# call only with another extra installed): the project modules, then the third-party packages, and why.
LAZY_OUTSIDE_SERVE = {
    "tlops.tracking": "models:/ URIs need the registry extra; tlops.cli says so when it is missing",
    "tlops.tracking.registry": "the same: serving.served_model resolves models:/ URIs through it",
}
LAZY_OUTSIDE_SERVE_PACKAGES = {
    "ruamel": "tlops.core.config.set_params, which the pipeline flow calls to write params.yaml (ruamel.yaml comes with dvc)",
}
INSTALL_TIMEOUT_S = 600
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Network is unreachable", "ConnectTimeoutError", "ProxyError", "Max retries exceeded")


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def _serve_distributions() -> set[str]:
    """The base dependencies and the serve extra, with everything they require (as installed here)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [_name(r) for r in project["dependencies"] + project["optional-dependencies"]["serve"]]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for r in md.requires(name) or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_name(r))
    return seen


def test_the_serving_path_imports_only_what_the_serve_extra_installs():
    files = module_files(ROOT)
    # The command line counts with its module-level imports only: each command imports its own stack inside it.
    g = {m: [i for i in imps if not (i.lazy and (i.target in LAZY_OUTSIDE_SERVE or m == "tlops.cli"))]
         for m, imps in graph(ROOT).items()}
    reached = set()
    for start in ["tlops.cli", *(m for m in files if m.split(".")[0] == "serving")]:
        reached |= set(closure(g, start))
    owners = md.packages_distributions()
    allowed = _serve_distributions()
    bad = []
    for module in sorted(reached):
        for top, eager in third_party_imports(files[module]).items():
            if top in sys.stdlib_module_names or top in PACKAGES or (top in LAZY_OUTSIDE_SERVE_PACKAGES and not eager):
                continue
            dists = {_name(d) for d in owners.get(top, [top])}
            if not dists & allowed:
                bad.append(f"{module} imports {top} ({', '.join(sorted(dists))})")
    assert bad == [], ("not installed by pip install '.[serve]' (declare it in pyproject.toml's serve extra, or, "
                       "when the service never runs that import, list it in LAZY_OUTSIDE_SERVE*): " + "; ".join(bad))


# ---------------------------------------------------------------- the real install


def _run(argv: list, timeout: float, check: bool = False, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=check, **kw)


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory) -> Path:
    """A fresh venv with `pip install "<repo>[serve]"` (a wheel, as a user gets it), built from a copy of the
    project's files: a build in the checkout would leave build/ there. pip's cache and settings are the user's."""
    tmp = tmp_path_factory.mktemp("serve_install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], timeout=120, check=True)
    try:
        r = _run([venv / "bin/python", "-m", "pip", "install", "--quiet", f"{src}[serve]"], timeout=INSTALL_TIMEOUT_S,
                 cwd=tmp, env=_clean_env())
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip install '.[serve]' took over {INSTALL_TIMEOUT_S} s")
    if r.returncode != 0:
        out = r.stdout + r.stderr
        if any(s in out for s in UNREACHABLE):
            pytest.skip(f"the package index is unreachable: {next(s for s in UNREACHABLE if s in out)}")
        pytest.fail(f"pip install '.[serve]' failed:\n{out[-4000:]}")
    return venv


def _clean_env() -> dict[str, str]:
    """This environment without what points Python at the test venv or the checkout."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "TLOPS_PARAMS")
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_the_serve_install_has_no_training_stack(serve_venv: Path, capsys):
    probe = ("import importlib, json, sys\nfound = []\nfor m in sys.argv[1:]:\n    try:\n"
             "        importlib.import_module(m)\n    except ModuleNotFoundError:\n        continue\n"
             "    found.append(m)\nprint(json.dumps(found))")
    r = _run([serve_venv / "bin/python", "-c", probe, *TRAINING_STACK], timeout=120, cwd=serve_venv,
             env=_clean_env(), check=True)
    assert json.loads(r.stdout) == [], f"the serve install can import {r.stdout.strip()}"
    size = _run(["du", "-sh", serve_venv], timeout=60, check=True).stdout.split()[0]
    listed = _run([serve_venv / "bin/python", "-m", "pip", "list", "--format=freeze"], timeout=60,
                  env=_clean_env(), check=True).stdout.split()
    with capsys.disabled():
        print(f"\nserve-only venv: {size} (du -sh), {len(listed)} distributions: {' '.join(sorted(listed))}")
    r = _run([serve_venv / "bin/tlops", "backbones"], timeout=60, cwd=serve_venv, env=_clean_env())
    assert r.returncode == 1 and 'pip install "tlops[train]"' in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_tlops_serve_and_predict_from_the_serve_install(serve_venv: Path, tmp_path: Path):
    model = export_tiny_model(tmp_path / "model.onnx")  # with this venv's torch; the serve venv has none
    image = np.full((40, 40, 3), 30, np.uint8)
    image[..., 1] += 170  # class_1: the tiny model's logit c is the mean of channel c
    png = tmp_path / "green.png"
    png.write_bytes(png_bytes(image))
    work = tmp_path / "work"  # no params.yaml here: serve and predict run on the defaults
    work.mkdir()
    port = free_port()
    argv = [serve_venv / "bin/tlops", "serve", "--model", model, "--port", port]
    if "grpc_port" in ServeParams.model_fields:  # its own free port, not the default 8081
        grpc_port = free_port()
        (tmp_path / "serve.yaml").write_text(f"serve:\n  grpc_port: {grpc_port}\n  reload_s: 0\n")
        argv += ["--params", tmp_path / "serve.yaml"]
    else:
        grpc_port = None
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(a) for a in argv], cwd=work, env=_clean_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_process(f"{url}/v2/health/ready", proc, log, 60, "tlops serve")
        r = httpx.post(f"{url}/predict", content=png.read_bytes(), headers={"content-type": "image/png"}, timeout=30)
        assert r.status_code == 200, r.text
        top = r.json()["predictions"][0]["top_k"][0]
        assert top["label"] == LABELS[1], r.json()
        if grpc_port is not None:
            socket.create_connection(("127.0.0.1", grpc_port), timeout=5).close()  # the gRPC server is up too

        r = _run([serve_venv / "bin/tlops", "predict", png, "--model", model, "--json"], timeout=120, cwd=work,
                 env=_clean_env())
        assert r.returncode == 0, r.stderr
        [result] = json.loads(r.stdout)
        assert result["top_k"][0]["label"] == LABELS[1], result
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert proc.returncode in (0, -signal.SIGTERM), f"tlops serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
    assert "Application shutdown complete" in log.read_text()


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_a_text_model_predicts_from_the_serve_install(serve_venv: Path, text_workspace: Path, tmp_path: Path):
    # tokenizers (the serve extra) reads the tokenizer out of the model file; torch and transformers are not there
    model = text_workspace / "models" / "model.onnx"
    (tmp_path / "q.txt").write_text("bread and cheese with honey", "utf-8")
    r = _run([serve_venv / "bin/tlops", "predict", "--text", "dog and cat", tmp_path / "q.txt", "--model", model,
              "--json"], timeout=120, cwd=tmp_path, env=_clean_env())
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [x["text"] for x in results] == ["dog and cat", str(tmp_path / "q.txt")]
    assert all(x["top_k"][0]["label"] in ("animal", "food", "tool") for x in results)
    probe = "import sys, tlops.inputs.text, serving.predict; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    r = _run([serve_venv / "bin/python", "-c", probe], timeout=60, cwd=tmp_path, env=_clean_env(), check=True)
    assert r.stdout.strip() == "[]"
