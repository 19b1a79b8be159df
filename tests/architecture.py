"""The project's import graph, read from the source (function-level imports included), for tests/test_architecture.py.

Pure functions of a source tree, so the checks can also be run on a small synthetic tree and shown to fail.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

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


def _statements(tree: ast.Module) -> tuple[list[ast.Import | ast.ImportFrom], set[int]]:
    """The import statements that can run (not under `if TYPE_CHECKING:`), and the lines of those inside a function."""
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for stmt in node.body for n in ast.walk(stmt)}
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in typing_only]
    lazy = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return imports, lazy


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """Every project module that `module` imports, with its package parents (Python runs their __init__ too)."""
    statements, lazy_lines = _statements(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
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


def graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, list[Import]]:
    """module -> the project modules it imports (each once, the eager import preferred over a lazy one)."""
    files = module_files(root, packages)
    known = set(files)
    out = {}
    for name, path in files.items():
        best: dict[str, Import] = {}
        for imp in imports_of(name, path, known):
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


def cycles(g: dict[str, list[Import]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for imp in g.get(v, []):
            w = imp.target
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


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


def layer_violations(g: dict[str, list[Import]], rules: dict[str, tuple[str, ...]],
                     exempt: tuple[str, ...] = ()) -> list[str]:
    """Imports of a forbidden package: rules = {package: packages it must not import}."""
    bad = []
    for module, imps in sorted(g.items()):
        if module in exempt:
            continue
        pkg = module.split(".")[0]
        for imp in imps:
            if imp.target.split(".")[0] in rules.get(pkg, ()):
                bad.append(f"{module} imports {imp.target} (line {imp.line})")
    return bad


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
