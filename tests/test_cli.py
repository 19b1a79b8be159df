"""The tlops command line: every command listed, config errors exit 2 with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

COMMANDS = ["run", "stage", "check", "data-version", "backbones", "deploy", "serve-schedule", "serve", "predict", "sweep",
            "tune", "ui", "drift-check"]


def tlops(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlops.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_help_lists_every_command_with_a_line():
    out = tlops("--help", cwd=Path(__file__).parents[1])
    assert out.returncode == 0
    for name in COMMANDS:
        assert f" {name} " in out.stdout, name


@pytest.mark.parametrize("command", ["run", "check", "deploy", "serve", "stage prepare"])
def test_misspelled_key_exits_2_with_one_line_naming_it(tmp_path: Path, command: str):
    (tmp_path / "params.yaml").write_text("finetune:\n  learning_rat: 0.1\n")
    out = tlops(*command.split(), cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "finetune.learning_rat is not a known key" in lines[0]


def test_out_of_range_value_names_the_key(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("data:\n  val_fraction: 1.5\n")
    out = tlops("check", cwd=tmp_path)
    assert out.returncode == 2
    assert "data.val_fraction" in out.stderr


# ---------------------------------------------------------------- a serving-only install (pip install ".[serve]")


def _without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make these top-level modules look uninstalled to tlops.cli's check (it asks importlib.util.find_spec)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.delenv("TLOPS_PARAMS", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


@pytest.mark.parametrize("command", ["run", "stage prepare", "deploy", "serve-schedule", "backbones", "data-version",
                                     "ui"])
def test_a_training_command_without_the_training_stack_names_the_extra(tmp_path: Path, monkeypatch, command: str):
    from typer.testing import CliRunner

    from tlops.cli import app

    monkeypatch.chdir(tmp_path)  # no params.yaml either: the missing stack is said first
    _without(monkeypatch, "torch", "dvc", "mlflow")
    out = CliRunner().invoke(app, command.split())
    assert out.exit_code == 1, out.output
    [line] = out.output.strip().splitlines()
    assert line.startswith(f"error: `tlops {command.split()[0]}` needs ") and line.endswith('pip install "tlops[train]"')


def test_serve_and_predict_run_on_the_defaults_without_a_params_file(tmp_path: Path):
    from serving_support import export_tiny_model, png_bytes

    model = export_tiny_model(tmp_path / "m" / "model.onnx")
    image = tmp_path / "m" / "red.png"
    image.write_bytes(png_bytes(np.full((8, 8, 3), (250, 0, 0), np.uint8)))
    out = tlops("predict", str(image), "--model", str(model), "--json", cwd=tmp_path)  # no params.yaml here
    assert out.returncode == 0, out.stderr
    assert '"label": "class_0"' in out.stdout
    assert "not found" in tlops("check", cwd=tmp_path).stderr  # the other commands still need the file


def test_a_registry_model_without_the_registry_extra_names_it(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from tlops.cli import app

    monkeypatch.chdir(tmp_path)
    _without(monkeypatch, "mlflow")
    (tmp_path / "x.png").write_bytes(b"")
    for argv in (["predict", "x.png", "--model", "models:/tlops-classifier@champion"],
                 ["serve", "--model", "models:/tlops-classifier@champion"]):
        out = CliRunner().invoke(app, argv)
        assert out.exit_code == 1, out.output
        assert out.output.strip().endswith('pip install "tlops[registry]"'), out.output


def test_run_set_takes_yaml_values_and_refuses_a_malformed_assignment(tmp_path: Path):
    import typer

    from tlops.cli import _assignments

    assert _assignments(["adapt.method=auto", "adapt.target=null", "serve.port=9000"]) == {
        "adapt.method": "auto", "adapt.target": None, "serve.port": 9000}
    assert _assignments(["adapt.target=/a=b"]) == {"adapt.target": "/a=b"}  # a value may hold '='
    assert _assignments(["finetune.lr=1e-3"]) == {"finetune.lr": 0.001}  # a number, not YAML 1.1's string
    with pytest.raises(typer.Exit):
        _assignments(["adapt.method"])
    (tmp_path / "params.yaml").write_text("{}\n")
    out = tlops("run", "--set", "nokey", cwd=tmp_path)
    assert out.returncode == 2 and "expected KEY=VALUE" in out.stderr
