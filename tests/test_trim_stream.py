"""Trim of a compressed image: free space decided as the image is decoded, read once.

The selector (popsicle_py.usage.stream) is shown images built with the real tools, in
pieces as the reader shows them; what it keeps must pass e2fsck -fn / fsck.vfat -n and hold
the same files once copied over other garbage (a drive's old content), and equal what
image_usage finds reading by position whenever the metadata comes before the data.  Then the
CLI on loop devices prefilled with a pattern: the pattern left in skipped ranges proves they
were skipped.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop

from popsicle_py.usage.ranges import Range
from popsicle_py.usage.stream import HEAD, StreamSelector
from tests.fs_images import (
    MiB,
    e2fsck,
    ext_files,
    fat_files,
    fsck_vfat,
    garbage,
    make_ext,
    make_fat,
    needs_fs_tools,
    partition,
    rpi_image,
    run,
    tree,
    trimmed_copy,
    usage_of,
)
from tests.test_trim import flash, only, result

pytestmark = needs_fs_tools

PATTERN = 0x5A
ROOT = 104 * MiB


def stream(data: bytes, bucket: int = 4 * MiB, cap: int | None = None
           ) -> tuple[list[Range], StreamSelector]:
    """The runs kept, as the engine's reader asks: decide, read that many bytes, show them."""
    select = StreamSelector(len(data)) if cap is None else StreamSelector(len(data), cap)
    kept: list[Range] = []
    offset = 0
    while offset < len(data):
        keep, length = select.decide(offset, bucket)
        assert length > 0
        assert (offset + length) % 4096 == 0 or offset + length == len(data)
        select.saw(offset, memoryview(data)[offset : offset + length])
        if keep:
            if kept and sum(kept[-1]) == offset:
                kept[-1] = (kept[-1][0], kept[-1][1] + length)
            else:
                kept.append((offset, length))
        offset += length
    assert select.skipped == len(data) - sum(n for _, n in kept)
    return kept, select


def covers(kept: list[Range], offset: int, length: int) -> bool:
    return any(a <= offset and offset + length <= a + n for a, n in kept)


@pytest.fixture
def content(tmp_path: Path) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    keep, gone = tmp_path / "keep", tmp_path / "gone"
    sums = tree(keep)
    tree(gone, files=6, size=3 << 20, seed=3)
    shutil.rmtree(gone / "sub")
    yield keep, gone, sums


EXT_CASES = {
    "ext4 4k flex_bg metadata_csum": ["-b", "4096"],
    "ext4 1k flex_bg metadata_csum": ["-b", "1024"],
    "ext4 4k no flex_bg": ["-b", "4096", "-O", "^flex_bg"],
    "ext4 1k no flex_bg uninit_bg": ["-b", "1024", "-O", "^flex_bg,^metadata_csum,uninit_bg"],
    "ext4 4k no metadata_csum": ["-b", "4096", "-O", "^metadata_csum"],
}


@pytest.mark.parametrize("case", sorted(EXT_CASES))
def test_the_stream_keeps_what_ext_uses(case: str, tmp_path: Path,
                                        content: tuple[Path, Path, dict[str, str]]) -> None:
    keep, gone, sums = content
    image = tmp_path / "disk.img"
    at, length = 2 * MiB, 72 * MiB
    garbage(image, at + length + MiB)
    partition(image, f"{at // 512},{length // 512},83\n")
    make_ext(image, at, length, keep, options=EXT_CASES[case], deleted=gone)
    data = image.read_bytes()
    usage = usage_of(image)
    kept, select = stream(data)
    assert select.notes == [] and select.found == list(usage.found)
    assert select.skipped > 0
    for offset, n in usage.ranges:  # every range reading by position writes, the stream too
        used_inside = [r for r in kept if r[0] < offset + n and offset < sum(r)]
        assert used_inside, (offset, n)
    if "no flex_bg" not in case:  # bitmaps ahead of all data: the same decisions
        assert tuple(kept) == usage.ranges
    else:  # decided group by group: what a group boundary splits is not merged
        assert select.skipped >= usage.skipped - 16 * MiB
    copy = tmp_path / "copy.img"
    trimmed_copy(image, kept, copy)
    assert e2fsck(copy, at, length).returncode == 0
    assert ext_files(copy, at, length, list(sums)) == sums


