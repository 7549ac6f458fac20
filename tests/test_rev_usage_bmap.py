"""A --bmap that never ends (a device node, a runaway generator) is refused in one line, before
it takes the machine's memory."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, needs_root, popsicle_cmd

from popsicle_py.bmap import load


def test_a_bmap_without_end_is_refused_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "os.img"
    image.write_bytes(b"\x00" * (1 << 20))
    # Address space capped at 1 GiB: reading /dev/zero whole ended in MemoryError ("unexpected
    # error", exit 1), and without a cap in the machine's memory running out.
    proc = subprocess.run(["sh", "-c", 'ulimit -v 1000000; exec "$@"', "sh", *popsicle_cmd(),
                           "flash", str(image), "/dev/null", "--yes", "--bmap", "/dev/zero"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("popsicle-py: /dev/zero is larger than 64 MiB: not a block map\n")


def _bmap(image: Path, blocks: int, version: str = "2.0") -> Path:
    """A bmap ``version`` (4 KiB blocks) mapping the image's first ``blocks`` blocks."""
    data = image.read_bytes()
    size, mapped = len(data), data[: blocks * 4096]
    text = (f'<?xml version="1.0" ?>\n<bmap version="{version}">\n'
            f"<ImageSize> {size} </ImageSize>\n"
            f"<BlockSize> 4096 </BlockSize>\n<BlocksCount> {-(-size // 4096)} </BlocksCount>\n"
            f"<MappedBlocksCount> {blocks} </MappedBlocksCount>\n"
            "<ChecksumType> sha256 </ChecksumType>\n<BlockMap>\n"
            f'<Range chksum="{hashlib.sha256(mapped).hexdigest()}"> 0-{blocks - 1} </Range>\n'
            "</BlockMap>\n</bmap>\n")
    path = image.with_suffix(f".{blocks}.bmap")
    path.write_text(text)
    return path


