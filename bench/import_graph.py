"""Print the cycles of popsicle_py's import graph; exit 1 if there is one.

Every import counts, at any depth (inside functions and ``if TYPE_CHECKING:`` too): a lazy
import is still a dependency, and a cycle of them is two modules that cannot be understood,
tested or moved apart.  An edge goes to the module an import names: ``from popsicle_py import
drives`` names the module ``popsicle_py.drives``, ``from popsicle_py.drives import Drive`` the
package ``popsicle_py.drives``.  Importing a submodule of another package (``popsicle_py.drives.
model`` from ``popsicle_py.blockdev``) runs that package's ``__init__`` first, so it is an edge
to the package as well; the root package ``popsicle_py`` is left out of that rule (its
``__init__`` is the library's front door, run before any of its modules); ``--direct`` leaves
the rule out altogether.

Usage: ``python bench/import_graph.py [--edges] [--direct] [package_dir]``.  Importable as well:
:func:`graph` and :func:`cycles` (tests/test_architecture.py uses them).
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path

ROOT = "popsicle_py"


def modules(package_dir: Path) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found: dict[str, Path] = {}
    base = package_dir.parent
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_package(name: str, known: dict[str, Path]) -> bool:
    return name in known and known[name].name == "__init__.py"


def _imported(tree: ast.AST, name: str, known: dict[str, Path]) -> Iterable[str]:
    """Dotted names of the package's modules that ``tree`` (module ``name``) imports."""
    here = name if _is_package(name, known) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in known else target


def graph(package_dir: Path, *, parents: bool = True) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (itself and outside modules left out);
    ``parents``: with the packages whose ``__init__`` such an import runs."""
    known = modules(package_dir)
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for target in _imported(ast.parse(path.read_text(), str(path)), name, known):
            while target and target not in known:  # popsicle_py.x.attr -> popsicle_py.x
                target = target.rpartition(".")[0]
            if not target.startswith(ROOT):
                continue
            targets.add(target)
            parent = target.rpartition(".")[0]
            while parents and parent != ROOT and parent.startswith(ROOT + ".") \
                    and not (name == parent or name.startswith(parent + ".")):
                targets.add(parent)  # importing a submodule runs its package's __init__
                parent = parent.rpartition(".")[0]
        targets.discard(name)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def cycle_path(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One closed walk through a component, to show how its modules import each other."""
    members = set(component)
    start = component[0]
    # Breadth-first back to start through members: the shortest loop that shows the cycle.
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(edges[node] & members):
            if nxt == start:
                walk = [node]
                while walk[-1] != start:
                    walk.append(previous[walk[-1]])
                return [*reversed(walk), start]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return [start]


def main(argv: list[str]) -> int:
    show_edges = "--edges" in argv
    args = [a for a in argv if a not in ("--edges", "--direct")]
    package_dir = Path(args[0]) if args else Path(__file__).resolve().parent.parent / ROOT
    edges = graph(package_dir, parents="--direct" not in argv)
    if show_edges:
        for name in sorted(edges):
            print(f"{name} -> {', '.join(sorted(edges[name])) or '-'}")
    found = cycles(edges)
    for component in found:
        print(f"cycle ({len(component)} modules): {' -> '.join(cycle_path(component, edges))}")
        if len(component) > 2:
            print(f"  all of: {', '.join(component)}")
    if not found:
        print(f"no import cycle among {len(edges)} modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