@pytest.mark.parametrize("bits", ["12", "16", "32"])
def test_the_stream_keeps_what_fat_uses(bits: str, tmp_path: Path,
                                        content: tuple[Path, Path, dict[str, str]]) -> None:
    keep, _, sums = content
    image = tmp_path / "disk.img"
    at, length = MiB, (8 if bits == "12" else 48) * MiB
    garbage(image, at + length)
    partition(image, f"{at // 512},{length // 512},c\n")
    make_fat(image, at, length, keep, ["-F", bits])
    data = image.read_bytes()
    usage = usage_of(image)
    kept, select = stream(data, bucket=MiB)
    assert tuple(kept) == usage.ranges and select.found == list(usage.found)
    copy = tmp_path / "copy.img"
    trimmed_copy(image, kept, copy)
    assert fsck_vfat(copy, at, length).returncode == 0
    assert fat_files(copy, at, list(sums)) == sums


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_a_pi_image_streamed_is_trimmed_as_read_by_position(
        label: str, tmp_path: Path, content: tuple[Path, Path, dict[str, str]]) -> None:
    keep, gone, _ = content
    image, _, _ = rpi_image(tmp_path, keep, gone, label=label)
    data = image.read_bytes()
    usage = usage_of(image)
    for bucket in (64 << 10, 4 * MiB, 16 * MiB):
        kept, select = stream(data, bucket)
        assert tuple(kept) == usage.ranges, bucket
        assert select.skipped == usage.skipped and select.found == list(usage.found)


def test_a_bitmap_after_the_data_it_governs_leaves_that_data_written(
        tmp_path: Path, content: tuple[Path, Path, dict[str, str]]) -> None:
    """Group 0's block bitmap moved into group 2 (flex_bg lets it lie anywhere): group 0's
    blocks pass before it, so all of them are written, free ones too; the rest is trimmed."""
    keep, _, sums = content
    image = tmp_path / "ext.img"
    garbage(image, 64 * MiB)
    make_ext(image, 0, 64 * MiB, keep, options=["-b", "1024"])
    found = run("debugfs", "-R", "ffb 1 20000", str(image)).stdout
    block = int(found.split()[-1])
    old = int(re.search(r"Block bitmap at (\d+)",  # type: ignore[union-attr]
                        run("dumpe2fs", str(image)).stdout).group(1))
    run("debugfs", "-w", "-f", "-", str(image),
        input=f"setb {block}\nset_bg 0 block_bitmap {block}\nfreeb {old}\n")
    run("e2fsck", "-fy", str(image), check=False)  # the groups' free counts
    assert run("e2fsck", "-fn", str(image), check=False).returncode == 0
    group0 = (1024, 8192 * 1024)
    assert block * 1024 > sum(group0)
    usage = usage_of(image)
    assert not covers(list(usage.ranges), *group0)  # read by position: group 0 is trimmed
    data = image.read_bytes()
    kept, select = stream(data)
    assert covers(kept, *group0)  # decoded in order: written whole
    assert select.skipped > 16 * MiB and not select.notes
    copy = tmp_path / "copy.img"
    trimmed_copy(image, kept, copy)
    assert e2fsck(copy, 0, 64 * MiB).returncode == 0
    assert ext_files(copy, 0, 64 * MiB, list(sums)) == sums


def test_logical_partitions_are_trimmed_once_their_boot_records_went_by(
        tmp_path: Path, content: tuple[Path, Path, dict[str, str]]) -> None:
    keep, gone, sums = content
    image = tmp_path / "disk.img"
    garbage(image, 100 * MiB)
    partition(image, f"{MiB // 512},{96 * MiB // 512},5\n"
                     f"{2 * MiB // 512},{32 * MiB // 512},83\n"
                     f"{36 * MiB // 512},{60 * MiB // 512},83\n")
    make_ext(image, 2 * MiB, 32 * MiB, keep, options=["-b", "4096"], deleted=gone)
    make_ext(image, 36 * MiB, 60 * MiB, keep, options=["-b", "4096"], deleted=gone)
    usage = usage_of(image)
    assert len(usage.found) == 2
    kept, select = stream(image.read_bytes())
    # The table is whole only at the last boot record, past partition 5's metadata.
    assert covers(kept, 0, 36 * MiB)
    assert select.notes == ["partition 5: its metadata was passed before what locates it "
                            "was read: written whole"]
    assert select.skipped > 20 * MiB and select.found == [usage.found[1]]
    copy = tmp_path / "copy.img"
    trimmed_copy(image, kept, copy)
    assert e2fsck(copy, 36 * MiB, 60 * MiB).returncode == 0
    assert ext_files(copy, 36 * MiB, 60 * MiB, list(sums)) == sums


