"""Writing less: skipping identical buckets, resuming, block maps (bmap), repairing buckets.

Bytes written are counted by the kernel (/sys/dev/block/M:m/stat, sectors written), not
by the tool's own report; both must agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, needs_root, popsicle_cmd

from popsicle_py import bmap as bmap_mod
from popsicle_py import events
from popsicle_py.blockdev import BlockDevice, OpenSpec, open_for_writing
from popsicle_py.engine import HEAD
from popsicle_py.flash import FlashJob, FlashOptions
from popsicle_py.images import open_image

pytestmark = needs_root

MiB = 1 << 20
PATTERN = 0x5A


def flash(*args: str, preexec: Callable[[], None] | None = None) -> tuple[int, list[dict], str]:
    """A flash whose writes are counted sector by sector: without the capacity probe, whose
    stamps (and their restoring) would be counted too."""
    proc = subprocess.run([*popsicle_cmd(), "flash", *args, "--yes", "--json", "--no-probe",
                           "--bucket-size", "1M"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, preexec_fn=preexec)
    return proc.returncode, [json.loads(x) for x in proc.stdout.splitlines()], proc.stderr


def sectors_written(loop: Loop) -> int:
    return loop.write_stat_sectors()


def result(evs: list[dict], device: str) -> dict:
    return next(r for r in evs[-1]["results"] if r["device"] == device)


def test_skip_identical_writes_only_the_changed_buckets(loop_factory: Callable[..., Loop],
                                                        tmp_path: Path) -> None:
    image = tmp_path / "os.img"
    data = bytearray(os.urandom(12 * MiB + 777))
    image.write_bytes(data)
    drive = loop_factory(16 * MiB)
    assert flash(str(image), drive.path)[0] == 0
    # Last week's image differs from this week's in three buckets (one is the first).
    for bucket in (0, 5, 12):
        data[bucket * MiB + 100] ^= 0xFF
    image.write_bytes(data)
    before = sectors_written(drive)
    rc, evs, err = flash(str(image), drive.path, "--skip-identical")
    assert rc == 0, err
    r = result(evs, drive.path)
    # Compared in pieces of 64 KiB or more (more once the drive is seen to be fast): only the
    # pieces that changed are written, the image's head (1 MiB) among them (last), and the
    # last bucket's 777 bytes.
    head = HEAD
    piece = r["bytes_written"] - head - 777
    assert piece in (64 << 10, 128 << 10, 256 << 10, 512 << 10, MiB, 2 * MiB, 4 * MiB), r
    assert (r["bytes_skipped"], r["repaired"]) == (len(data) - r["bytes_written"], 0)
    # Those, and the random stamp that held the head's place from the start.
    assert sectors_written(drive) - before == (2 * head + piece) // 512 + 2
    assert drive.read(len(data)) == bytes(data)


def test_interrupted_flash_resumes(loop_factory: Callable[..., Loop], throttle,
                                   tmp_path: Path) -> None:
    image = tmp_path / "os.img"
    data = os.urandom(12 * MiB)
    image.write_bytes(data)
    drive = loop_factory(16 * MiB, fill=PATTERN)
    add = throttle((drive, 4 * MiB))
    proc = subprocess.Popen([*popsicle_cmd(), "flash", str(image), drive.path, "--yes",
                             "--json", "--no-probe", "--bucket-size", "1M"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["bytes"] >= 6 * MiB:
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert drive.head_is_stamped(data)  # it does not boot, nor pass for what it held
    before = sectors_written(drive)
    rc, evs, err = flash(str(image), drive.path, "--skip-identical")
    assert rc == 0, err
    r = result(evs, drive.path)
    written = (sectors_written(drive) - before) * 512
    # What was missing, the image's head, and the random stamp that held its place meanwhile.
    assert written == r["bytes_written"] + HEAD
    assert r["bytes_written"] < 7 * MiB
    assert r["bytes_skipped"] >= 5 * MiB
    assert drive.read(len(data)) == data


def test_bmap_writes_only_mapped_ranges(sparse_image: tuple[Path, bytes],
                                        loop_factory: Callable[..., Loop]) -> None:
    path, data = sparse_image
    block_map = bmap_mod.load(f"{path}.bmap", len(data))
    drive = loop_factory(16 * MiB, fill=PATTERN)
    before = sectors_written(drive)
    rc, evs, err = flash(str(path), drive.path)
    assert rc == 0, err
    # The mapped ranges past the image's head (its first MiB: no partition table), and the
    # head twice: a random stamp in its place until the rest is verified, then the head
    # whole, its holes as the image's zeros (a drive's old signatures must not outlive it).
    head = 1 << 20
    past = sum(max(0, e.end - max(e.offset, head)) for e in block_map.extents)
    assert (sectors_written(drive) - before) * 512 == past + 2 * head
    r = result(evs, drive.path)
    assert (r["bytes_written"], r["bytes_unused"]) == (block_map.mapped,
                                                       len(data) - head - past)
    on_drive = drive.read()
    assert on_drive[:head] == data[:head]
    holes = 0
    for start in range(head, len(data), 4096):
        block = slice(start, start + 4096)
        mapped = any(e.offset <= start < e.end for e in block_map.extents)
        if mapped:
            assert on_drive[block] == data[block]
        else:
            holes += 1
            assert on_drive[block] == bytes([PATTERN]) * 4096  # left alone
    assert holes > 0
    # --no-bmap writes everything, holes included.
    rc, _, err = flash(str(path), drive.path, "--no-bmap")
    assert rc == 0, err
    assert drive.read(len(data)) == data


def test_bmap_with_no_bmap_is_a_usage_error(sparse_image: tuple[Path, bytes],
                                            loop_factory: Callable[..., Loop]) -> None:
    path, _ = sparse_image
    drive = loop_factory(16 * MiB, fill=PATTERN)
    rc, evs, err = flash(str(path), drive.path, "--no-bmap", "--bmap", f"{path}.bmap")
    assert rc == 2
    assert err.splitlines() == [f"popsicle-py: --bmap {path}.bmap and --no-bmap contradict "
                                "each other; give one"]
    assert [e["event"] for e in evs] == ["error", "summary"]
    assert drive.read() == bytes([PATTERN]) * drive.size


def test_skip_identical_with_a_minimum_write_speed_is_refused(
        sparse_image: tuple[Path, bytes], loop_factory: Callable[..., Loop]) -> None:
    """Bytes --skip-identical finds already there move at reading speed: a drive that writes
    too slowly would pass --min-write-speed.  Refused before anything is written."""
    path, _ = sparse_image
    drive = loop_factory(16 * MiB, fill=PATTERN)
    rc, evs, err = flash(str(path), drive.path, "--skip-identical", "--min-write-speed",
                         "15MB/s")
    assert rc == 2
    assert err.splitlines() == ["popsicle-py: --min-write-speed judges how fast a drive "
                                "writes, and --skip-identical does not write what the drive "
                                "already holds: give one"]
    assert [e["event"] for e in evs] == ["error", "summary"]
    assert drive.read() == bytes([PATTERN]) * drive.size


def test_a_checksum_only_the_write_pass_could_check_is_refused_with_a_block_map(
        sparse_image: tuple[Path, bytes], loop_factory: Callable[..., Loop]) -> None:
    """A block map's pass reads only its ranges, so --checksum-while-writing would check
    nothing: a wrong image would end ok.  Refused before anything is written."""
    path, _ = sparse_image
    drive = loop_factory(16 * MiB, fill=PATTERN)
    rc, _, err = flash(str(path), drive.path, "--sha256", "0" * 64,
                       "--checksum-while-writing")
    assert rc == 2
    assert err.splitlines() == [
        f"popsicle-py: --checksum-while-writing cannot check the checksum: the block map "
        f"{path}.bmap reads only its ranges; drop it or give --no-bmap"]
    assert drive.read() == bytes([PATTERN]) * drive.size
    rc, evs, err = flash(str(path), drive.path, "--sha256", "0" * 64,
                         "--checksum-while-writing", "--no-bmap")
    assert rc == 1, err  # the whole image is read in the write pass, and its checksum is wrong
    assert result(evs, drive.path)["cause"] == "source"


def test_bad_bmaps_are_refused_before_writing(sparse_image: tuple[Path, bytes],
                                              loop_factory: Callable[..., Loop],
                                              tmp_path: Path) -> None:
    path, data = sparse_image
    drive = loop_factory(16 * MiB, fill=PATTERN)
    text = Path(f"{path}.bmap").read_text()
    cases = {
        "corrupt.bmap": text.replace("<BlockMap>", "<BlockMap>\n<Range chksum='00'> 7 </Range>"),
        "malformed.bmap": text.replace("</bmap>", ""),
        "wrong-size.bmap": text.replace(f"<ImageSize> {len(data)} </ImageSize>",
                                        f"<ImageSize> {len(data) - 4096} </ImageSize>"),
    }
    for name, body in cases.items():
        (tmp_path / name).write_text(body)
        rc, evs, err = flash(str(path), drive.path, "--bmap", str(tmp_path / name))
        assert rc == 2, (name, err)
        assert name in err and "Traceback" not in err
        assert evs[-1]["results"] == []
    assert drive.read() == bytes([PATTERN]) * drive.size


def test_image_not_matching_its_bmap_fails_every_drive(sparse_image: tuple[Path, bytes],
                                                       loop_factory: Callable[..., Loop]) -> None:
    path, data = sparse_image
    with open(path, "r+b") as f:  # bit rot inside the second mapped range
        f.seek(6 * MiB)
        f.write(bytes([data[6 * MiB] ^ 1]))
    drives = [loop_factory(16 * MiB, fill=PATTERN) for _ in range(2)]
    rc, evs, err = flash(str(path), *(d.path for d in drives))
    assert rc == 1, err
    for d in drives:
        r = result(evs, d.path)
        assert r["status"] == "failed" and "does not match its block map" in r["error"]
        assert d.head_is_safe(data, PATTERN), d.read(32)


COMPRESSORS = {"gz": ["gzip", "-c"], "xz": ["xz", "-0", "-c"], "zst": ["zstd", "-q", "-c"]}


def compressed(path: Path, data: bytes, suffix: str) -> Path:
    out = path.with_name(f"{path.name}.{suffix}")
    out.write_bytes(subprocess.run(COMPRESSORS[suffix], input=data, capture_output=True,
                                   check=True).stdout)
    return out


def bmap_without_checksums(path: Path) -> Path:
    """bmaptool's own map with no range checksums: only the stream's checks can see a flip."""
    out = path.with_name(f"{path.name}.plain.bmap")
    subprocess.run(["bmaptool", "create", "--no-checksum", str(path), "-o", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_a_corrupt_compressed_image_with_a_bmap_fails_every_drive(
        sparse_image: tuple[Path, bytes], loop_factory: Callable[..., Loop], suffix: str
        ) -> None:
    """A block map leaves the stream's tail unread, where gzip's CRC, xz's and zstd's
    checksums sit: the stream is read to its end all the same, so a flipped byte that only
    they see fails the drives (ok before, with the flipped byte on them)."""
    path, data = sparse_image
    squeezed = compressed(path, data, suffix)
    raw = bytearray(squeezed.read_bytes())
    raw[MiB] ^= 0x40  # inside the 3 MiB of random data: stored, so no decoder error there
    squeezed.write_bytes(bytes(raw))
    assert subprocess.run([COMPRESSORS[suffix][0], "-t", str(squeezed)],
                          capture_output=True, check=False).returncode != 0
    drives = [loop_factory(16 * MiB, fill=PATTERN) for _ in range(2)]
    rc, evs, err = flash(str(squeezed), *(d.path for d in drives),
                         "--bmap", str(bmap_without_checksums(path)))
    assert rc == 1, err
    for d in drives:
        r = result(evs, d.path)
        assert r["status"] == "failed" and f"{squeezed} is corrupt" in r["error"], r
        assert d.head_is_safe(data, PATTERN), d.read(32)


@pytest.mark.parametrize("extra", [4096, -(MiB - 16384)], ids=["longer", "shorter"])
def test_a_stream_of_another_length_than_its_bmap_says_fails_every_drive(
        sparse_image: tuple[Path, bytes], loop_factory: Callable[..., Loop], extra: int
        ) -> None:
    """gzip does not say its length up front: only the end of the stream shows it differs
    from the block map's image size (every mapped range is there either way)."""
    path, data = sparse_image
    other = data + bytes(extra) if extra > 0 else data[:extra]
    squeezed = compressed(path, other, "gz")
    drives = [loop_factory(16 * MiB, fill=PATTERN) for _ in range(2)]
    rc, evs, err = flash(str(squeezed), *(d.path for d in drives), "--bmap", f"{path}.bmap")
    assert rc == 1, err
    for d in drives:
        r = result(evs, d.path)
        assert r["status"] == "failed", r
        assert (f"the image holds {len(other)} bytes but its block map says {len(data)}"
                in r["error"]), r
        assert d.head_is_safe(data, PATTERN), d.read(32)


