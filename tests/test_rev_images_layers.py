"""Layers inside layers: a refusal says why, and names the format as it is said.

Four layers one inside the other are decoded; a fifth is refused before anything is written,
saying that it is one too many, not that its format "cannot be decoded inside another
layer" (an xz can, as the four before it show).  Real loop devices, through the command.
"""

from __future__ import annotations

import gzip
import lzma
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import Loop, needs_root, popsicle_cmd

pytestmark = needs_root


def image() -> bytes:
    data = bytearray(os.urandom(1 << 20))
    data[510:512] = b"\x55\xaa"
    return bytes(data)


def flash(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), "flash", *args, "--yes"], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


def wrapped(data: bytes, layers: int) -> bytes:
    """``data`` in ``layers`` layers: xz innermost, then gzip and xz in turn."""
    for i in range(layers):
        data = lzma.compress(data, preset=0) if i % 2 == 0 else gzip.compress(data, 1)
    return data


def test_four_layers_are_written(tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    data = image()
    path = tmp_path / "disk.img.xz.gz.xz.gz"
    path.write_bytes(wrapped(data, 4))
    loop = loop_factory(4 << 20)
    result = flash(str(path), loop.path)
    assert result.returncode == 0, result.stderr
    assert loop.read(len(data)) == data


def test_a_fifth_layer_is_refused_as_one_too_many(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    path = tmp_path / "disk.img.xz.gz.xz.gz.xz"
    path.write_bytes(wrapped(image(), 5))
    loop = loop_factory(4 << 20, fill=0xA5)
    result = flash(str(path), loop.path)
    refusal = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(refusal) == 1, refusal
    # "an xz file": it read "a xz file".
    assert "(inside its gzip layer) is an xz file, one layer more than the 4" in refusal[0]
    assert "decompress the outer layers first" in refusal[0]
    assert "cannot be decoded inside another layer" not in refusal[0]
    assert loop.read(4 << 20) == b"\xa5" * (4 << 20)

