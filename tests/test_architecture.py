"""What review would otherwise have to catch, checked on the source: stage deps in dvc.yaml cover the code each stage
runs (and nothing else), imports point one way, the torch-free unit stays torch-free, and there is no import cycle.
Function-level imports and those under TYPE_CHECKING count as imports for cycles and layers."""

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

# cli -> flows -> tasks -> library; orchestration (pipeline infrastructure: Prefect server and stage runner, DVC,
# locks) serves flows, tasks and the cli; serving stands apart. tlops.cli is the command line, the top of the chain,
# though it lives in the library's package.
LAYERS = {
    "tlops": ("tasks", "flows", "orchestration", "serving"),
    "tasks": ("flows", "serving"),
    "orchestration": ("flows", "tasks", "serving"),
    "flows": ("serving",),
    "serving": ("tasks", "flows", "orchestration"),
}
CLI = ("tlops.cli",)
# The torch-free unit: what the service (and `tlops predict` from a serve-only install) may import from the library.
TORCH_FREE = ("tlops.core", "tlops.inputs", "tlops.onnx")
SERVING_MAY_USE_LAZILY = {"tlops.tracking", "tlops.tracking.registry"}  # models:/ URIs, with the registry extra
MLFLOW_PACKAGE = "tlops.tracking"
HEAVY = ("torch", "torchvision", "timm", "transformers", "prefect", "dvc", "mlflow", "sklearn", "matplotlib")


def in_unit(module: str) -> bool:
    return module == "tlops" or module.startswith(tuple(f"{p}." for p in TORCH_FREE)) or module in TORCH_FREE


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


def test_no_import_cycle_counting_function_level_and_type_checking_imports():
    assert cycles(graph(ROOT, typing=True)) == []


def test_serving_takes_from_the_library_only_the_torch_free_unit():
    bad = []
    for module, imps in GRAPH.items():
        if not module.startswith("serving"):
            continue
        for imp in imps:
            if not imp.target.startswith("tlops") or in_unit(imp.target):
                continue
            if imp.target in SERVING_MAY_USE_LAZILY and imp.lazy:
                continue
            bad.append(f"{module} imports {imp.target} (line {imp.line}{', lazily' if imp.lazy else ''})")
    assert bad == []


def test_the_torch_free_unit_imports_nothing_outside_it_and_no_training_stack():
    outside = [f"{m} imports {i.target} (line {i.line})" for m, imps in GRAPH.items() if in_unit(m)
               for i in imps if i.target.startswith("tlops") and not in_unit(i.target)]
    heavy = [f"{m} imports {name}" for m, f in FILES.items() if in_unit(m)
             for name in third_party_imports(f) if name in HEAVY]
    assert (outside, heavy) == ([], [])


def test_the_library_imports_no_prefect_and_only_tracking_imports_mlflow():
    prefect = [m for m, f in FILES.items() if m.startswith("tlops.") and m not in CLI and "prefect" in
               third_party_imports(f)]
    mlflow = [m for m, f in FILES.items() if "mlflow" in third_party_imports(f) and not m.startswith(MLFLOW_PACKAGE)]
    assert (prefect, mlflow) == ([], [])


def test_no_two_modules_share_a_name_across_the_projects_packages():
    """A module's name says what it does, once: tasks/export.py is the stage, tlops/export/ the library's package."""
    names: dict[str, list[str]] = {}
    for module, path in FILES.items():
        if path.name != "__init__.py" and not module.startswith("tasks."):
            names.setdefault(path.stem, []).append(module)
    assert {n: ms for n, ms in names.items() if len(ms) > 1} == {}


def test_print_the_code_files_each_stage_depends_on(capsys):
    """The per-stage count of code files, as dvc.yaml lists them (held to the import graph above)."""
    counts = {stage: len(stage_files(CMD.match(STAGES[stage]["cmd"]).group(1))) for stage in STAGES}
    with capsys.disabled():
        print("\ncode files per stage: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    assert counts["train_head"] < counts["finetune"]  # the head never runs the fine-tuning machinery


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


def test_checker_counts_a_type_checking_import_in_a_cycle_but_no_stage_runs_it(tmp_path: Path):
    root = _tree(tmp_path, {"serving/__init__.py": "", "serving/a.py": "from serving import b\n",
                            "serving/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                            "    from serving.a import X\n"})
    assert cycles(graph(root, ("serving",), typing=True)) == [["serving.a", "serving.b"]]
    assert cycles(graph(root, ("serving",))) == []


def test_the_code_a_checkpoint_records_is_the_code_its_run_imports():
    """TRAINING_CODE / ADAPT_CODE are read from the import graph, not kept by hand (the hand-kept list once left out
    the backbone registry)."""
    from tlops.adapt.run import ADAPT_CODE
    from tlops.core.imports import code_fingerprint
    from tlops.training.checkpoint import TRAINING_CODE

    for module in (TRAINING_CODE, ADAPT_CODE):
        runs_here = {m for m in closure(GRAPH, module) if m.startswith("tlops") and not is_trivial(FILES[m])}
        assert set(code_fingerprint(module)) == runs_here
    assert {"tlops.models.backbones", "tlops.training.finetune", "tlops.inputs.images"} <= set(
        code_fingerprint(TRAINING_CODE))


def test_checker_follows_imports_through_relative_and_type_checking_blocks(tmp_path: Path):
    root = _tree(tmp_path, {"flows/__init__.py": "", "flows/s.py": "from . import helper\n",
                            "flows/helper.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                               "    from flows import typing_only\n",
                            "flows/typing_only.py": "Y = 2\n"})
    reached = closure(graph(root, ("flows",)), "flows.s")
    assert set(reached) == {"flows.s", "flows", "flows.helper"}
