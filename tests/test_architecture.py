"""The package's shape: no import cycle anywhere (lazy imports included), no module over 600
lines, the layers in their order (the CLI above the application layer above the rest).
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

#: The drive layer and media identity: below the block devices, never importing them.
BELOW_BLOCKDEV = ("popsicle_py.drives", "popsicle_py.drives.model", "popsicle_py.drives.rules",
                  "popsicle_py.drives.system", "popsicle_py.drives.holders",
                  "popsicle_py.drives.udev",
                  "popsicle_py.identity", "popsicle_py.media")


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


def test_no_import_cycle_anywhere() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                         check=False, cwd=ROOT)
    assert run.returncode == 0, run.stdout
    assert run.stdout.startswith("no import cycle among "), run.stdout


def test_drive_layer_and_media_identity_sit_below_the_block_devices() -> None:
    """blockdev may read media identity; the drive layer never imports it, lazily or not, and
    blockdev never imports the drive layer (the words of its errors are composed above it)."""
    edges = _checker().graph(PACKAGE)
    assert [n for n in BELOW_BLOCKDEV if "popsicle_py.blockdev" in edges[n]] == []
    assert "popsicle_py.media" in edges["popsicle_py.blockdev"]
    assert not {e for e in edges["popsicle_py.blockdev"] if e.startswith("popsicle_py.drives")}


def test_the_cli_imports_only_the_app_layer_and_the_vocabulary() -> None:
    """No image, drive, engine or block-device module under the CLI (issue 23): it parses,
    confirms and picks a view; everything else goes through popsicle_py.app."""
    edges = _checker().graph(PACKAGE, parents=False)
    forbidden = ("popsicle_py.images", "popsicle_py.drives", "popsicle_py.engine",
                 "popsicle_py.blockdev", "popsicle_py.remote", "popsicle_py.flash",
                 "popsicle_py.watch", "popsicle_py.plan", "popsicle_py.probe",
                 "popsicle_py.udisks", "popsicle_py.bmap", "popsicle_py.cache")
    cli = {name: targets for name, targets in edges.items()
           if name == "popsicle_py.cli" or name.startswith("popsicle_py.cli.")}
    wrong = {name: sorted(t for t in targets if t.startswith(forbidden))
             for name, targets in cli.items()}
    assert {name: t for name, t in wrong.items() if t} == {}


def test_no_job_imports_a_view() -> None:
    """The app layer, the jobs and the report feed views; they never import one."""
    edges = _checker().graph(PACKAGE, parents=False)
    views = ("popsicle_py.view", "popsicle_py.rows", "popsicle_py.cli")
    jobs = [n for n in edges if n.startswith(("popsicle_py.app", "popsicle_py.flash",
                                              "popsicle_py.watch", "popsicle_py.report",
                                              "popsicle_py.engine"))]
    assert {n: sorted(t for t in edges[n] if t.startswith(views))
            for n in jobs if any(t.startswith(views) for t in edges[n])} == {}


@pytest.mark.parametrize("module", [*BELOW_BLOCKDEV, "popsicle_py.app", "popsicle_py.cli",
                                    "popsicle_py.engine", "popsicle_py.images",
                                    "popsicle_py.remote", "popsicle_py.failures"])
def test_each_layer_imports_alone(module: str) -> None:
    """A layer on no cycle imports first, in a fresh interpreter."""
    run = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr


def test_no_module_over_600_lines() -> None:
    lengths = {name: len(path.read_text().splitlines())
               for name, path in _checker().modules(PACKAGE).items()}
    assert {name: n for name, n in sorted(lengths.items()) if n > MAX_LINES} == {}
