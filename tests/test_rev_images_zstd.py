"""A zstd file made with ``--long=31`` is a sound image, and is written.

Streamed (its size unknown to zstd), ``zstd --long=31`` writes a frame whose window is 2 GiB;
zstandard's decoder stops at 128 MiB by default, and every drive failed with "corrupt or
truncated ... Frame requires too much memory for decoding".  Real loop devices, through the
command, from a file and from standard input.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from conftest import Loop, needs_root, popsicle_cmd

pytestmark = needs_root


def image() -> bytes:
    data = bytearray(os.urandom(1 << 20))
    data[510:512] = b"\x55\xaa"
    return bytes(data)


def long31(data: bytes) -> bytes:
    """``data`` as ``cat disk.img | zstd --long=31`` writes it: a 2 GiB window."""
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=31, enable_ldm=True, write_checksum=True)
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(
            out, closefd=False) as writer:
        writer.write(data)
    compressed = out.getvalue()
    with pytest.raises(zstandard.ZstdError, match="too much memory"):  # what it takes
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed)).read()
    return compressed


@pytest.mark.parametrize("way", ["file", "stdin"])
def test_a_long_window_zstd_is_written(way: str, tmp_path: Path,
                                       loop_factory: Callable[..., Loop]) -> None:
    data = image()
    compressed = long31(data)
    path = tmp_path / "disk.img.zst"
    path.write_bytes(compressed)
    loop = loop_factory(4 << 20)
    cmd = [*popsicle_cmd(), "flash", str(path) if way == "file" else "-", loop.path, "--yes"]
    result = subprocess.run(cmd, capture_output=True, input=compressed if way == "stdin"
                            else b"", timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert loop.read(len(data)) == data