@needs_root
def test_a_map_whose_holes_end_the_image_gives_no_device_sha256(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """The drive was read back only up to the map's last range: the SHA-256 of that prefix is
    not the image's range's, which device_sha256 is said to be (it is null for a map's holes)."""
    image = tmp_path / "os.img"
    data = os.urandom(8 << 20) + bytes(8 << 20)  # data, then zeros bmaptool leaves unmapped
    image.write_bytes(data)
    drive = loop_factory(32 << 20, fill=0x5A)
    for blocks, expected in ((2048, None), (4096, hashlib.sha256(data).hexdigest())):
        proc = subprocess.run([*popsicle_cmd(), "flash", str(image), drive.path, "--yes",
                               "--no-probe", "--json", "--bmap", str(_bmap(image, blocks))],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        result = [json.loads(line) for line in proc.stdout.splitlines()][-1]["results"][0]
        assert result["status"] == "ok" and result["verified"]
        assert result["device_sha256"] == expected, blocks


@needs_root
def test_a_map_without_checksums_says_it_is_not_checked(loop_factory: Callable[..., Loop],
                                                         tmp_path: Path) -> None:
    """Another image's map of the same size leaves this one's data in its holes unwritten:
    with no checksum nothing can see it, and the notes say so rather than nothing."""
    image = tmp_path / "os.img"
    image.write_bytes(os.urandom(16 << 20))
    mapped = _bmap(image, 2048)
    mapped.write_text(re.sub(r' chksum="[0-9a-f]+"', "", mapped.read_text()))
    drive = loop_factory(32 << 20, fill=0x5A)
    proc = subprocess.run([*popsicle_cmd(), "flash", str(image), drive.path, "--yes",
                           "--no-probe", "--bmap", str(mapped)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (f"block map {mapped}: its ranges carry no checksum: nothing checks that it is "
            "this image's own" in proc.stdout + proc.stderr)


@needs_root
def test_a_format_1_4_map_has_its_checksums_checked(loop_factory: Callable[..., Loop],
                                                     tmp_path: Path) -> None:
    """bmap-tools 3.0 wrote the 2.0 format (ChecksumType, chksum) as version 1.4: its ranges'
    SHA-256 were taken for absent sha1s, so another image's map went unnoticed."""
    other = tmp_path / "other.img"
    other.write_bytes(os.urandom(16 << 20))
    mapped = _bmap(other, 2048, version="1.4")
    image = tmp_path / "os.img"
    image.write_bytes(os.urandom(16 << 20))
    drive = loop_factory(32 << 20, fill=0x5A)
    proc = subprocess.run([*popsicle_cmd(), "flash", str(image), drive.path, "--yes",
                           "--no-probe", "--bmap", str(mapped)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the image does not match its block map: bytes 0-8388607 fail their sha256 " \
           "checksum" in proc.stdout + proc.stderr
    assert drive.head_is_safe(image.read_bytes(), 0x5A)


def test_a_map_with_crlf_line_ends_is_read_as_bmaptool_reads_it(tmp_path: Path) -> None:
    """The map's own checksum is of its bytes: read as text, its CRLFs became LFs and a map
    bmaptool copies with was refused as corrupt."""
    image = tmp_path / "os.img"
    image.write_bytes(os.urandom(1 << 20))
    text = _bmap(image, 128).read_text().replace("</ChecksumType>\n",
                                                 "</ChecksumType>\n<BmapFileChecksum> "
                                                 f"{'0' * 64} </BmapFileChecksum>\n")
    text = text.replace("\n", "\r\n")
    text = text.replace("0" * 64, hashlib.sha256(text.encode()).hexdigest(), 1)
    mapped = tmp_path / "crlf.bmap"
    mapped.write_bytes(text.encode())
    loaded = load(str(mapped), 1 << 20)
    assert loaded.mapped == 128 * 4096 and loaded.unchecked is None


def _ranges_bmap(image: Path, ranges: list[tuple[int, int]]) -> Path:
    """A bmap 2.0 of ``image`` (4 KiB blocks) mapping these (first, last) block ranges."""
    data = image.read_bytes()
    lines = "".join(
        f'<Range chksum="{hashlib.sha256(data[a * 4096 : (b + 1) * 4096]).hexdigest()}"> '
        f"{a}-{b} </Range>\n" for a, b in ranges)
    path = image.with_suffix(".ranges.bmap")
    path.write_text(f'<?xml version="1.0" ?>\n<bmap version="2.0">\n'
                    f"<ImageSize> {len(data)} </ImageSize>\n<BlockSize> 4096 </BlockSize>\n"
                    f"<BlocksCount> {-(-len(data) // 4096)} </BlocksCount>\n"
                    "<ChecksumType> sha256 </ChecksumType>\n"
                    f"<BlockMap>\n{lines}</BlockMap>\n</bmap>\n")
    return path


@needs_root
@pytest.mark.parametrize("ranges", [[(0, 9), (300, 2047)], [(0, 9), (100, 120)]],
                         ids=["next-range-past-the-head", "last-range-in-the-head"])
def test_a_map_s_holes_in_the_head_get_the_image_s_zeros(
        loop_factory: Callable[..., Loop], tmp_path: Path,
        ranges: list[tuple[int, int]]) -> None:
    """The head (its first MiB, here: no partition table) is written whole, the map's holes
    as the image's zeros: a drive's old signatures there (an ISO 9660 descriptor, a btrfs
    superblock, UDF anchors) must not outlive the flash.  Holes between the head's last
    range and its end were left as the drive had them."""
    image = tmp_path / "os.img"
    data = bytearray(16 << 20)
    for a, b in ranges:
        data[a * 4096 : (b + 1) * 4096] = os.urandom((b - a + 1) * 4096)
    image.write_bytes(data)
    drive = loop_factory(32 << 20, fill=0x5A)
    proc = subprocess.run([*popsicle_cmd(), "flash", str(image), drive.path, "--yes",
                           "--no-probe", "--bmap", str(_ranges_bmap(image, ranges))],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = drive.read(16 << 20)
    assert got[: 1 << 20] == data[: 1 << 20]  # the whole head: ranges and zeros
    for a, b in ranges:
        assert got[a * 4096 : (b + 1) * 4096] == data[a * 4096 : (b + 1) * 4096]
    assert set(got[(1 << 20) : 300 * 4096]) == {0x5A}  # holes past the head: left alone


@needs_root
def test_a_map_s_holes_are_said_not_written(loop_factory: Callable[..., Loop],
                                            tmp_path: Path) -> None:
    """A result said "8 MiB written and verified" of a 16 MiB image and nothing of the rest:
    its holes past the head are bytes_unused, and the line says they were not written."""
    image = tmp_path / "os.img"
    image.write_bytes(os.urandom(8 << 20) + bytes(8 << 20))
    mapped = _bmap(image, 2048)
    drive = loop_factory(32 << 20, fill=0x5A)
    args = [*popsicle_cmd(), "flash", str(image), drive.path, "--yes", "--no-probe",
            "--bmap", str(mapped)]
    proc = subprocess.run([*args, "--json"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = [json.loads(line) for line in proc.stdout.splitlines()][-1]["results"][0]
    assert (result["bytes_written"], result["bytes_unused"]) == (8 << 20, 8 << 20)
    proc = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "8 MiB written and verified, 8 MiB of free space not written" in proc.stdout
