"""The package's import graph: layers without cycles, no borrowed private names.

The graph is read from the source (``ast``), imports inside functions
included, so an import that dodges a cycle by hiding in a function body is
still an edge. ``if TYPE_CHECKING:`` blocks are left out: they never run.
An edge goes to the module that is executed: ``from .a import b`` is an edge
to ``a.b`` when that is a module, else to ``a`` (a package's ``__init__``
included). The implicit import of a parent package by its submodules is not
an edge (Python initializes the parent first, whatever it imports).
"""

from __future__ import annotations

import ast
import functools
import shutil
import subprocess
from pathlib import Path

import pytest

import flexmerge_jax

ROOT = Path(flexmerge_jax.__file__).parent
PKG = "flexmerge_jax"

# Third-party modules that may only be imported inside functions: optional
# or heavy dependencies that the math core must not pull in at import time.
LAZY_OK = {"matplotlib", "flax", "orbax", "torch", "transformers"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """``(node, in_function)`` for every import outside ``TYPE_CHECKING`` blocks."""

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    yield from walk(c, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            yield from walk(child, inner)

    yield from walk(tree, False)


def _base(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    pkg = module.split(".")
    if not MODULES[module].name == "__init__.py":
        pkg = pkg[:-1]
    pkg = pkg[:len(pkg) - (node.level - 1)]
    return ".".join(pkg + ([node.module] if node.module else []))


@functools.cache
def _graph():
    """``(edges {module: {module}}, private [(importer, name, source)],
    lazy [(importer, imported, line)])``."""
    edges, private, lazy = {m: set() for m in MODULES}, [], []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, in_function in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = _base(mod, node)
                targets = []
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in MODULES:
                        targets.append(sub)
                    else:
                        targets.append(base)
                        if a.name.startswith("_") and base.startswith(PKG):
                            private.append((mod, a.name, base))
            for t in targets:
                if t.startswith(PKG):
                    while t not in MODULES:  # import a.b.c of a non-module name
                        t = t.rsplit(".", 1)[0]
                    if t != mod:
                        edges[mod].add(t)
                    if in_function:
                        lazy.append((mod, t, node.lineno))
                elif in_function and t.split(".")[0] not in LAZY_OK:
                    lazy.append((mod, t, node.lineno))
    return edges, private, lazy


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_and_relative_imports():
    edges, _, lazy = _graph()
    assert f"{PKG}.methods._contract" in edges[f"{PKG}.methods.ties"]
    assert f"{PKG}.tree" in edges[f"{PKG}.stats.order"]  # from ..tree import
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(_graph()[0])
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_imported_from_other_modules():
    _, private, _ = _graph()
    assert not private, "private names imported across modules: " + "; ".join(
        f"{m} imports {n} from {s}" for m, n, s in private)


def test_imports_inside_functions_are_optional_dependencies_only():
    _, _, lazy = _graph()
    bad = sorted({f"{m} line {line}: {t}" for m, t, line in lazy})
    assert not bad, f"imports inside functions (only {sorted(LAZY_OK)} may be): " + "; ".join(bad)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install ruff)")
def test_the_repository_passes_ruff():
    """``ruff check`` of the whole repository (package, tests, benchmarks, examples, docs) with
    the configuration in ``pyproject.toml``."""
    out = subprocess.run(["ruff", "check", "--no-cache", "--output-format", "concise"],
                         cwd=ROOT.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def _documented_order() -> list[str]:
    """The modules in docs/architecture.md's tree, in reading order; a
    package (``name/``) counts after everything listed under it (its
    ``__init__`` imports its modules), the root ``__init__.py`` last."""
    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    tree = text.split("```text\n", 1)[1].split("```", 1)[0].splitlines()[1:]
    order, open_pkgs = [], []  # open_pkgs: (indent, package module)
    for line in tree:
        indent = len(line) - len(line.lstrip())
        while open_pkgs and open_pkgs[-1][0] >= indent:
            order.append(open_pkgs.pop()[1])
        prefix = ".".join([PKG] + [p.rsplit(".", 1)[-1] for _, p in open_pkgs])
        words = line.split()
        if words and words[0].endswith("/"):
            open_pkgs.append((indent, f"{prefix}.{words[0][:-1]}"))
            continue
        for w in words:
            if not w.endswith(".py"):
                break
            order.append(PKG if w == "__init__.py" else f"{prefix}.{w[:-3]}")
    order.extend(p for _, p in reversed(open_pkgs))
    return order


def test_architecture_doc_lists_every_module_in_import_order():
    """docs/architecture.md is true: every module once, each importing only
    modules listed above it."""
    order = _documented_order()
    assert sorted(order) == sorted(MODULES), (
        f"missing from docs/architecture.md: {sorted(set(MODULES) - set(order))}; "
        f"listed but not modules: {sorted(set(order) - set(MODULES))}")
    pos = {m: i for i, m in enumerate(order)}
    edges = _graph()[0]
    upward = sorted(f"{m} imports {t}" for m in MODULES for t in edges[m] if pos[t] > pos[m])
    assert not upward, "imports of modules listed below (reorder the doc or the code): " + \
        "; ".join(upward)
