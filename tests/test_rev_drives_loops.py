"""Loop devices stacked on loop devices: what a target stands on is not a holder of it.

``losetup`` over ``/dev/loopA`` makes loopB; loopC over loopB.  Writing loopC writes loopB's
and loopA's bytes: loopB is what loopC is stored on (as a disk is for its partition), not "a
loop device over it".  Another loop device over loopB is a holder, and is named as one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd
from loopdev import run as run_tool

MiB = 1 << 20
PATTERN = 0xA5


def popsicle(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=False)


@contextlib.contextmanager
def over(device: str, offset: int = 0) -> Iterator[str]:
    """A loop device over ``device`` from ``offset``."""
    path = run_tool("losetup", "-f", "--show", "-o", str(offset), device).strip()
    try:
        yield path
    finally:
        subprocess.run(["losetup", "-d", path], capture_output=True, check=False)


@pytest.mark.root
def test_the_top_of_a_loop_stack_is_written(loop_factory: Callable[..., Loop],
                                            tmp_path: Path) -> None:
    """Before: refused, "in use by /dev/loopB, a loop device over it", loopB being what it
    stands on."""
    bottom = loop_factory(4 * MiB, fill=PATTERN)
    image = tmp_path / "disk.img"
    data = os.urandom(MiB)
    image.write_bytes(data)
    with over(bottom.path) as middle, over(middle) as top:
        done = popsicle("flash", "--yes", "--no-probe", image, top)
        assert done.returncode == 0, done.stderr
        assert bottom.read(MiB) == data
        refused = popsicle("flash", "--yes", "--no-probe", image, middle)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"popsicle-py: {middle} is in use by {top}, a loop device over it at offset 0")


@pytest.mark.root
def test_a_loop_device_beside_the_target_is_named_for_what_it_is(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A second loop device over what the target stands on refuses it, and is not called "a
    loop device over it"."""
    bottom = loop_factory(4 * MiB, fill=PATTERN)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    with over(bottom.path) as middle, over(middle) as top, over(middle, MiB) as beside:
        done = popsicle("flash", "--yes", "--no-probe", image, top)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"popsicle-py: {top} is in use by {beside}, a loop device over what it is stored on "
        f"at offset {MiB}")
    assert bottom.read() == bytes([PATTERN]) * 4 * MiB
