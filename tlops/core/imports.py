"""The project's import graph, read from its source with the standard library's ast (function-level imports
included): which code a module runs. The stages' DVC deps are held to it (tests/test_architecture.py), and a
checkpoint's code fingerprint is the code its run imported (code_fingerprint). Torch-free; pure functions of a tree.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tlops.core.io import sha256_file

PACKAGES = ("tlops", "tasks", "flows", "orchestration", "serving")


@dataclass(frozen=True)
class Import:
    """One import statement: the module it names, and whether it runs at import time or inside a function."""

    target: str
    lazy: bool
    line: int


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the given packages under root."""
    found = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _statements(tree: ast.Module, typing: bool = False) -> tuple[list[ast.Import | ast.ImportFrom], set[int]]:
    """The import statements that can run (not under `if TYPE_CHECKING:`, unless `typing`), and the lines of those
    inside a function."""
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for stmt in node.body for n in ast.walk(stmt)}
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               and (typing or id(n) not in typing_only)]
    lazy = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return imports, lazy


def imports_of(module: str, path: Path, known: set[str], typing: bool = False) -> list[Import]:
    """Every project module that `module` imports, with its package parents (Python runs their __init__ too);
    typing: those under `if TYPE_CHECKING:` too (a circle a type checker follows is a circle)."""
    statements, lazy_lines = _statements(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), typing)
    names: list[tuple[str, int]] = []
    for node in statements:
        if isinstance(node, ast.Import):
            names += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            # `from pkg import mod` imports pkg.mod when that is a module, else a name defined in pkg
            names += [(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, node.lineno) for a in node.names]
    out = []
    for name, line in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            target = ".".join(parts[:i])
            if target in known and target != module:
                out.append(Import(target, line in lazy_lines, line))
    return out


def graph(root: Path, packages: tuple[str, ...] = PACKAGES, typing: bool = False) -> dict[str, list[Import]]:
    """module -> the project modules it imports (each once, the eager import preferred over a lazy one); typing: with
    the imports under `if TYPE_CHECKING:` (for cycles; they never run, so no stage depends on them)."""
    files = module_files(root, packages)
    known = set(files)
    out = {}
    for name, path in files.items():
        best: dict[str, Import] = {}
        for imp in imports_of(name, path, known, typing):
            if imp.target not in best or (best[imp.target].lazy and not imp.lazy):
                best[imp.target] = imp
        out[name] = sorted(best.values(), key=lambda i: i.target)
    return out


def closure(g: dict[str, list[Import]], start: str) -> dict[str, str | None]:
    """Every module reachable from `start`, mapped to the module that imported it first (None for start)."""
    seen: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        m = queue.popleft()
        for imp in g.get(m, []):
            if imp.target not in seen:
                seen[imp.target] = m
                queue.append(imp.target)
    return seen


def chain(reached: dict[str, str | None], module: str) -> str:
    """How `start` reaches `module`: "a -> b -> module"."""
    path = [module]
    while (parent := reached[path[-1]]) is not None:
        path.append(parent)
    return " -> ".join(reversed(path))


def is_trivial(path: Path) -> bool:
    """A file that executes nothing but a docstring and constant assignments (an empty package __init__)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            continue
        return False
    return True


def third_party_imports(path: Path) -> dict[str, bool]:
    """Top-level names of every module imported by the file -> True when some import of it is eager."""
    statements, lazy_lines = _statements(ast.parse(path.read_text(encoding="utf-8")))
    out: dict[str, bool] = {}
    for node in statements:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
        for n in names:
            top = n.split(".")[0]
            out[top] = out.get(top, False) or node.lineno not in lazy_lines
    return out


def code_fingerprint(module: str) -> dict[str, str]:
    """sha256 of every non-trivial tlops module that `module` runs (itself included), by module name: what a
    checkpoint of its run records, so that a run of other code never resumes from it."""
    root = Path(__file__).resolve().parents[2]
    g = _tlops_graph(root)
    files = module_files(root, ("tlops",))
    return {m: sha256_file(files[m]) for m in sorted(closure(g, module)) if not is_trivial(files[m])}


@functools.cache
def _tlops_graph(root: Path) -> dict[str, list[Import]]:
    return graph(root, ("tlops",))
