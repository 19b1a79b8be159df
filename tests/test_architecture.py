"""What review would otherwise have to catch, checked on the source: stage deps in dvc.yaml cover the code each stage
runs (and nothing else), imports point one way, and there is no import cycle. Function-level imports count."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import pytest
import yaml
from architecture import chain, closure, cycles, graph, is_trivial, layer_violations, module_files, third_party_imports
from conftest import ROOT

GRAPH = graph(ROOT)
FILES = module_files(ROOT)
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
CMD = re.compile(r"^python3?\s+-m\s+([\w.]+)$")

# cli -> flows -> tasks -> library; orchestration (pipeline infrastructure) serves flows and the cli; serving stands
# apart. tlops.cli is the command line, the top of the chain, though it lives in the library's package.
LAYERS = {
    "tlops": ("tasks", "flows", "orchestration", "serving"),
    "tasks": ("flows", "orchestration", "serving"),
    "orchestration": ("flows", "tasks", "serving"),
    "flows": ("serving",),
    "serving": ("tasks", "flows", "orchestration"),
}
CLI = ("tlops.cli",)
# What the torch-free service may take from the library; the registry resolver (MLflow) only inside a function.
SERVING_MAY_USE = {"tlops", "tlops.config", "tlops.errors", "tlops.io", "tlops.preprocess", "tlops.onnx_meta",
                   "tlops.runtime", "tlops.drift", "tlops.text", "tlops.secrets", "tlops.dicom"}
SERVING_MAY_USE_LAZILY = {"tlops.registry"}
MLFLOW_MODULES = {"tlops.tracking", "tlops.registry"}


def stage_files(module: str) -> dict[str, str]:
    """Project files (posix, relative to the root) that a stage module runs -> how it reaches each."""
    reached = closure(GRAPH, module)
    return {FILES[m].relative_to(ROOT).as_posix(): chain(reached, m) for m in reached if not is_trivial(FILES[m])}


def covered(path: str, deps: list[str]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(d) or PurePosixPath(d) in p.parents for d in deps)


def code_dep(dep: str) -> bool:
    """A dependency on project code (a .py file, or a folder of a project package)."""
    return dep.endswith(".py") or dep.split("/")[0] in FILES


STAGES = {name: s for name, s in DVC_YAML["stages"].items()}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_every_project_file_the_stage_runs(stage: str):
    module = CMD.match(STAGES[stage]["cmd"]).group(1)
    deps = [d if isinstance(d, str) else next(iter(d)) for d in STAGES[stage].get("deps", [])]
    missing = [f"{path} (via {how})" for path, how in sorted(stage_files(module).items()) if not covered(path, deps)]
    assert missing == [], f"dvc.yaml stage {stage}: add these to its deps: {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_name_no_code_the_stage_does_not_run(stage: str):
    module = CMD.match(STAGES[stage]["cmd"]).group(1)
    runs = stage_files(module)
    deps = [d if isinstance(d, str) else next(iter(d)) for d in STAGES[stage].get("deps", [])]
    unused = [d for d in deps if code_dep(d) and not any(covered(f, [d]) for f in runs)]
    assert unused == [], f"dvc.yaml stage {stage} depends on code it does not run (it would rerun for nothing): {unused}"


def test_imports_point_one_way():
    assert layer_violations(GRAPH, LAYERS, exempt=CLI) == []


def test_no_import_cycle_counting_function_level_imports():
    assert cycles(GRAPH) == []


def test_serving_takes_from_the_library_only_what_serving_needs():
    bad = []
    for module, imps in GRAPH.items():
        if not module.startswith("serving"):
            continue
        for imp in imps:
            if not imp.target.startswith("tlops") or imp.target in SERVING_MAY_USE:
                continue
            if imp.target in SERVING_MAY_USE_LAZILY and imp.lazy:
                continue
            bad.append(f"{module} imports {imp.target} (line {imp.line}{', lazily' if imp.lazy else ''})")
    assert bad == []


def test_the_library_imports_no_prefect_and_only_tracking_and_registry_import_mlflow():
    prefect = [m for m, f in FILES.items() if m.startswith("tlops.") and m not in CLI and "prefect" in
               third_party_imports(f)]
    mlflow = [m for m, f in FILES.items() if "mlflow" in third_party_imports(f) and m not in MLFLOW_MODULES]
    assert (prefect, mlflow) == ([], [])


# ---------------------------------------------------------------- the checks themselves can fail


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_checker_sees_a_function_level_import_that_closes_a_cycle(tmp_path: Path):
    root = _tree(tmp_path, {"tlops/__init__.py": "", "tlops/a.py": "from tlops import b\n",
                            "tlops/b.py": "def f():\n    from tlops.a import x\n"})
    g = graph(root, ("tlops",))
    assert cycles(g) == [["tlops.a", "tlops.b"]]
    assert {i.target: i.lazy for i in g["tlops.b"]} == {"tlops": True, "tlops.a": True}  # the package runs too


def test_checker_reports_a_library_module_importing_a_task(tmp_path: Path):
    root = _tree(tmp_path, {"tlops/__init__.py": "", "tasks/__init__.py": "", "tasks/t.py": "X = 1\n",
                            "tlops/a.py": "def f():\n    from tasks.t import X\n"})
    g = graph(root, ("tlops", "tasks"))
    assert layer_violations(g, LAYERS) == ["tlops.a imports tasks (line 2)", "tlops.a imports tasks.t (line 2)"]


def test_checker_follows_imports_through_relative_and_type_checking_blocks(tmp_path: Path):
    root = _tree(tmp_path, {"flows/__init__.py": "", "flows/s.py": "from . import helper\n",
                            "flows/helper.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                               "    from flows import typing_only\n",
                            "flows/typing_only.py": "Y = 2\n"})
    reached = closure(graph(root, ("flows",)), "flows.s")
    assert set(reached) == {"flows.s", "flows", "flows.helper"}
