"""Partition table last, for real, and a checksum that vouches for the bytes written (issue 15).

At every moment before a drive is reported ok, its first 64 KiB (MBR, GPT, ISO 9660 volume
descriptors, a FAT boot sector) are not the image's: ``blkid -p`` finds no signature of the
image on a drive that was interrupted or failed, even inside the first bucket.  And the image's
checksum is computed again in the very pass that feeds the drives, so an image that changes
between the check and the write fails every drive instead of passing for the checksummed one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, needs_root, popsicle_cmd
from faulty import FaultyDrive

MiB = 1 << 20
HEAD = 64 << 10
PATTERN = 0x5A
#: Every byte written: the FAT images here are mostly free space, which trim would skip.
FLASH = ("flash", "--no-trim")

pytestmark = needs_root


def vfat_image(path: Path, size: int) -> bytes:
    """A FAT file system image (its boot sector is what blkid -p recognises), random inside."""
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    subprocess.run(["mkfs.vfat", "-n", "POPSICLE", str(path)], check=True, capture_output=True)
    return path.read_bytes()


def signature(loop: Loop) -> str:
    """What blkid -p (probing the device itself, no cache) says is on the drive."""
    proc = subprocess.run(["blkid", "-p", "-o", "export", loop.path], capture_output=True,
                          text=True)
    return proc.stdout.strip()


def events_of(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def result(evs: list[dict[str, Any]], device: str) -> dict[str, Any]:
    summary = evs[-1]
    assert summary["event"] == "summary"
    return next(r for r in summary["results"] if r["device"] == device)


def flash_checking_while_writing(image: Path, drive: Loop, digest: str
                                 ) -> subprocess.CompletedProcess[str]:
    """``flash IMAGE DRIVE --sha256 DIGEST --checksum-while-writing`` (JSON events)."""
    return subprocess.run(
        [*popsicle_cmd(), "flash", str(image), drive.path, "--yes", "--json", "--sha256",
         digest, "--checksum-while-writing"], capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=60)


def test_ctrl_c_inside_the_first_bucket_leaves_no_image_signature(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any], tmp_path: Path) -> None:
    image = tmp_path / "fat.img"
    data = vfat_image(image, 24 * MiB)
    drives = [loop_factory(32 * MiB, fill=PATTERN) for _ in range(2)]
    add = throttle(*((d, 2 * MiB) for d in drives))
    proc = subprocess.Popen(
        [*popsicle_cmd(), *FLASH, str(image), *(d.path for d in drives), "--yes", "--json",
         "--bucket-size", "16M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        event = json.loads(line)
        seen.append(event)
        # Inside the first bucket (16 MiB): 4 MiB of it on the drive, the head held back.
        if event["event"] == "progress" and event["bytes"] >= 4 * MiB:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    evs = events_of(out)
    for drive in drives:
        assert result(evs, drive.path)["status"] == "cancelled"
        assert drive.read(HEAD) != data[:HEAD]
        assert "TYPE=" not in signature(drive), signature(drive)


def test_a_drive_holding_an_older_image_shows_neither_once_interrupted(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any], tmp_path: Path) -> None:
    """Re-flashing last week's stick and stopping: the old image's boot sector and partition
    table must not stay in front of the new image's bytes (it would pass for a good disk)."""
    old = vfat_image(tmp_path / "old.img", 8 * MiB)
    image = tmp_path / "fat.img"
    data = vfat_image(image, 24 * MiB)
    drive = loop_factory(32 * MiB, fill=PATTERN)
    with open(drive.path, "r+b") as f:
        f.write(old)
    assert "TYPE=vfat" in signature(drive)
    add = throttle((drive, 2 * MiB))
    proc = subprocess.Popen(
        [*popsicle_cmd(), *FLASH, str(image), drive.path, "--yes", "--json", "--no-probe",
         "--bucket-size", "16M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["bytes"] >= 2 * MiB:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert result(events_of(out), drive.path)["status"] == "cancelled"
    assert drive.head_is_stamped(data) and drive.read(HEAD) != old[:HEAD]
    assert "TYPE=" not in signature(drive), signature(drive)


def test_a_drive_that_dies_inside_the_first_bucket_shows_no_image_signature(
        loop_factory: Callable[..., Loop], dying_loop: Callable[..., Loop],
        tmp_path: Path) -> None:
    image = tmp_path / "fat.img"
    data = vfat_image(image, 24 * MiB)
    good = loop_factory(32 * MiB, fill=PATTERN)
    dying = dying_loop(32 * MiB, good=4 * MiB)  # every write past 4 MiB fails
    proc = subprocess.run(
        [*popsicle_cmd(), *FLASH, str(image), good.path, dying.path, "--yes", "--json",
         "--bucket-size", "16M"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
        timeout=120)
    assert proc.returncode == 1, proc.stderr
    evs = events_of(proc.stdout)
    assert result(evs, good.path)["status"] == "ok"
    assert result(evs, dying.path)["status"] == "failed"
    assert good.read(len(data)) == data
    assert "TYPE=vfat" in signature(good)
    assert dying.read(HEAD) != data[:HEAD]
    assert "TYPE=" not in signature(dying), signature(dying)


def test_an_image_that_changes_after_its_checksum_fails_every_drive(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any], tmp_path: Path) -> None:
    """Right checksum before writing, one byte different while the drives are fed: every drive
    fails, none holds the image's head (a flaky source, or a file changed under us)."""
    image = tmp_path / "fat.img"
    data = vfat_image(image, 24 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    drives = [loop_factory(32 * MiB, fill=PATTERN) for _ in range(2)]
    add = throttle(*((d, 4 * MiB) for d in drives))
    proc = subprocess.Popen(
        [*popsicle_cmd(), *FLASH, str(image), *(d.path for d in drives), "--yes", "--json",
         "--sha256", digest, "--bucket-size", "1M", "--buckets", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "note" and event["text"].startswith("checksum ok"):
            # The drives take seconds to reach 20 MiB; the reader is a ring (2 MiB) ahead.
            with open(image, "r+b") as f:
                f.seek(20 * MiB)
                byte = f.read(1)
                f.seek(20 * MiB)
                f.write(bytes([byte[0] ^ 1]))
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    evs = events_of(out)
    for drive in drives:
        r = result(evs, drive.path)
        assert r["status"] == "failed" and r["cause"] == "source", r
        assert "no longer matches its checksum" in r["error"]
        assert drive.read(HEAD) != data[:HEAD]
        assert "TYPE=" not in signature(drive)


def test_checksum_while_writing_still_vouches_in_the_write_pass(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    image = tmp_path / "fat.img"
    data = vfat_image(image, 6 * MiB)
    drive = loop_factory(8 * MiB, fill=PATTERN)
    wrong = hashlib.sha256(data + b"x").hexdigest()
    proc = flash_checking_while_writing(image, drive, wrong)
    assert proc.returncode == 1, proc.stderr
    evs = events_of(proc.stdout)
    assert not any(e["event"] == "phase" and e["phase"] == "checksum" for e in evs)
    r = result(evs, drive.path)
    assert r["status"] == "failed" and r["cause"] == "source", r
    # No checksum pass matched before: the image or the checksum is wrong, nothing "changed".
    assert r["error"] == (f"{drive.path}: the image does not match its checksum (sha256): a "
                          "wrong image, or checksum"), r
    assert drive.read(HEAD) != data[:HEAD]
    right = hashlib.sha256(data).hexdigest()
    proc = flash_checking_while_writing(image, drive, right)
    assert proc.returncode == 0, proc.stderr
    assert drive.read(len(data)) == data


def test_checksum_while_writing_a_zip_checks_it_before_writing(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A zip is read through its directory, so its file cannot be hashed as it is written:
    its checksum is checked in a pass of its own, and a wrong one is refused.  (Before: never
    checked, and the drive ended ok.)"""
    raw = tmp_path / "fat.img"
    data = vfat_image(raw, 4 * MiB)
    packed = tmp_path / "fat.zip"
    subprocess.run(["zip", "-q", "-j", str(packed), str(raw)], check=True)
    drive = loop_factory(8 * MiB, fill=PATTERN)
    wrong = hashlib.sha256(packed.read_bytes() + b"x").hexdigest()
    proc = flash_checking_while_writing(packed, drive, wrong)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(
        f"popsicle-py: checksum mismatch for {packed}: expected sha256 {wrong}"), proc.stderr
    assert drive.read(8 * MiB) == bytes([PATTERN]) * (8 * MiB)
    right = hashlib.sha256(packed.read_bytes()).hexdigest()
    proc = flash_checking_while_writing(packed, drive, right)
    assert proc.returncode == 0, proc.stderr
    evs = events_of(proc.stdout)
    assert any(e["event"] == "note" and "checked before writing" in e["text"]
               for e in evs), evs
    assert drive.read(len(data)) == data


@pytest.mark.parametrize("tool", ["xz", "zstd"])
def test_the_checksum_of_a_compressed_image_covers_the_file_as_downloaded(
        loop_factory: Callable[..., Loop], tmp_path: Path, tool: str) -> None:
    raw = tmp_path / "fat.img"
    data = vfat_image(raw, 4 * MiB)
    subprocess.run([tool, "-q", "-k", str(raw)], check=True)
    packed = tmp_path / ("fat.img.xz" if tool == "xz" else "fat.img.zst")
    drive = loop_factory(8 * MiB, fill=PATTERN)
    digest = hashlib.sha256(packed.read_bytes()).hexdigest()
    proc = flash_checking_while_writing(packed, drive, digest)
    assert proc.returncode == 0, proc.stderr
    assert drive.read(len(data)) == data


@pytest.mark.parametrize("verify", [True, False])
def test_a_drive_reading_alone_a_file_changed_since_the_reader_fails_as_the_sources_fault(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any], tmp_path: Path,
        verify: bool) -> None:
    """The slow drive leaves the ring and reads the rest of the file again itself; the file
    changes after the reader (and its checksum) saw it. The fast drive holds the checksummed
    image; the slow one must not end ok, with or without verification, and not get the head."""
    image = tmp_path / "fat.img"
    data = vfat_image(image, 16 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    fast, slow = loop_factory(32 * MiB, fill=PATTERN), loop_factory(32 * MiB, fill=PATTERN)
    add = throttle((slow, 2 * MiB))
    proc = subprocess.Popen(
        [*popsicle_cmd(), *FLASH, str(image), fast.path, slow.path, "--yes", "--json",
         "--no-probe", "--sha256", digest, "--bucket-size", "1M", "--buckets", "2",
         *(() if verify else ("--no-verify",))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None
    slow_at = 0
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["device"] == slow.path:
            slow_at = event["bytes"]
        if event["event"] == "result" and event["device"] == fast.path:
            # The reader has read it all (the fast drive is done); the slow one is far behind.
            assert event["status"] == "ok" and slow_at < 10 * MiB, (event, slow_at)
            with open(image, "r+b") as f:
                f.seek(14 * MiB)
                f.write(bytes([data[14 * MiB] ^ 1]))
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    evs = events_of(out)
    assert fast.read(len(data)) == data
    r = result(evs, slow.path)
    assert r["status"] == "failed" and r["cause"] == "source", r
    assert r["error"] == (f"{slow.path}: the image changed while it was read: bytes {14 * MiB}-"
                          f"{15 * MiB - 1}, read again for this drive, differ"), r
    assert slow.head_is_stamped(data)
    assert "TYPE=" not in signature(slow)


# -- given up inside the head's read-back (a stall, a Ctrl-C) -------------------------------------

#: The head's read-back hangs this long: its last write is the second write to touch byte 0
#: (the stamp was the first).
READ_HANG = 6


def stamped(head: bytes, image: bytes) -> bool:
    """``Loop.head_is_stamped`` for bytes read past a FaultyDrive's faults."""
    blocks = range(0, HEAD, 4096)
    return len(set(head[:4096])) > 200 and not any(
        head[i : i + 4096] == image[i : i + 4096] for i in blocks if any(image[i : i + 4096]))


def flash_hanging_head(image: Path, drive: FaultyDrive, stall_timeout: int
                       ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*popsicle_cmd(), *FLASH, str(image), drive.path, "--yes", "--json", "--no-probe",
         "--stall-timeout", str(stall_timeout)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def assert_stamp_written_back(drive: FaultyDrive, data: bytes, evs: list[dict[str, Any]]) -> None:
    hangs = drive.read_hangs()
    assert [offset for offset, _ in hangs] == [0], hangs
    assert stamped(drive.read(0, HEAD), data), "the drive holds the image's head"
    assert drive.read(MiB, len(data) - MiB) == data[MiB:]  # all but the head (1 MiB) written
    # The stamp went back after the hung read: a write at byte 0 is logged after it.
    log = [line.split() for line in drive.log.read_text().splitlines()]
    hung = next(i for i, (_, _, what) in enumerate(log) if what == "read-hang")
    assert any(offset == "0" for offset, _, _ in log[hung + 1:]), log[hung:]
    notes = [e["text"] for e in evs if e["event"] == "note"]
    assert f"{drive.path}: given up inside its head's write or read-back; the stamp goes back " \
        "over the image's head once that call returns (the process could not end before it " \
        "anyway)" in notes, notes
    said = result(evs, drive.path)["error"]  # in the summary, said before the run ended
    assert said.endswith("; the image's first 1 MiB were overwritten again"), said


def test_a_drive_stalled_in_its_heads_read_back_ends_holding_the_stamp(
        faulty_drive: Callable[..., FaultyDrive], tmp_path: Path) -> None:
    """Given up as stalled while its head reads back: once that read returns, the stamp goes
    back over the head before the run ends (the device is not closed under the lane)."""
    image = tmp_path / "fat.img"
    data = vfat_image(image, 24 * MiB)
    drive = faulty_drive(32 * MiB, fill=PATTERN, read_hang_after=(0, MiB, 2, READ_HANG))
    proc = flash_hanging_head(image, drive, 2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    evs = events_of(out)
    assert result(evs, drive.path)["cause"] == "stalled", result(evs, drive.path)
    assert_stamp_written_back(drive, data, evs)


def test_a_drive_cancelled_in_its_heads_read_back_ends_holding_the_stamp(
        faulty_drive: Callable[..., FaultyDrive], tmp_path: Path) -> None:
    """Ctrl-C while the head's read-back hangs: past the cancel's grace the lane is given up,
    and the stamp still goes back once its read returns."""
    image = tmp_path / "fat.img"
    data = vfat_image(image, 24 * MiB)
    drive = faulty_drive(32 * MiB, fill=PATTERN, read_hang_after=(0, MiB, 2, READ_HANG))
    proc = flash_hanging_head(image, drive, 30)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        event = json.loads(line)
        if (event["event"], event.get("phase")) == ("phase", "syncing"):
            break  # the head is being written: its read-back comes next
    deadline = time.monotonic() + 20
    while not drive.read_hangs():  # the hung read-back has reached the drive
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    evs = events_of("".join(lines) + out)
    assert result(evs, drive.path)["status"] == "cancelled", result(evs, drive.path)
    assert_stamp_written_back(drive, data, evs)
