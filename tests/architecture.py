"""The checks of the import graph that only the tests need: cycles and layer rules. The graph itself is
tlops.core.imports' (the library fingerprints checkpoints with it)."""

from __future__ import annotations

from tlops.core.imports import (  # noqa: F401 - re-exported for tests/test_architecture.py
    PACKAGES,
    Import,
    chain,
    closure,
    graph,
    imports_of,
    is_trivial,
    module_files,
    third_party_imports,
)


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
