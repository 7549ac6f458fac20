"""Flashing only what the image's file systems use, onto loop devices prefilled with a pattern.

The pattern left in the skipped ranges proves they were skipped; e2fsck -fn, fsck.vfat -n and
the files read back through debugfs and mtools prove the drive holds the file systems whole.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, needs_root, popsicle_cmd

from popsicle_py.engine.head import head_length
from tests.fs_images import (
    MiB,
    e2fsck,
    ext_files,
    fat_files,
    fsck_vfat,
    needs_fs_tools,
    rpi_image,
    tree,
    usage_of,
)

pytestmark = [needs_root, needs_fs_tools]

PATTERN = 0x5A
ROOT = 104 * MiB


def flash(*args: str) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run([*popsicle_cmd(), "flash", *args, "--yes", "--json", "--no-probe",
                           "--bucket-size", "4M"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    return proc.returncode, [json.loads(x) for x in proc.stdout.splitlines()], proc.stderr


def result(evs: list[dict[str, Any]], device: str) -> dict[str, Any]:
    return next(r for r in evs[-1]["results"] if r["device"] == device)


def only(chunk: bytes, fill: int) -> bool:
    """Every byte of ``chunk`` is ``fill`` (true of none): ``set(chunk) <= {fill}`` without
    making a set of 100 MiB byte by byte (1.7 s)."""
    return chunk.count(fill) == len(chunk)


def sectors(loop: Loop) -> tuple[int, int]:
    """(read, written) sectors of the device, as the kernel counts them."""
    major, minor = loop.major_minor
    fields = Path(f"/sys/dev/block/{major}:{minor}/stat").read_text().split()
    return int(fields[2]), int(fields[6])


@pytest.fixture
def rpi(tmp_path: Path) -> Iterator[tuple[Path, int, int, dict[str, str]]]:
    keep, gone = tmp_path / "keep", tmp_path / "gone"
    sums = tree(keep)
    tree(gone, files=8, size=6 << 20, seed=3)
    shutil.rmtree(gone / "sub")
    image, fat_at, ext_at = rpi_image(tmp_path, keep, gone, root=ROOT)
    yield image, fat_at, ext_at, sums


def check_drive(loop: Loop, fat_at: int, ext_at: int, sums: dict[str, str]) -> None:
    """The file systems on the drive are whole: fsck clean and the same files."""
    assert fsck_vfat(loop.backing, fat_at, 48 * MiB).returncode == 0
    assert fat_files(loop.backing, fat_at, list(sums)) == sums
    fsck = e2fsck(loop.backing, ext_at, ROOT)
    assert fsck.returncode == 0, fsck.stdout
    assert ext_files(loop.backing, ext_at, ROOT, list(sums)) == sums


def test_only_the_used_ranges_are_written_and_verified(
        loop_factory: Callable[..., Loop], rpi: tuple[Path, int, int, dict[str, str]],
        tmp_path: Path) -> None:
    image, fat_at, ext_at, sums = rpi
    usage = usage_of(image)
    assert usage.skipped > 100 * MiB
    size = image.stat().st_size
    drives = [loop_factory(size + 8 * MiB, fill=PATTERN) for _ in range(2)]
    before = {d.path: sectors(d) for d in drives}
    report = tmp_path / "report.csv"
    rc, evs, err = flash(str(image), *(d.path for d in drives), "--report", str(report))
    assert rc == 0, err
    data = image.read_bytes()
    rows = {row["device"]: row for row in csv.DictReader(report.open())}
    for drive in drives:
        r = result(evs, drive.path)
        assert r["status"] == "ok" and r["verified"]
        assert (r["bytes_written"], r["bytes_unused"], r["bytes_skipped"]) == (
            usage.used, usage.skipped, 0)
        assert int(rows[drive.path]["bytes_skipped"]) == usage.skipped
        got = drive.read(size)
        position = 0
        for offset, length in usage.ranges:
            assert got[offset : offset + length] == data[offset : offset + length]
            assert only(got[position:offset], PATTERN), position  # skipped: the old bytes
            position = offset + length
        assert only(got[position:], PATTERN), position
        check_drive(drive, fat_at, ext_at, sums)
        read, written = (now - then for now, then in zip(sectors(drive), before[drive.path],
                                                          strict=True))
        # The used bytes and the random stamp first held where the head goes; read back once.
        head = head_length(data[: 64 << 10])
        assert written * 512 == usage.used + head
        assert usage.used <= read * 512 <= usage.used + 2 * head
    progress = [e for e in evs if e["event"] == "progress" and e["phase"] == "writing"]
    assert progress and all(e["total"] == usage.used for e in progress)


def test_no_trim_writes_every_byte_and_a_block_map_wins(
        loop_factory: Callable[..., Loop], rpi: tuple[Path, int, int, dict[str, str]],
        tmp_path: Path) -> None:
    image, _, _, _ = rpi
    size = image.stat().st_size
    data = image.read_bytes()
    drive = loop_factory(size, fill=PATTERN)
    rc, evs, err = flash(str(image), drive.path, "--no-trim")
    assert rc == 0, err
    r = result(evs, drive.path)
    assert (r["bytes_written"], r["bytes_unused"]) == (size, 0)
    assert drive.read(size) == data
    if shutil.which("bmaptool") is None:
        pytest.skip("bmaptool is not installed")
    bmap = tmp_path / "rpi.bmap"
    subprocess.run(["bmaptool", "create", "-o", str(bmap), str(image)], check=True,
                   capture_output=True)
    other = loop_factory(size, fill=PATTERN)
    rc, evs, err = flash(str(image), other.path, "--bmap", str(bmap))
    assert rc == 0, err
    r = result(evs, other.path)
    assert (r["bytes_written"], r["bytes_unused"]) == (size, 0)  # no holes: every byte
    assert other.read(size) == data


def test_a_corrupt_bitmap_writes_that_partition_whole(
        loop_factory: Callable[..., Loop], rpi: tuple[Path, int, int, dict[str, str]]) -> None:
    image, fat_at, ext_at, _ = rpi
    out = subprocess.run(["dumpe2fs", f"{image}?offset={ext_at}"], capture_output=True,
                         text=True)
    if out.returncode:  # older e2fsprogs: no ?offset=
        part = image.with_suffix(".part")
        with open(image, "rb") as f:
            f.seek(ext_at)
            part.write_bytes(f.read(ROOT))
        out = subprocess.run(["dumpe2fs", str(part)], capture_output=True, text=True)
        part.unlink()
    bitmap = int(re.search(r"Block bitmap at (\d+)", out.stdout).group(1))  # type: ignore[union-attr]
    with open(image, "r+b") as f:
        f.seek(ext_at + bitmap * 4096 + 2000)  # free blocks of group 0 marked in use
        f.write(b"\xff")
    usage = usage_of(image)
    assert usage.notes and "block bitmap" in usage.notes[0]
    size = image.stat().st_size
    drive = loop_factory(size, fill=PATTERN)
    proc = subprocess.run([*popsicle_cmd(), "flash", str(image), drive.path, "--yes",
                           "--no-probe"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "partition 2: group 0's block bitmap" in proc.stdout + proc.stderr
    data = image.read_bytes()
    got = drive.read(size)
    assert got[ext_at : ext_at + ROOT] == data[ext_at : ext_at + ROOT]  # the root, whole
    assert set(got[fat_at + 40 * MiB : fat_at + 48 * MiB]) == {PATTERN}  # boot: trimmed


def test_a_certificate_reads_every_byte_back_so_nothing_is_skipped(
        loop_factory: Callable[..., Loop], rpi: tuple[Path, int, int, dict[str, str]],
        tmp_path: Path) -> None:
    image, _, _, _ = rpi
    size = image.stat().st_size
    drive = loop_factory(size, fill=PATTERN)
    rc, evs, err = flash(str(image), drive.path, "--certificate", str(tmp_path / "certs"))
    assert rc == 0, err
    r = result(evs, drive.path)
    assert (r["bytes_written"], r["bytes_unused"]) == (size, 0)
    assert drive.read(size) == image.read_bytes()
    assert r["device_sha256"] is not None