def test_bmap_version_1_with_sha1(tmp_path: Path) -> None:
    data = os.urandom(8192)
    text = f"""<?xml version="1.0" ?>
<bmap version="1.3">
    <ImageSize> 12288 </ImageSize>
    <BlockSize> 4096 </BlockSize>
    <BlocksCount> 3 </BlocksCount>
    <MappedBlocksCount> 2 </MappedBlocksCount>
    <BlockMap>
        <Range sha1="{hashlib.sha1(data).hexdigest()}"> 1-2 </Range>
    </BlockMap>
</bmap>"""
    parsed = bmap_mod.parse(text, "v1.bmap")
    assert parsed.algo == "sha1"  # 1.x ranges carry sha1 (this file has no BmapFileSHA1)
    assert parsed.extents == (bmap_mod.Extent(4096, 8192, hashlib.sha1(data).hexdigest()),)
    with pytest.raises(bmap_mod.BmapError, match=r"version 3\.0 is not supported"):
        bmap_mod.parse(text.replace('version="1.3"', 'version="3.0"'), "v3.bmap")


class Corrupter:
    """Flips one byte of a drive as its verification begins (``times`` times).

    On the drive's own thread, at its first read after a flush: verification follows the
    flush, and the flip must land before the bytes it changes are read back (an event seen by
    the job's thread would come too late).
    """

    def __init__(self, loop: Loop, offset: int, times: int) -> None:
        self.loop, self.offset, self.left = loop, offset, times

    def arm(self, device: BlockDevice) -> None:
        flushed = [False]
        fsync, readinto = device.fsync, device.readinto

        def after_flush() -> None:
            fsync()
            flushed[0] = True

        def read(buffer: memoryview | bytearray) -> int:
            if flushed[0] and self.left > 0:
                flushed[0] = False
                self.left -= 1
                with open(self.loop.path, "r+b", buffering=0) as f:
                    byte = os.pread(f.fileno(), 1, self.offset)
                    os.pwrite(f.fileno(), bytes([byte[0] ^ 0xFF]), self.offset)
                    os.fsync(f.fileno())
            return readinto(buffer)

        device.fsync = after_flush  # type: ignore[method-assign]
        device.readinto = read  # type: ignore[method-assign]


