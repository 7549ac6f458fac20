"""What a person sees on terminals that cannot draw live rows."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd

MiB = 1 << 20

pytestmark = pytest.mark.root


def test_a_dumb_terminal_gets_the_lines_of_a_log_as_the_run_goes(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """TERM=dumb (an Emacs shell, a serial console) cannot move the cursor, so Rich drew the
    live rows once, at the end: minutes of a blank screen, as though the run hung."""
    pexpect = pytest.importorskip("pexpect")
    image = tmp_path / "image.img"
    data = os.urandom(3 * MiB)
    image.write_bytes(data)
    loop = loop_factory(4 * MiB)
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(TERM="dumb", COLUMNS="100", LINES="30")
    cmd = popsicle_cmd()
    child = pexpect.spawn(cmd[0], [*cmd[1:], "flash", "--yes", str(image), loop.path],
                          env=env, dimensions=(30, 100), timeout=60, encoding="utf-8")
    child.expect(pexpect.EOF)
    lines = child.before.splitlines()
    child.close()
    assert child.exitstatus == 0, lines
    assert f"{loop.path}: writing" in lines  # said when it starts, not at the end
    assert any(line.startswith(f"{loop.path}: ok (") for line in lines), lines
    assert lines[-1] == "done: 1 of 1 drives ok"
    assert loop.read(len(data)) == data


def test_the_digests_at_the_end_are_whole_on_an_80_column_terminal(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Ten drives or more at 80 columns: the table was wider than the terminal and cut at its
    edge, and each SHA-256 read back lost a character on each of its lines, shown as though
    whole (60 of its 64 digits: a wrong proof for a person to copy)."""
    import hashlib
    import re

    pexpect = pytest.importorskip("pexpect")
    image = tmp_path / "image.img"
    data = os.urandom(MiB)
    image.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    loops = [loop_factory(2 * MiB) for _ in range(10)]
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(TERM="xterm-256color", COLUMNS="80", LINES="60")
    cmd = popsicle_cmd()
    child = pexpect.spawn(cmd[0], [*cmd[1:], "flash", "--yes", str(image),
                                   *(loop.path for loop in loops)],
                          env=env, dimensions=(60, 80), timeout=120, encoding="utf-8")
    child.expect(pexpect.EOF)
    output = child.before
    child.close()
    assert child.exitstatus == 0, output
    end = output[output.rindex("done: 10 of 10 drives ok"):]
    lines = [line.rstrip() for line in re.split(r"\r\n|\r|\n",
                                                re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", end))]
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert sum(line.startswith(digest) for line in lines) == 10, "\n".join(lines)


def test_a_table_taller_than_the_screen_ends_with_how_the_run_ended(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Ten drives on a 12-line terminal: the table's title ("done: 10 of 10 drives ok") had
    scrolled away, and the screen ended on the rows of the last drives."""
    import re

    pexpect = pytest.importorskip("pexpect")
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(MiB))
    loops = [loop_factory(2 * MiB) for _ in range(10)]
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(TERM="xterm-256color", COLUMNS="100", LINES="12")
    cmd = popsicle_cmd()
    child = pexpect.spawn(cmd[0], [*cmd[1:], "flash", "--yes", str(image),
                                   *(loop.path for loop in loops)],
                          env=env, dimensions=(12, 100), timeout=120, encoding="utf-8")
    child.expect(pexpect.EOF)
    output = child.before
    child.close()
    assert child.exitstatus == 0, output
    lines = [line.strip() for line in re.split(r"\r\n|\r|\n",
                                               re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output))]
    assert [line for line in lines if line][-1] == "done: 10 of 10 drives ok"
