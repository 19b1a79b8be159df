"""The tlops command line: every command listed, config errors exit 2 with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["run", "stage", "check", "data-version", "backbones", "deploy", "serve-schedule", "serve", "predict", "ui"]


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