def _flash_with(corrupter: Corrupter, image: Path, loops: list[Loop],
                repair_attempts: int) -> events.Summary:
    devices = [open_for_writing(OpenSpec(d.path, d.size)) for d in loops]
    for device in devices:
        if device.path == corrupter.loop.path:
            corrupter.arm(device)
    return FlashJob(open_image(str(image)), devices,
                    FlashOptions(bucket_size=MiB, repair_attempts=repair_attempts),
                    lambda event: None, lambda: False).run()


def test_a_bucket_corrupted_before_verification_is_repaired(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    image = tmp_path / "os.img"
    data = os.urandom(6 * MiB)
    image.write_bytes(data)
    loops = [loop_factory(8 * MiB) for _ in range(2)]
    summary = _flash_with(Corrupter(loops[0], 3 * MiB + 5, times=1), image, loops, 1)
    first, second = summary.results
    assert first.status == "ok" and first.repaired == 1
    assert second.status == "ok" and second.repaired == 0
    assert loops[0].read(len(data)) == data


def test_a_drive_that_keeps_failing_is_invalid_with_the_offset(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    image = tmp_path / "os.img"
    data = os.urandom(6 * MiB)
    image.write_bytes(data)
    for attempts in (0, 2):
        loop = loop_factory(8 * MiB)
        summary = _flash_with(Corrupter(loop, 3 * MiB + 5, times=attempts + 1), image, [loop],
                              attempts)
        (r,) = summary.results
        assert r.status == "invalid" and r.mismatch_offset == 3 * MiB + 5
        assert "3145733" in (r.error or "")
        assert loop.read(64 << 10) != data[: 64 << 10]  # never finished: no image head on it


def test_the_exact_offset_is_found_in_an_unaligned_last_bucket(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    image = tmp_path / "os.img"
    data = os.urandom(7 * MiB + 100_000)  # the last bucket is 100000 bytes: not whole blocks
    image.write_bytes(data)
    loop = loop_factory(8 * MiB)
    summary = _flash_with(Corrupter(loop, len(data) - 1, times=1), image, [loop], 0)
    (r,) = summary.results
    assert r.status == "invalid" and r.mismatch_offset == len(data) - 1


def test_block_map_ranges_inside_the_head_are_held_too(
        loop_factory: Callable[..., Loop], dying_loop: Callable[..., Loop],
        tmp_path: Path) -> None:
    """An ISO whose block map starts with its MBR sector, then the ISO 9660 descriptors at
    32 KiB: a drive that dies mid-write must show neither (blkid -p finds no signature)."""
    if shutil.which("bmaptool") is None or shutil.which("xorriso") is None:
        pytest.skip("bmaptool and xorriso (bmap-tools, xorriso) are not installed")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "payload.bin").write_bytes(os.urandom(12 * MiB))
    path = tmp_path / "disk.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "POPSICLE", "-o", str(path),
                    str(tree)], check=True, capture_output=True)
    with open(path, "r+b") as f:  # an MBR sector, as hybrid ISOs have
        f.write(os.urandom(446) + bytes(64) + b"\x55\xaa")
    subprocess.run(["fallocate", "--dig-holes", str(path)], check=True)
    subprocess.run(["bmaptool", "create", str(path), "-o", f"{path}.bmap"], check=True,
                   capture_output=True)
    data = path.read_bytes()
    ranges = bmap_mod.load(f"{path}.bmap", len(data)).extents
    assert ranges[0].offset == 0 and ranges[0].length < ranges[1].offset < 64 << 10
    good, dying = loop_factory(32 * MiB, fill=PATTERN), dying_loop(32 * MiB, good=4 * MiB)
    rc, evs, err = flash(str(path), good.path, dying.path, "--no-probe")
    assert rc == 1, err
    assert result(evs, good.path)["status"] == "ok"
    # What the block map maps, no more: the holes among the first 64 KiB are not counted.
    assert result(evs, good.path)["bytes_written"] == sum(r.length for r in ranges)
    for r in ranges:
        assert good.read(r.length, r.offset) == data[r.offset : r.offset + r.length]
    assert "TYPE=\"iso9660\"" in subprocess.run(["blkid", "-p", good.path],
                                                capture_output=True, text=True).stdout
    assert result(evs, dying.path)["status"] == "failed"
    probe = subprocess.run(["blkid", "-p", dying.path], capture_output=True, text=True).stdout
    assert "TYPE=" not in probe and "PTTYPE=" not in probe, probe


