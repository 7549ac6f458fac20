"""The programs a drive's boot-files step runs (mcopy, fsck.vfat) never outlive its lane: they
start with no signal blocked, and a lane that stalls or is stopped kills and reaps them before
popsicle exits, so nothing is left holding the drive open after its result.

An ``mcopy`` stand-in first on PATH says its blocked signals and its pid (through a FIFO: the
test waits on it, never on a sleep), then sleeps with the drive's descriptor open.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pi_image
import pytest
from conftest import Loop, popsicle_cmd

from popsicle_py.records import record

pytestmark = pytest.mark.root
FILL = 0x5A


@record
class Flashing:
    """A flash running, its mcopy stand-in started and sleeping."""

    popsicle: subprocess.Popen[str]
    pid: int  # the stand-in's
    blocked: str  # its SigBlk line
    loop: Loop
    original: bytes  # the image

    def head_unwritten(self) -> bool:
        head = Path(self.loop.backing).read_bytes()[:64 << 10]
        return head != self.original[:64 << 10] and head != bytes([FILL]) * len(head)


@contextmanager
def flash_with_sleeping_mcopy(tmp_path: Path, loop_factory: Callable[..., Loop],
                              *args: str) -> Iterator[Flashing]:
    """``popsicle flash --customize`` running, its mcopy (a stand-in) started and sleeping.
    The stand-in is killed at the end if it outlived popsicle (the old code's orphan), so
    that the loop device can go."""
    image = pi_image.build(tmp_path, table="gpt")
    toml = tmp_path / "settings.toml"
    toml.write_text('hostname = "pi-01"\n')
    fake, fifo, blocked = tmp_path / "bin", tmp_path / "mcopy.pid", tmp_path / "mcopy.sigblk"
    fake.mkdir()
    os.mkfifo(fifo)
    (fake / "mcopy").write_text(  # the shell's own mask, read by itself (no child of it)
        "#!/bin/sh\nwhile read -r key value; do [ \"$key\" = SigBlk: ] && echo \"$value\" "
        f"> {blocked}; done < /proc/$$/status\necho $$ > {fifo}\nexec sleep 300\n")
    (fake / "mcopy").chmod(0o755)
    loop = loop_factory(image.stat().st_size, fill=FILL)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # no writer yet: not readable
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    popsicle = subprocess.Popen([*popsicle_cmd(), "flash", str(image), loop.path, "--yes",
                                 "--json", "--customize", str(toml), *args],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
    pid = 0
    try:
        ready, _, _ = select.select([reader], [], [], 120)
        assert ready, "mcopy never started"
        pid = int(os.read(reader, 64).split()[0])
        yield Flashing(popsicle, pid, blocked.read_text().strip(), loop, image.read_bytes())
    finally:
        os.close(reader)
        if popsicle.poll() is None:
            popsicle.kill()
        popsicle.communicate()
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """The process is there and not a zombie (a zombie holds no descriptor)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def summary(stdout: str) -> dict[str, Any]:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert events and events[-1]["event"] == "summary", stdout
    return events[-1]


NOTHING_BLOCKED = "0000000000000000"


def test_a_stalled_boot_files_step_leaves_no_program_behind(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """The drive fails "stalled" and its head is not written; the mcopy it ran is gone as
    soon as popsicle has exited (not an orphan holding the drive open)."""
    with flash_with_sleeping_mcopy(tmp_path, loop_factory, "--stall-timeout", "2") as run:
        out, err = run.popsicle.communicate(timeout=120)
        assert run.popsicle.returncode == 1, err + out
        assert not alive(run.pid), "mcopy outlived popsicle"
        (result,) = summary(out)["results"]
        assert result["status"] == "failed" and "stalled" in result["error"], result
        assert result["customized"] is None and run.head_unwritten()
        assert run.blocked == NOTHING_BLOCKED


def test_a_signal_during_the_boot_files_step_stops_its_program(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """SIGTERM while mcopy runs: the drive is cancelled, its head not written, exit 143, and
    the mcopy is gone when popsicle has exited."""
    with flash_with_sleeping_mcopy(tmp_path, loop_factory) as run:
        run.popsicle.send_signal(signal.SIGTERM)
        out, err = run.popsicle.communicate(timeout=60)
        assert run.popsicle.returncode == 128 + signal.SIGTERM, err + out
        assert not alive(run.pid), "mcopy outlived popsicle"
        (result,) = summary(out)["results"]
        assert result["status"] == "cancelled" and run.head_unwritten(), result
        # Its head's write never began: nothing was "overwritten again".
        assert result["error"] == "cancelled", result
        assert run.blocked == NOTHING_BLOCKED
