"""The package's layers, read from its source with ``ast``: every import of a module of fxprop
goes to its own layer or one below, and no module imports itself back through others.

Layers, from the bottom: ``graph``, ``plan``, ``runtime``, ``calibration``, ``clients`` (each a
folder of ``fxprop/``); the demo model sits beside the clients; the entry points (``fxprop``
itself, ``api``, ``cli``, ``__main__``, ``comfyui``) above all. Imports inside functions and
under ``TYPE_CHECKING`` count: a circle broken by a late import is still a circle.

``python tests/test_layers.py`` prints the import drawing (``--dot``: for graphviz).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fxprop"
TOOLS = PACKAGE.parent / "tools"
LAYERS = ("graph", "plan", "runtime", "calibration", "clients")   # bottom to top
BESIDE = {"demo": "clients"}                                      # folders outside the layers
ENTRIES = {"fxprop", "fxprop.api", "fxprop.cli", "fxprop.__main__", "fxprop.comfyui"}


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _target(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path) -> dict[str, set[str]]:
    """Each module's imports of modules of the same package (``from x import sub`` of a
    submodule counts as an import of the submodule)."""
    known, name = modules(root), root.name
    edges: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _target(node, module, path.name == "__init__.py")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                           for a in node.names]
            else:
                continue
            edges[module] |= {t for t in targets
                              if (t == name or t.startswith(name + ".")) and t != module}
    return edges


def script_imports(folder: Path) -> dict[str, set[str]]:
    """Each script's imports of the other scripts of ``folder`` (a script's own folder is on
    its path, so they import each other by bare name)."""
    names = {p.stem for p in folder.glob("*.py")}
    edges: dict[str, set[str]] = {}
    for name in names:
        tree = ast.parse((folder / f"{name}.py").read_text())
        edges[name] = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                       for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                            if isinstance(n, ast.ImportFrom) and n.module
                                            and not n.level}
        edges[name] &= names - {name}
    return edges


def layer_of(module: str) -> int:
    """The layer's index (0 the bottom); the entry points are above every layer."""
    parts = module.split(".")
    folder = BESIDE.get(parts[1], parts[1]) if len(parts) > 1 else None
    if folder in LAYERS:
        return LAYERS.index(folder)
    if module in ENTRIES or module.split(".")[0] == module:
        return len(LAYERS)
    raise ValueError(f"{module} is in no layer: put it in one of the folders {LAYERS}")


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The imports that go from a layer to one above it."""
    return sorted((a, b) for a, targets in edges.items() for b in targets
                  if layer_of(b) > layer_of(a))


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One import circle per strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def drawing(edges: dict[str, set[str]], dot: bool = False) -> str:
    """The imports, layer by layer (text), or as a graphviz digraph."""
    short = {m: m.removeprefix("fxprop.") for m in edges}
    if dot:
        lines = ["digraph fxprop {", "  rankdir=BT; node [shape=box];"]
        for i, layer in enumerate((*LAYERS, "entry points")):
            members = [m for m in sorted(edges) if layer_of(m) == i]
            lines.append(f'  subgraph "cluster_{layer}" {{ label="{layer}"; '
                         + " ".join(f'"{short[m]}";' for m in members) + " }")
        lines += [f'  "{short[a]}" -> "{short[b]}";' for a in sorted(edges)
                  for b in sorted(edges[a])]
        return "\n".join(lines + ["}"])
    lines = []
    for i, layer in enumerate((*LAYERS, "entry points")):
        lines.append(f"{i + 1}. {layer}")
        for m in (m for m in sorted(edges) if layer_of(m) == i):
            lines.append(f"   {short[m]:32} -> {', '.join(sorted(short[t] for t in edges[m]))}")
    return "\n".join(lines)


# -- the rule, on fxprop ---------------------------------------------------------------------------

def test_every_module_is_in_a_layer():
    for module in modules(PACKAGE):
        layer_of(module)  # raises for a module outside the folders and the entry points


def test_no_import_goes_to_a_layer_above():
    assert upward(imports(PACKAGE)) == []


def test_no_import_circle():
    assert circles(imports(PACKAGE)) == []


def test_the_clients_are_not_imported_by_the_core():
    """The core never learns the clients' names (and so imports without diffusers or ComfyUI)."""
    core = [m for m in modules(PACKAGE) if layer_of(m) < LAYERS.index("clients")]
    for module in core:
        assert not any(".clients" in t for t in imports(PACKAGE)[module]), module


def test_no_import_circle_between_tools():
    """Shared helpers live in tools/common.py; no benchmark imports another that imports it."""
    edges = script_imports(TOOLS)
    assert circles(edges) == []
    assert "common" in edges and not edges["common"]


# -- the checker, on a package with known faults ---------------------------------------------------

def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"__init__.py": "", **files}.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checker_finds_upward_imports_and_circles(tmp_path):
    """A late import up a layer, a circle through a submodule import, and one under
    TYPE_CHECKING are all found; imports of other packages are not edges."""
    pkg = _package(tmp_path, {
        "graph/__init__.py": "",
        "graph/a.py": "import torch\ndef f():\n    from ..runtime.b import g\n",
        "runtime/__init__.py": "",
        "runtime/b.py": "from . import c\n",
        "runtime/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from .b import g\n",
    })
    edges = imports(pkg)
    assert edges["pkg.graph.a"] == {"pkg.runtime.b"}
    assert upward(edges) == [("pkg.graph.a", "pkg.runtime.b")]
    assert circles(edges) == [["pkg.runtime.b", "pkg.runtime.c"]]


def test_a_module_outside_the_layers_is_named():
    try:
        layer_of("fxprop.helpers.x")
    except ValueError as err:
        assert "fxprop.helpers.x" in str(err)
    else:
        raise AssertionError("a module outside the layers was accepted")


if __name__ == "__main__":
    print(drawing(imports(PACKAGE), dot="--dot" in sys.argv))