def test_a_corrupt_bitmap_writes_its_partition_whole(
        tmp_path: Path, content: tuple[Path, Path, dict[str, str]]) -> None:
    keep, gone, _ = content
    image, fat_at, ext_at = rpi_image(tmp_path, keep, gone)
    corrupt_bitmap(image, ext_at)
    kept, select = stream(image.read_bytes())
    assert covers(kept, ext_at, ROOT)
    assert any("partition 2: group 0's block bitmap" in n and n.endswith("written whole")
               for n in select.notes), select.notes
    assert not covers(kept, fat_at + 40 * MiB, 8 * MiB)  # the boot partition: trimmed


def test_metadata_past_the_cap_is_written_whole(
        tmp_path: Path, content: tuple[Path, Path, dict[str, str]]) -> None:
    keep, gone, _ = content
    image, _, _ = rpi_image(tmp_path, keep, gone)
    data = image.read_bytes()
    kept, select = stream(data, cap=64 << 10)  # the FAT32's FAT is 384 KiB
    assert covers(kept, 4 * MiB, 48 * MiB)
    assert any(n.startswith("partition 1: its metadata is more than") for n in select.notes)
    assert select.skipped > 0  # the ext root's bitmap fits


def test_the_head_and_anything_not_understood_are_written(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    garbage(image, 24 * MiB)
    partition(image, f"{2 * MiB // 512},{20 * MiB // 512},83\n")
    kept, select = stream(image.read_bytes())
    assert kept == [(0, 24 * MiB)]
    assert select.notes == ["partition 1: no ext2/3/4 or FAT file system: written whole"]
    kept, select = stream(bytes(HEAD // 2))  # shorter than a head, no table
    assert kept == [(0, HEAD // 2)] and select.skipped == 0


# ------------------------------------------------------------------------------------------
# The CLI, on loop devices


def corrupt_bitmap(image: Path, ext_at: int) -> None:
    """Free blocks of group 0 marked in use: its bitmap disagrees with its descriptor."""
    part = image.with_suffix(".part")
    with open(image, "rb") as f:
        f.seek(ext_at)
        part.write_bytes(f.read(ROOT))
    out = run("dumpe2fs", str(part)).stdout
    part.unlink()
    bitmap = int(re.search(r"Block bitmap at (\d+)", out).group(1))  # type: ignore[union-attr]
    with open(image, "r+b") as f:
        f.seek(ext_at + bitmap * 4096 + 2000)
        f.write(b"\xff")


def compress(image: Path, kind: str) -> Path:
    """The image compressed.  Its free space is random (a used drive's), which xz takes
    a minute to compress at 160 MiB: the flashes below use gzip and zstd (the selector
    sees decoded buckets, whatever decodes them); xz's decoder is tested on small images."""
    if kind == "xz":
        out = image.with_name(image.name + ".xz")
        out.write_bytes(lzma.compress(image.read_bytes(), preset=0))
        return out
    if kind == "gz":
        run("gzip", "-1", "-k", "-f", str(image))
        return image.with_name(image.name + ".gz")
    if shutil.which("zstd") is None:
        pytest.skip("zstd is not installed")
    out = image.with_name(image.name + ".zst")
    run("zstd", "-q", "-1", "-f", str(image), "-o", str(out))
    return out


def notes(evs: list[dict[str, Any]]) -> list[str]:
    return [e["text"] for e in evs if e["event"] == "note"]


@pytest.fixture
def rpi(tmp_path: Path, content: tuple[Path, Path, dict[str, str]]
        ) -> tuple[Path, int, int, dict[str, str]]:
    keep, gone, sums = content
    image, fat_at, ext_at = rpi_image(tmp_path, keep, gone, root=ROOT)
    return image, fat_at, ext_at, sums


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_a_compressed_image_is_trimmed_as_it_is_decoded(
        kind: str, loop_factory: Callable[..., Loop],
        rpi: tuple[Path, int, int, dict[str, str]]) -> None:
    image, fat_at, ext_at, sums = rpi
    data = image.read_bytes()
    size = len(data)
    kept, _ = stream(data, 4 * MiB)
    unused = size - sum(n for _, n in kept)
    assert unused > 100 * MiB
    packed = compress(image, kind)
    drives = [loop_factory(size + 8 * MiB, fill=PATTERN) for _ in range(2)]
    rc, evs, err = flash(str(packed), *(d.path for d in drives))
    assert rc == 0, err
    said = notes(evs)
    assert any("free space not written: " in n for n in said), said
    for drive in drives:
        r = result(evs, drive.path)
        assert r["status"] == "ok" and r["verified"]
        assert (r["bytes_written"], r["bytes_unused"], r["bytes_skipped"]) == (
            size - unused, unused, 0)
        got = drive.read(size)
        position = 0
        for offset, length in kept:
            assert got[offset : offset + length] == data[offset : offset + length]
            assert only(got[position:offset], PATTERN), position  # skipped: the old bytes
            position = offset + length
        assert only(got[position:], PATTERN), position
        assert fsck_vfat(drive.backing, fat_at, 48 * MiB).returncode == 0
        assert fat_files(drive.backing, fat_at, list(sums)) == sums
        assert e2fsck(drive.backing, ext_at, ROOT).returncode == 0
        assert ext_files(drive.backing, ext_at, ROOT, list(sums)) == sums
        if kind != "gz":  # gzip does not say its decoded size: no total to reach
            progress = [e for e in evs
                        if e["event"] == "progress" and e["device"] == drive.path]
            assert progress[-1]["bytes"] == progress[-1]["total"] == size - unused


def test_a_corrupt_bitmap_in_a_compressed_image_writes_that_partition_whole(
        loop_factory: Callable[..., Loop], rpi: tuple[Path, int, int, dict[str, str]]) -> None:
    image, fat_at, ext_at, sums = rpi
    corrupt_bitmap(image, ext_at)
    packed = compress(image, "zst")
    size = image.stat().st_size
    drive = loop_factory(size, fill=PATTERN)
    rc, evs, err = flash(str(packed), drive.path)
    assert rc == 0, err
    assert any("partition 2: group 0's block bitmap" in n for n in notes(evs)), notes(evs)
    data = image.read_bytes()
    got = drive.read(size)
    assert got[ext_at : ext_at + ROOT] == data[ext_at : ext_at + ROOT]  # the root, whole
    assert set(got[fat_at + 40 * MiB : fat_at + 48 * MiB]) == {PATTERN}  # boot: trimmed
    assert fat_files(drive.backing, fat_at, list(sums)) == sums


def test_no_trim_writes_every_byte_of_a_compressed_image(
        loop_factory: Callable[..., Loop], rpi: tuple[Path, int, int, dict[str, str]]) -> None:
    image = rpi[0]
    packed = compress(image, "zst")
    size = image.stat().st_size
    drive = loop_factory(size, fill=PATTERN)
    rc, evs, err = flash(str(packed), drive.path, "--no-trim")
    assert rc == 0, err
    r = result(evs, drive.path)
    assert (r["bytes_written"], r["bytes_unused"]) == (size, 0)
    assert drive.read(size) == image.read_bytes()
    assert not any("free space" in n for n in notes(evs))


def test_a_compressed_image_without_file_systems_keeps_its_spill(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Nothing to trim (no table, no file system): no selector, the drives at their own pace
    as before (no note about free space)."""
    raw = tmp_path / "noise.img"
    raw.write_bytes(os.urandom(8 * MiB))
    packed = compress(raw, "xz")
    drive = loop_factory(8 * MiB, fill=PATTERN)
    rc, evs, err = flash(str(packed), drive.path)
    assert rc == 0, err
    assert drive.read(8 * MiB) == raw.read_bytes()
    assert result(evs, drive.path)["bytes_unused"] == 0
    assert not any("free space" in n for n in notes(evs))


def test_a_compressed_iso_hybrid_is_not_trimmed_and_keeps_its_spill(tmp_path: Path) -> None:
    """Its files may lie in a partition's free space: written whole, no selector (whose
    drives would go in lock-step for nothing)."""
    from popsicle_py.app.trim import STREAMED, plan_trim
    from popsicle_py.images import open_image
    from popsicle_py.usage import ISO_NOTE

    raw = tmp_path / "hybrid.img"
    garbage(raw, 8 * MiB)
    partition(raw, f"{2 * MiB // 512},{4 * MiB // 512},83\n")
    with open(raw, "r+b") as f:
        f.seek(32769)
        f.write(b"CD001")
    trim = plan_trim(open_image(str(compress(raw, "zst"))), wanted=True)
    assert (trim.select, trim.notes) == (None, (ISO_NOTE,))
    raw.write_bytes(raw.read_bytes()[:32769] + b"XXXXX" + raw.read_bytes()[32774:])
    packed = str(compress(raw, "zst"))
    trim = plan_trim(open_image(packed), wanted=True)
    assert trim.select is not None and trim.notes == (STREAMED,)
    whole = plan_trim(open_image(packed), wanted=True,
                      whole_because="--certificate reads the whole image back")
    assert whole.select is None and "--certificate" in whole.notes[0]
    assert plan_trim(open_image(packed), wanted=False).select is None


def test_a_corrupt_bitmap_after_groups_were_skipped_leaves_the_rest_written(
        tmp_path: Path, content: tuple[Path, Path, dict[str, str]]) -> None:
    """Flex groups of 4 (1 KiB blocks: 32 MiB each): group 4's bitmap lies in the second
    one, after the first's data went by, skipped where free; from group 4's bitmap on,
    everything of the partition is written."""
    keep, gone, _ = content
    image = tmp_path / "ext.img"
    garbage(image, 64 * MiB)
    make_ext(image, 0, 64 * MiB, keep, options=["-b", "1024", "-G", "4"], deleted=gone)
    out = run("dumpe2fs", str(image)).stdout
    bitmap = int(re.findall(r"Block bitmap at (\d+)", out)[4])
    assert bitmap >= 4 * 8192
    whole, _ = stream(image.read_bytes())
    with open(image, "r+b") as f:
        f.seek(bitmap * 1024 + 900)  # free blocks marked in use
        f.write(b"\xff")
    kept, select = stream(image.read_bytes())
    assert len(select.notes) == 1, select.notes
    assert select.notes[0].startswith("the image: group 4's block bitmap")
    assert select.notes[0].endswith(": written whole from here on")
    assert covers(kept, bitmap * 1024, 64 * MiB - bitmap * 1024)  # the rest: written
    assert [r for r in kept if sum(r) <= bitmap * 1024] == [
        r for r in whole if sum(r) <= bitmap * 1024]  # before it: as if it were right
    assert select.skipped > 4 * MiB


# ------------------------------------------------------------------------------------------
# The engine's side: BusWriter.select


class Stripes:
    """Keeps the head and every other 256 KiB after it; counts what it was shown."""

    def __init__(self) -> None:
        self.seen = 0

    def decide(self, offset: int, limit: int) -> tuple[bool, int]:
        if offset < HEAD:
            return True, min(limit, HEAD - offset)
        stripe = 256 << 10
        return (offset // stripe) % 2 == 0, min(limit, stripe - offset % stripe)

    def saw(self, offset: int, data: memoryview) -> None:
        assert offset == self.seen
        self.seen += len(data)


def test_the_engine_reads_every_byte_and_writes_only_kept_runs() -> None:
    from test_engine import Deadline, Recorder, Sink, Stream

    from popsicle_py import BusWriter

    payload = os.urandom(5 * MiB + 12345)
    sinks = [Sink(), Sink()]
    stripes = Stripes()
    result = (BusWriter(Stream(payload), sinks, Recorder(), Deadline()).bucket_size(MiB)
              .select(stripes).record_digests().expect_size(len(payload)).write())
    assert stripes.seen == result.size == len(payload)  # every byte read and shown
    kept = [(o, n) for o, n in result.extents]
    assert sum(n for _, n in kept) == HEAD + sum(
        min(256 << 10, len(payload) - o) for o in range(HEAD, len(payload), 512 << 10))
    for sink in sinks:
        got = sink.getvalue()
        for offset, length in kept:
            assert offset < HEAD or offset % (512 << 10) < 256 << 10
            assert got[offset : offset + length] == payload[offset : offset + length]
        for offset in range(HEAD + (256 << 10), len(got), 512 << 10):
            assert set(got[offset : offset + (256 << 10)]) <= {0}  # never written
    with pytest.raises(ValueError, match="cannot be combined"):
        BusWriter(Stream(payload), [Sink()], Recorder(), Deadline()).select(
            stripes).only_extents([(0, 4096, None)]).write()


def test_a_compressed_image_with_nothing_to_skip_reports_its_sha256(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Every run kept (a partition of no known file system): the extents cover the image
    without a hole, so the drive's result carries the image's SHA-256, of every byte."""
    raw = tmp_path / "other.img"
    garbage(raw, 24 * MiB)
    partition(raw, f"{2 * MiB // 512},{20 * MiB // 512},83\n")
    drive = loop_factory(24 * MiB, fill=PATTERN)
    rc, evs, err = flash(str(compress(raw, "zst")), drive.path)
    assert rc == 0, err
    r = result(evs, drive.path)
    assert (r["bytes_written"], r["bytes_unused"]) == (24 * MiB, 0)
    assert r["device_sha256"] == hashlib.sha256(raw.read_bytes()).hexdigest()
    assert drive.read(24 * MiB) == raw.read_bytes()
    assert "partition 1: no ext2/3/4 or FAT file system: written whole" in notes(evs)
