"""Duplicator mode skips the free space of the image's file systems, as flash does.

The sticks are umockdev's (files that start empty): a range that was skipped reads back as
zeros there, while the image's free space holds garbage, so the bytes tell what was written.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
from test_watch import WATCHING, Stick, needs_testbed, result_of, watch

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

pytestmark = [needs_testbed, pytest.mark.umockdev, needs_fs_tools]

ROOT = 40 * MiB
STICK = Stick("c", 3, 256 * MiB)


def _image(tmp_path: Path) -> tuple[Path, int, int, dict[str, str]]:
    keep, gone = tmp_path / "keep", tmp_path / "gone"
    sums = tree(keep)
    tree(gone, files=4, size=4 << 20, seed=3)
    shutil.rmtree(gone / "sub")
    image, fat_at, ext_at = rpi_image(tmp_path, keep, gone, root=ROOT)
    return image, fat_at, ext_at, sums


@pytest.mark.parametrize("packed", [False, True], ids=["raw", "gzip"])
def test_watch_writes_only_what_the_file_systems_use(tmp_path: Path, packed: bool) -> None:
    image, fat_at, ext_at, sums = _image(tmp_path)
    usage = usage_of(image)
    assert usage.skipped > 20 * MiB
    data = image.read_bytes()
    given = image
    if packed:
        given = tmp_path / "rpi.img.gz"
        given.write_bytes(gzip.compress(data, compresslevel=1))
    run = watch(tmp_path, [str(given), "--yes", "--count", "1"],
                [WATCHING, {"add": STICK.description}, result_of(STICK)], read=(STICK.dev,),
                timeout=90)
    assert run.rc == 0, run.stderr
    result = run.results()[STICK.dev]
    assert result["status"] == "ok" and result["verified"]
    assert (result["bytes_written"], result["bytes_unused"]) == (usage.used, usage.skipped)
    notes = [e["text"] for e in run.of("note")]
    assert any("of free space in its file systems skipped" in n for n in notes), notes
    got = (run.files[STICK.dev] or b"").ljust(len(data), b"\0")
    position = 0
    for offset, length in usage.ranges:
        assert got[offset : offset + length] == data[offset : offset + length]
        # (count, not any(): any() looks at over 20 MiB of zeros one byte at a time)
        assert got.count(0, position, offset) == offset - position, \
            f"a skipped range was written: {position}-{offset}"
        position = offset + length
    drive = tmp_path / "drive.img"
    drive.write_bytes(got)
    assert fsck_vfat(drive, fat_at, 48 * MiB).returncode == 0
    assert fat_files(drive, fat_at, list(sums)) == sums
    fsck = e2fsck(drive, ext_at, ROOT)
    assert fsck.returncode == 0, fsck.stdout
    assert ext_files(drive, ext_at, ROOT, list(sums)) == sums


def test_watch_no_trim_writes_every_byte(tmp_path: Path) -> None:
    image, _, _, _ = _image(tmp_path)
    data = image.read_bytes()
    run = watch(tmp_path, [str(image), "--yes", "--count", "1", "--no-trim"],
                [WATCHING, {"add": STICK.description}, result_of(STICK)], read=(STICK.dev,),
                timeout=90)
    assert run.rc == 0, run.stderr
    result = run.results()[STICK.dev]
    assert (result["bytes_written"], result["bytes_unused"]) == (len(data), 0)
    assert (run.files[STICK.dev] or b"")[: len(data)] == data
