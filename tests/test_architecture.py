"""Layout rules of the package, checked on its source: one-way imports, no import circles, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "kdeploy"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """kdeploy modules `path` imports at run time, function-level imports included (TYPE_CHECKING blocks not)."""
    tree = ast.parse(path.read_text())
    skip = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING"
            for b in n.body for x in ast.walk(b)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdeploy"):
            names = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods] or [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("kdeploy")]
        found.update(n for n in names if n in mods)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_package_has_no_import_circles_even_through_function_level_imports():
    mods = _modules()
    graph = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    assert _cycles(graph) == []


def test_nothing_below_the_orchestration_imports_it():
    mods = _modules()
    above = ("kdeploy.run", "kdeploy.api", "kdeploy.cli", "kdeploy.batch")

    def is_above(m: str) -> bool:
        return any(m == a or m.startswith(a + ".") for a in above)

    for m, p in mods.items():
        if m in ("kdeploy", "kdeploy.__main__") or is_above(m):
            continue
        upward = {i for i in _imports(p, mods) if is_above(i)}
        assert not upward, f"{m} imports {upward}"


def test_no_module_is_over_the_line_limit():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
