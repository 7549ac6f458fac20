"""The package's shape: no import cycle, no module over 600 lines.

Both are checked for the modules listed in OWNED; every other offender is printed (run with
``-s`` to see it) but does not fail yet: the lead tightens the lists once the branches that
move those modules apart are merged.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "popsicle_py"
SCRIPT = ROOT / "bench" / "import_graph.py"
MAX_LINES = 600

#: Modules that must be on no import cycle and under MAX_LINES (blockdev: only its media
#: identity section left it here; see KNOWN_EDGES and test_no_module_over_600_lines).
OWNED = frozenset({
    "popsicle_py.drives",
    "popsicle_py.drives.model",
    "popsicle_py.drives.rules",
    "popsicle_py.drives.system",
    "popsicle_py.drives.udev",
    "popsicle_py.identity",
    "popsicle_py.media",
    "popsicle_py.plan",
})

#: Imports that still close a cycle, each with the change that removes it.  Leave them out of
#: the graph for the OWNED check; the whole graph is printed with them.
KNOWN_EDGES = frozenset({
    # blockdev._mountpoints asks drives for mount points to word an EBUSY error: it leaves
    # blockdev with the failure/describe_error section (issue 23, another branch).
    ("popsicle_py.blockdev", "popsicle_py.drives"),
    # errors imports engine.results for a type only (under TYPE_CHECKING), which runs
    # engine/__init__ (it imports errors) were it ever executed.
    ("popsicle_py.errors", "popsicle_py.engine"),
})


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_graph_script_reports_cycles_with_its_exit_code(tmp_path: Path) -> None:
    package = tmp_path / "popsicle_py"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from popsicle_py import b\n")
    (package / "b.py").write_text("from popsicle_py.sub.c import X\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("import popsicle_py.a\nX = 1\n")
    run = subprocess.run([sys.executable, str(SCRIPT), str(package)], capture_output=True,
                         text=True, check=False)
    assert (run.returncode, run.stdout) == (1, "cycle (3 modules): popsicle_py.a -> "
                                            "popsicle_py.b -> popsicle_py.sub.c -> popsicle_py.a\n"
                                            "  all of: popsicle_py.a, popsicle_py.b, "
                                            "popsicle_py.sub.c\n")
    (package / "sub" / "c.py").write_text("X = 1\n")
    run = subprocess.run([sys.executable, str(SCRIPT), str(package)], capture_output=True,
                         text=True, check=False)
    assert (run.returncode, run.stdout) == (0, "no import cycle among 5 modules\n")


def test_importing_a_submodule_runs_its_package(tmp_path: Path) -> None:
    """An import of popsicle_py.sub.c runs sub/__init__ first: a cycle through it counts."""
    package = tmp_path / "popsicle_py"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from popsicle_py.sub.c import X\n")
    (package / "sub" / "__init__.py").write_text("from popsicle_py import a\n")
    (package / "sub" / "c.py").write_text("from . import d\nX = 1\n")
    (package / "sub" / "d.py").write_text("")
    checker = _checker()
    edges = checker.graph(package)
    assert edges["popsicle_py.a"] == {"popsicle_py.sub", "popsicle_py.sub.c"}
    assert edges["popsicle_py.sub.c"] == {"popsicle_py.sub.d"}  # its own package is running
    assert checker.cycles(edges) == [["popsicle_py.a", "popsicle_py.sub"]]
    assert checker.cycles(checker.graph(package, parents=False)) == []


def test_no_import_cycle_through_owned_modules() -> None:
    checker = _checker()
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                         check=False, cwd=ROOT)
    print(run.stdout)  # the whole picture, known edges included
    edges = {name: {t for t in targets if (name, t) not in KNOWN_EDGES}
             for name, targets in checker.graph(PACKAGE).items()}
    assert set(edges) >= OWNED, OWNED - set(edges)
    on_cycles = {name for component in checker.cycles(edges) for name in component}
    assert not OWNED & on_cycles, [c for c in checker.cycles(edges) if OWNED & set(c)]


def test_drive_layer_and_media_identity_sit_below_the_block_devices() -> None:
    """blockdev may read media identity (and, until its failure wording moves, drives); they
    never import it back, lazily or not."""
    edges = _checker().graph(PACKAGE)
    below = sorted(n for n in OWNED if n != "popsicle_py.plan")
    assert [n for n in below if "popsicle_py.blockdev" in edges[n]] == []
    assert "popsicle_py.media" in edges["popsicle_py.blockdev"]


@pytest.mark.parametrize("module", sorted(OWNED))
def test_owned_module_imports_alone(module: str) -> None:
    """A module that is on no cycle imports first, in a fresh interpreter."""
    run = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr


def test_no_module_over_600_lines() -> None:
    lengths = {name: len(path.read_text().splitlines())
               for name, path in _checker().modules(PACKAGE).items()}
    over = {name: n for name, n in sorted(lengths.items()) if n > MAX_LINES}
    for name, n in over.items():
        print(f"{name}: {n} lines (at most {MAX_LINES})")
    assert not {name: n for name, n in over.items() if name in OWNED}