def test_a_block_map_whose_first_range_is_past_the_head_still_gets_its_head_written(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """An image whose first MiB is unmapped (zeros) and a drive holding an old partition
    table: the head is the image's zeros all the same, stamped first and written last.  The
    drive ended ok with the old table over the new data (and a drive that died mid-write kept
    it too: no stamp was written)."""
    path = tmp_path / "late.img"
    data = bytearray(8 * MiB)
    data[2 * MiB : 5 * MiB] = os.urandom(3 * MiB)
    with open(path, "wb") as f:  # sparse: only the data is mapped
        f.truncate(len(data))
        f.seek(2 * MiB)
        f.write(data[2 * MiB : 5 * MiB])
    subprocess.run(["bmaptool", "create", str(path), "-o", f"{path}.bmap"], check=True,
                   capture_output=True)
    assert "<Range" in Path(f"{path}.bmap").read_text() and " 512-1279 " in Path(
        f"{path}.bmap").read_text()  # one range, 2 to 5 MiB
    drive = loop_factory(16 * MiB, fill=PATTERN)
    old = bytearray(4096)  # the table of an image written before
    old[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") \
        + (8192).to_bytes(4, "little")
    old[510:512] = b"\x55\xaa"
    with open(drive.backing, "r+b") as f:
        f.write(old)
    rc, evs, err = flash(str(path), drive.path, "--force")
    assert rc == 0, err
    assert result(evs, drive.path)["status"] == "ok"
    on_drive = drive.read(len(data))
    assert on_drive[:HEAD] == bytes(HEAD)  # the image's head: no old table
    assert on_drive[HEAD : 2 * MiB] == bytes([PATTERN]) * (2 * MiB - HEAD)  # unmapped
    assert on_drive[2 * MiB : 5 * MiB] == data[2 * MiB : 5 * MiB]
    assert on_drive[5 * MiB :] == bytes([PATTERN]) * (3 * MiB)  # unmapped past the head
