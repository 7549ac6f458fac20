"""A checksum file that names the image is never skipped because one of its lines is odd.

A SHA256SUMS saved by Notepad starts with a byte order mark, one written by Windows
PowerShell's ``>`` is UTF-16, and a digest can hold a stray character: each made the line for
the image unreadable, the list "did not list it", and the image was written unchecked ("ok"),
or its own IMAGE.sha256 was refused as holding no checksum.  Real loop devices and a local web
server, through the command.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, needs_root, popsicle_cmd
from webserver import Served, serving

pytestmark = needs_root

NAME = "disk.img.xz"
PATTERN = 0xA5
DRIVE = 4 << 20


def image() -> bytes:
    data = bytearray(os.urandom(1 << 20))
    data[510:512] = b"\x55\xaa"
    return lzma.compress(bytes(data), preset=0)


def flash(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), "flash", *args, "--yes"], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


def wrong(digest: str) -> str:
    return ("0" if digest[0] != "0" else "1") + digest[1:]


def stray(digest: str) -> str:
    return digest[:10] + "g" + digest[11:]


#: (what is in SHA256SUMS, given the image's digest; what the run ends with)
LISTS: dict[str, tuple[Callable[[str], bytes], str]] = {
    "BOM, wrong digest": (lambda d: f"\ufeff{wrong(d)}  {NAME}\n".encode(),
                          "checksum mismatch for"),
    "stray character": (lambda d: f"{stray(d)}  {NAME}\n".encode(),
                        f"lists {NAME} without a usable sha256 checksum"),
    "tagged, stray character": (lambda d: f"SHA256 ({NAME}) = {stray(d)}\n".encode(),
                                f"lists {NAME} without a usable sha256 checksum"),
    "UTF-16, wrong digest": (lambda d: f"{wrong(d)}  {NAME}\r\n".encode("utf-16"),
                             "checksum mismatch for"),
}


@pytest.mark.parametrize("case", list(LISTS))
def test_a_list_naming_the_image_is_never_skipped(
        case: str, tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    data = image()
    (tmp_path / NAME).write_bytes(data)
    make, said = LISTS[case]
    (tmp_path / "SHA256SUMS").write_bytes(make(hashlib.sha256(data).hexdigest()))
    drive = loop_factory(DRIVE, fill=PATTERN)
    result = flash(str(tmp_path / NAME), drive.path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert said in result.stderr
    assert drive.read() == bytes([PATTERN]) * DRIVE


def test_a_list_from_the_web_with_a_byte_order_mark_is_checked(
        loop_factory: Callable[..., Loop]) -> None:
    data = image()
    digest = hashlib.sha256(data).hexdigest()
    with serving() as server:
        server.add(f"/pub/{NAME}", Served(data))
        server.add("/pub/SHA256SUMS", Served(f"\ufeff{wrong(digest)}  {NAME}\n".encode(),
                                             content_type="text/plain"))
        drive = loop_factory(DRIVE, fill=PATTERN)
        result = flash(server.url(f"/pub/{NAME}"), drive.path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "checksum" in result.stdout + result.stderr
    assert drive.read(64 << 10) != data[:64 << 10]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_a_windows_made_sidecar_is_used(encoding: str, tmp_path: Path,
                                        loop_factory: Callable[..., Loop]) -> None:
    data = image()
    (tmp_path / NAME).write_bytes(data)
    line = f"{hashlib.sha256(data).hexdigest()}  {NAME}\r\n"
    (tmp_path / f"{NAME}.sha256").write_bytes(line.encode(encoding))
    result = flash(str(tmp_path / NAME), loop_factory(DRIVE).path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"checksum ok (sha256 from {tmp_path / NAME}.sha256)" in result.stdout


def test_a_comment_naming_the_image_is_no_entry(tmp_path: Path,
                                                loop_factory: Callable[..., Loop]) -> None:
    """Fedora's lists say ``# NAME: N bytes``: a list that names the image only there does
    not list it, and is not refused."""
    data = image()
    (tmp_path / NAME).write_bytes(data)
    (tmp_path / "SHA256SUMS").write_text(f"# {NAME}: {len(data)} bytes\n"
                                         f"{hashlib.sha256(b'x').hexdigest()}  other.img\n")
    result = flash(str(tmp_path / NAME), loop_factory(DRIVE).path)
    assert result.returncode == 0, result.stdout + result.stderr
