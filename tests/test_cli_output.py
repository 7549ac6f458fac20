"""What the listing commands and the help print, read as a person or a script reads them.

A listing that cannot be written has failed (exit 1, one line, no traceback); help text can be
copied (no name broken at a hyphen) and shows each command's whole summary.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable
from typing import IO, Any

import pytest
from conftest import Loop, popsicle_cmd

MiB = 1 << 20


def _run(*args: str, width: int = 80, stdout: int | IO[Any] = subprocess.PIPE
         ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(width)}
    return subprocess.run([*popsicle_cmd(), *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)


@pytest.mark.parametrize("args", [("list", "--all"), ("list", "--all", "--json"),
                                  ("cache", "list"), ("polkit-rule",)])
def test_output_that_cannot_be_written_is_one_line_and_exit_1(args: tuple[str, ...]) -> None:
    with open("/dev/full", "w") as full:
        done = _run(*args, stdout=full)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "popsicle-py: cannot write the output (No space left on device)"]


@pytest.mark.parametrize("args", [("list",), ("cache", "list"), ("polkit-rule",)])
def test_a_closed_stdout_is_one_line_and_exit_1(args: tuple[str, ...]) -> None:
    cmd = " ".join(f"'{part}'" for part in [*popsicle_cmd(), *args])
    done = subprocess.run(["sh", "-c", f"{cmd} >&-"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "popsicle-py: cannot write the output: standard output is closed"]


def test_a_reader_that_leaves_is_no_failure() -> None:
    cmd = " ".join(f"'{part}'" for part in [*popsicle_cmd(), "polkit-rule"])
    done = subprocess.run(["sh", "-c", f"{cmd} | head -c 1 >/dev/null; echo $?"],
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr and "Error" not in done.stderr


@pytest.mark.root
def test_list_all_fits_80_columns_and_shows_a_port_column_only_with_ports(
        loop_factory: Callable[..., Loop]) -> None:
    loop = loop_factory(8 * MiB)
    done = _run("list", "--all")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(len(line.rstrip()) <= 80 for line in lines), done.stdout
    header = next(line for line in lines if "Device" in line)
    assert "Port" not in header  # no disk on this machine hangs off a USB port
    (at,) = [i for i, line in enumerate(lines) if line.startswith(loop.path + " ")]
    # The verdict whole, on the row and the lines it folds onto (another test's long mount
    # point, in the same run, can narrow the last column): folded, never cut.
    folded = [lines[at]] + [line for line in itertools.takewhile(
        lambda line: not line.startswith("/"), lines[at + 1:])]
    verdict = " ".join(line[lines[at].index("no: "):].strip() for line in folded)
    assert verdict == "no: not a USB or SD drive", done.stdout


@pytest.mark.parametrize("width", [60, 80, 100])
def test_help_shows_each_command_summary_whole(width: int) -> None:
    done = _run("--help", width=width)
    text = " ".join(done.stdout.split())
    commands = done.stdout.split("Commands:")[1]
    assert "..." not in commands
    assert ("verify Compare each DEVICE with IMAGE (a file or an http(s):// URL); report the "
            "first bad offset.") in text
    assert "cache The downloads kept by --cache, in $XDG_CACHE_HOME/popsicle-py" in text


@pytest.mark.parametrize("width", [50, 60, 70, 80, 100, 120])
def test_help_never_breaks_a_name_at_a_hyphen(width: int) -> None:
    rule = _run("polkit-rule", "--help", width=width).stdout
    assert "/etc/polkit-1/rules.d/50-popsicle-py.rules" in rule
    flash = _run("flash", "--help", width=width).stdout
    assert "~/.cache/popsicle-py" in flash
    assert "$POPSICLE_PY_CACHE" in flash
