"""The package's import graph, read from the source with ast (nothing is imported).

Every import statement in tracer/*.py counts, at module level or inside a
function (a lazy import is still an edge). Three rules:

- no import cycle among the package's modules;
- only the command line (tracer/cli.py) imports ``runner``, the poll loop;
- only tracer/bpfloader.py imports ``bcc``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "acceptrace"
PKG_DIR = Path(__file__).resolve().parent.parent / "tracer"
MODULES = sorted(p.stem for p in PKG_DIR.glob("*.py"))


@dataclass(frozen=True)
class Edge:
    src: str  # importing module (file stem in tracer/)
    dst: str  # imported package module, or the top-level name of an outside one
    internal: bool
    line: int

    def where(self) -> str:
        return f"tracer/{self.src}.py:{self.line}"


def _package_module(dotted: str) -> str | None:
    """The tracer/ module that ``acceptrace.<dotted>`` names (``""`` is __init__)."""
    first = dotted.split(".")[0] if dotted else "__init__"
    return first if first in MODULES else None


def _edges_of(module: str) -> Iterator[Edge]:
    path = PKG_DIR / f"{module}.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, _, rest = alias.name.partition(".")
                if top == PACKAGE:
                    dst = _package_module(rest)
                    if dst is not None:
                        yield Edge(module, dst, True, node.lineno)
                else:
                    yield Edge(module, top, False, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                name = node.module or ""
                top, _, rest = name.partition(".")
                if top != PACKAGE:
                    yield Edge(module, top, False, node.lineno)
                    continue
            else:
                # tracer/ is a flat package: level 1 is acceptrace itself.
                assert node.level == 1, f"tracer/{module}.py:{node.lineno}: import above package"
                rest = node.module or ""
            if rest:
                dst = _package_module(rest)
                if dst is not None:
                    yield Edge(module, dst, True, node.lineno)
            else:
                # `from . import x` / `from acceptrace import x`: a module, or a name
                # of the package's __init__.
                for alias in node.names:
                    yield Edge(module, alias.name if alias.name in MODULES else "__init__",
                               True, node.lineno)


def all_edges() -> list[Edge]:
    return [e for m in MODULES for e in _edges_of(m)]


def find_cycles(edges: list[Edge], modules: list[str] = MODULES) -> list[list[Edge]]:
    """One shortest cycle (as its edges) per strongly connected component that has one."""
    graph: dict[str, list[Edge]] = {m: [] for m in modules}
    for e in edges:
        if e.internal:
            graph[e.src].append(e)
    # Tarjan's strongly connected components (a few dozen modules: recursion is fine).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    sccs: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for e in graph[v]:
            if e.dst not in index:
                visit(e.dst)
                low[v] = min(low[v], low[e.dst])
            elif e.dst in stack:
                low[v] = min(low[v], index[e.dst])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            sccs.append(comp)

    for m in modules:
        if m not in index:
            visit(m)
    cycles = []
    for comp in sccs:
        start = min(comp)
        if len(comp) == 1 and not any(e.dst == start for e in graph[start]):
            continue
        # Breadth-first from start back to itself inside the component.
        prev: dict[str, Edge] = {}
        frontier, found = [start], None
        while found is None:
            nxt = []
            for v in frontier:
                for e in graph[v]:
                    if e.dst == start:
                        found = found or e
                    elif e.dst in comp and e.dst not in prev:
                        prev[e.dst] = e
                        nxt.append(e.dst)
            frontier = nxt
        path = [found]
        while path[0].src != start:
            path.insert(0, prev[path[0].src])
        cycles.append(path)
    return cycles


def describe(cycle: list[Edge]) -> str:
    names = " -> ".join([cycle[0].src, *(e.dst for e in cycle)])
    return names + " (" + ", ".join(e.where() for e in cycle) + ")"


def test_scanner_sees_lazy_and_relative_imports():
    """The rules below are only as good as the scanner: it must see the imports we
    know are there, the lazy ones inside functions included."""
    edges = {(e.src, e.dst) for e in all_edges()}
    assert ("cli", "runner") in edges            # lazy, inside main()
    assert ("bpfloader", "bcc") in edges         # lazy, the one place
    assert ("bpfloader", "layout") in edges      # from . import layout as L
    assert ("cli", "__init__") in edges          # from . import __version__
    assert ("render", "words") in edges          # from .words import ...


def test_find_cycles_reports_a_cycle():
    fake = [Edge("a", "b", True, 1), Edge("b", "c", True, 2), Edge("c", "a", True, 3),
            Edge("c", "d", True, 4), Edge("d", "d", True, 5), Edge("e", "a", True, 6),
            Edge("e", "bcc", False, 7)]
    cycles = sorted(describe(c) for c in find_cycles(fake, ["a", "b", "c", "d", "e"]))
    assert cycles == [
        "a -> b -> c -> a (tracer/a.py:1, tracer/b.py:2, tracer/c.py:3)",
        "d -> d (tracer/d.py:5)",
    ]


def test_no_import_cycle():
    cycles = find_cycles(all_edges())
    assert not cycles, "import cycles:\n" + "\n".join(describe(c) for c in cycles)


def test_only_cli_imports_runner():
    bad = [e.where() for e in all_edges()
           if e.internal and e.dst == "runner" and e.src not in ("cli", "runner")]
    assert not bad, "only tracer/cli.py may import runner (the poll loop): " + ", ".join(bad)


def test_only_bpfloader_imports_bcc():
    bad = [e.where() for e in all_edges()
           if not e.internal and e.dst == "bcc" and e.src != "bpfloader"]
    assert not bad, "only tracer/bpfloader.py may import bcc: " + ", ".join(bad)
