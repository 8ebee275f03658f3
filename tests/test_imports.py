"""The package's import structure: no cycles, no hidden imports, no oversized modules.

Every module of ``manifold_tf`` is parsed with :mod:`ast` (nothing is imported), so the checks see
imports at module level and inside functions alike. An import inside a function hides a dependency
from the reader and from this graph's cycle check unless it says why it is there: such imports must
carry a ``# deferred: <why>`` comment on their line or the line above (heavy optional libraries,
e.g. matplotlib or tensorflow_datasets, that would slow every start-up).
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import subprocess
import sys

import pytest

from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "manifold_tf"
MAX_LINES = 450  # a module longer than this does more than one thing: split it
DEFERRED = "# deferred:"


def _modules() -> dict[str, str]:
    """``{dotted module name: file path}`` of every ``.py`` file of the package."""
    modules = {}
    for folder, dirs, files in os.walk(os.path.join(ROOT, PACKAGE)):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()
PACKAGES = sorted(m for m, p in MODULES.items() if p.endswith("__init__.py"))


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules ``node`` (an import statement in ``module``) imports.

    ``from a import b`` names the submodule ``a.b`` when there is one, else the module ``a``;
    relative imports are resolved against ``module``'s package.
    """
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            is_package = MODULES[module].endswith("__init__.py")
            anchor = module.split(".")
            anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    found = []
    for name in names:
        # ``import a.b.c`` (or a name not found) depends on the longest module prefix that exists.
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module and name.split(".")[0] == PACKAGE:
            found.append(name)
    return found


def _parse(module: str) -> tuple[ast.Module, list[str]]:
    with open(MODULES[module], encoding="utf-8") as f:
        source = f.read()
    return ast.parse(source, MODULES[module]), source.splitlines()


def _import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported module: line of the first such import}}``, all imports counted."""
    graph: dict[str, dict[str, int]] = {}
    for module in MODULES:
        tree, _ = _parse(module)
        edges = graph.setdefault(module, {})
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(module, node):
                    edges.setdefault(target, node.lineno)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, {})):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_one_cycle(graph, set(c)) for c in components]


def _one_cycle(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``component`` (breadth-first search)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node]):
            if nxt == start:
                return paths[node] + [start]
            if nxt in component and nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strong component


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in itertools.pairwise(cycle)]
    return "  " + "\n  ".join(steps)


def test_the_package_import_graph_has_no_cycle():
    graph = _import_graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n\n".join(_describe(graph, c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def _function_imports(tree: ast.Module):
    """Every import statement inside a function (or a class body's method) of ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    yield inner


def test_imports_inside_functions_say_why():
    undocumented = []
    for module, path in MODULES.items():
        tree, lines = _parse(module)
        for node in _function_imports(tree):
            here = lines[node.lineno - 1]
            above = lines[node.lineno - 2] if node.lineno > 1 else ""
            if DEFERRED not in here and DEFERRED not in above:
                undocumented.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not undocumented, (
        f"imports inside functions without a '{DEFERRED} <why>' comment (move them to the top of "
        f"the module unless they save start-up time):\n  " + "\n  ".join(undocumented)
    )


def test_no_module_is_too_long():
    long = {}
    for path in MODULES.values():
        with open(path, encoding="utf-8") as f:
            count = sum(1 for _ in f)
        if count > MAX_LINES:
            long[os.path.relpath(path, ROOT)] = count
    assert not long, f"modules longer than {MAX_LINES} lines: {long}"


# Each package imported first, as in a fresh interpreter: TensorFlow and the other third-party
# modules stay loaded between packages (their import is not the subject and costs ~8 s each), every
# ``manifold_tf`` module is dropped from ``sys.modules`` first, so the package's own import order
# runs from scratch each time. Prints one JSON object: package -> None or the traceback.
_IMPORT_EACH = """
import importlib, json, sys, traceback
out = {}
for package in sys.argv[1:]:
    for name in [m for m in sys.modules if m == "manifold_tf" or m.startswith("manifold_tf.")]:
        del sys.modules[name]
    try:
        importlib.import_module(package)
        out[package] = None
    except BaseException:
        out[package] = traceback.format_exc()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_imports() -> dict[str, str | None]:
    """``import <package>`` for every package, each first in a fresh interpreter (never forked
    warm: a warm one has imported everything already): ``{package: None or the traceback}``."""
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *PACKAGES],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_import_check_sees_a_broken_package(tmp_path):
    """The check is not blind: a package whose import fails is reported with its traceback."""
    (tmp_path / "broken_pkg").mkdir()
    (tmp_path / "broken_pkg" / "__init__.py").write_text(
        "import manifold_tf\nraise ImportError('x')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, "broken_pkg", "json"],
        cwd=ROOT,
        env=dict(subprocess_env(), PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "ImportError: x" in out["broken_pkg"] and out["json"] is None


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_in_a_fresh_interpreter(package, fresh_imports):
    """A fresh process catches import-order problems that an already-warm test session hides."""
    assert fresh_imports[package] is None, fresh_imports[package][-3000:]
