"""The confirmation with a closed standard input or error: a refusal (exit 2), nothing written.

``popsicle-py flash IMAGE DEVICE <&-`` (a script's service unit, a cron line that closes its
input) has no terminal to ask: it must refuse as it does for ``</dev/null``, with the
documented exit status 2 and, with --json, an error event and the summary last.  It said
"unexpected error: 'NoneType' object has no attribute 'isatty'" and exited 1.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd

MiB = 1 << 20

pytestmark = pytest.mark.root


def run_closed(args: list[str], close: int) -> subprocess.CompletedProcess[bytes]:
    """Run the command with descriptor ``close`` (0 or 2) closed, as ``<&-`` or ``2>&-`` do."""
    stdin = subprocess.DEVNULL if close != 0 else None
    stderr = subprocess.PIPE if close != 2 else None

    def shut() -> None:
        os.close(close)

    return subprocess.run([*popsicle_cmd(), *args], stdin=stdin, stdout=subprocess.PIPE,
                          stderr=stderr, preexec_fn=shut, timeout=60, check=False)


@pytest.mark.parametrize("command", ["flash", "probe", "erase", "watch"])
def test_closed_stdin_is_refused_with_exit_2(command: str, tmp_path: Path,
                                             loop_factory: Callable[..., Loop]) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    loop = loop_factory(8 * MiB, fill=0x5A)
    args = {"flash": ["flash", "--json", str(image), loop.path],
            "probe": ["probe", "--json", loop.path],
            "erase": ["erase", "--json", loop.path],
            "watch": ["watch", "--json", str(image)]}[command]
    done = run_closed(args, close=0)
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "unexpected error" not in stderr
    assert "refusing to write without confirmation" in stderr
    events = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert events[-1] == {"event": "summary", "ok": False, "results": []}
    assert events[0]["event"] == "error"
    assert loop.read(8 * MiB) == bytes([0x5A]) * (8 * MiB)  # nothing written


def test_closed_stderr_at_the_question_is_refused_with_exit_2(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """A terminal to ask on, but no standard error to show the drives on: no question."""
    import pty

    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    loop = loop_factory(8 * MiB, fill=0x5A)
    master, slave = pty.openpty()
    try:
        os.write(master, b"y\n")  # typed ahead: it must not be taken as the answer
        done = subprocess.run([*popsicle_cmd(), "flash", "--json", str(image), loop.path],
                              stdin=slave, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2),
                              timeout=60, check=False)
    finally:
        os.close(slave)
        os.close(master)
    assert done.returncode == 2
    events = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert events[-1] == {"event": "summary", "ok": False, "results": []}
    assert "standard error is closed" in events[0]["message"]
    assert loop.read(8 * MiB) == bytes([0x5A]) * (8 * MiB)
