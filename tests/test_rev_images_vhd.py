"""A dynamic VHD is a virtual disk, not a disk image: refused, as a qcow2 is.

A dynamic (or differencing) VHD starts with a copy of its 512-byte "conectix" footer, then
its "cxsparse" header and block table: written raw, the drive holds a container that boots
nothing, and reads back "ok".  A fixed VHD is the raw disk with the footer after it: written
as it is.  Real loop devices, through the command.
"""

from __future__ import annotations

import lzma
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, needs_root, popsicle_cmd

pytestmark = needs_root

FOOTER = b"conectix".ljust(512, b"\0")


def flash(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), "flash", *args, "--yes"], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


def dynamic_vhd() -> bytes:
    header = b"cxsparse".ljust(1024, b"\0")
    return FOOTER + header + bytes(1 << 20) + FOOTER


@pytest.mark.parametrize("compressed", [False, True])
def test_a_dynamic_vhd_is_refused_with_what_converts_it(
        compressed: bool, tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    data = dynamic_vhd()
    path = tmp_path / ("disk.vhd.xz" if compressed else "disk.vhd")
    path.write_bytes(lzma.compress(data, preset=0) if compressed else data)
    loop = loop_factory(4 << 20, fill=0xA5)
    result = flash(str(path), loop.path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, lines
    assert "is a VHD (Virtual PC, Hyper-V) dynamic image, not a raw disk image" in lines[0]
    assert "qemu-img convert -O raw" in lines[0]
    assert loop.read(4 << 20) == b"\xa5" * (4 << 20)


def test_a_fixed_vhd_is_written_as_it_is(tmp_path: Path,
                                         loop_factory: Callable[..., Loop]) -> None:
    disk = bytearray(os.urandom(1 << 20))
    disk[510:512] = b"\x55\xaa"
    data = bytes(disk) + FOOTER
    path = tmp_path / "disk.vhd"
    path.write_bytes(data)
    loop = loop_factory(4 << 20)
    result = flash(str(path), loop.path)
    assert result.returncode == 0, result.stderr
    assert loop.read(len(data)) == data
