"""A compressed file without an integrity check of its own is named as such.

An xz made with ``--check=none``, a zstd file without its content checksum (``zstd
--no-check``, python-zstandard's default) and an ``.lzma`` file decode a damaged stored chunk
without an error: the damaged image is written, and every drive reads back right ("ok").  No
tool can see it (``xz -t`` and ``zstd -t`` pass), so the run says so, unless a checksum is
checked instead.  Real loop devices, through the command.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from conftest import Loop, needs_root, popsicle_cmd

pytestmark = needs_root

SIZE = 1 << 20
NOTE = "damage to it may decode without an error"


def image() -> bytes:
    """A disk image of incompressible data: its chunks are stored, and a flipped byte in one
    decodes without an error where no check covers it."""
    data = bytearray(os.urandom(SIZE))
    data[510:512] = b"\x55\xaa"
    return bytes(data)


def flipped(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x40
    return bytes(damaged)


def flash(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*popsicle_cmd(), "flash", *args, "--yes"], capture_output=True,
                          input=stdin if stdin is not None else b"", timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode())


CASES: dict[str, Callable[[bytes], bytes]] = {
    "img.xz": lambda data: lzma.compress(data, check=lzma.CHECK_NONE, preset=0),
    "img.zst": lambda data: zstandard.ZstdCompressor(write_checksum=False).compress(data),
}


@pytest.mark.parametrize("suffix", list(CASES))
def test_damage_no_check_sees_is_written_with_a_note_saying_so(
        suffix: str, tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    data = image()
    path = tmp_path / f"disk.{suffix}"
    path.write_bytes(flipped(CASES[suffix](data)))
    loop = loop_factory(4 << 20)
    result = flash(str(path), loop.path)
    out = result.stdout + result.stderr
    # What no check can see: the run ends ok with another image on the drive ...
    assert result.returncode == 0, out
    assert loop.read(SIZE) != data
    # ... and it says that the file could not show its damage, and what would.
    assert f"{path} is a" in out and NOTE in out, out
    assert "--sha256, or a SHA256SUMS beside it" in out


def test_an_lzma_file_is_named_as_unchecked(tmp_path: Path,
                                            loop_factory: Callable[..., Loop]) -> None:
    path = tmp_path / "disk.img.lzma"
    path.write_bytes(lzma.compress(image(), format=lzma.FORMAT_ALONE, preset=0))
    result = flash(str(path), loop_factory(4 << 20).path)
    assert result.returncode == 0, result.stderr
    assert "LZMA-alone (.lzma) file, which has no integrity check" in result.stdout + result.stderr


def test_standard_input_is_told_of_sha256_only(loop_factory: Callable[..., Loop]) -> None:
    compressed = CASES["img.xz"](image())
    result = flash("-", loop_factory(4 << 20).path, stdin=compressed)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "standard input is an xz file without an integrity check" in out, out
    assert "SHA256SUMS" not in out


@pytest.mark.parametrize("how", ["--sha256", "sidecar", "checked"])
def test_no_note_when_something_checks_it(how: str, tmp_path: Path,
                                          loop_factory: Callable[..., Loop]) -> None:
    data = image()
    compressed = (lzma.compress(data, preset=0) if how == "checked"  # xz's CRC-64
                  else CASES["img.xz"](data))
    path = tmp_path / "disk.img.xz"
    path.write_bytes(compressed)
    digest = hashlib.sha256(compressed).hexdigest()
    args = [str(path), loop_factory(4 << 20).path]
    if how == "--sha256":
        args += ["--sha256", digest]
    elif how == "sidecar":
        (tmp_path / "SHA256SUMS").write_text(f"{digest}  disk.img.xz\n")
    result = flash(*args)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert NOTE not in out, out


def test_a_checked_layer_inside_covers_the_outer_one(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """A gzip inside an xz without a check: gzip's CRC sees damage to the xz's bytes too."""
    data = image()
    path = tmp_path / "disk.img.gz.xz"
    path.write_bytes(CASES["img.xz"](gzip.compress(data, 1)))
    loop = loop_factory(4 << 20)
    result = flash(str(path), loop.path)
    assert result.returncode == 0, result.stderr
    assert NOTE not in result.stdout + result.stderr
    assert loop.read(len(data)) == data
