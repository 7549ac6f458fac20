"""``popsicle-py erase`` (issue 28): drives back to ordinary sticks, checked with real tools.

The kernel here has no partition devices for loop devices, so the new partition is looked at
through a read-only loop device at its offset (``blkid -p``, ``fsck``), as a stick's
partition would be.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, needs_root, popsicle_cmd
from faulty import FaultyDrive
from loopdev import attach, detach, mounted_ext4, write_mbr

from popsicle_py import erase, erase_probe, failures
from popsicle_py.events import Cause
from popsicle_py.units import format_size

MiB = 1 << 20
PATTERN = 0x5A

pytestmark = needs_root


def popsicle(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, check=False)


@contextlib.contextmanager
def partition_of(drive: Loop, start: int = MiB) -> Iterator[str]:
    """A read-only loop device over the drive's partition (no loopNp1 on this kernel)."""
    path = subprocess.run(["losetup", "-f", "--show", "-r", "-o", str(start), drive.path],
                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield path
    finally:
        subprocess.run(["losetup", "-d", path], check=False)


def blkid(path: str, *extra: str) -> dict[str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", *extra, path], capture_output=True,
                         text=True).stdout
    return dict(line.replace("\\ ", " ").split("=", 1) for line in out.splitlines()
                if "=" in line)


def table(drive: Loop) -> list[tuple[int, int, str]]:
    out = subprocess.run(["sfdisk", "--json", drive.path], capture_output=True, text=True)
    if out.returncode != 0:
        return []
    parts = json.loads(out.stdout)["partitiontable"]["partitions"]
    return [(p["start"], p["size"], p["type"]) for p in parts]


def used_drive(loop_factory: Callable[..., Loop], size: int = 96 * MiB) -> Loop:
    """A stick as people bring it: old bytes everywhere, an MBR with an ext4 partition at
    8 MiB (where the new partition's 1 MiB start would not reach it)."""
    drive = loop_factory(size, fill=PATTERN)
    write_mbr(str(drive.backing), [(16384, (size - 16 * MiB) // 512)])
    part = attach(drive.backing)
    try:
        subprocess.run(["losetup", "-d", part], check=True)
        part = subprocess.run(["losetup", "-f", "--show", "-o", str(8 * MiB), "--sizelimit",
                               str(size - 16 * MiB), str(drive.backing)], capture_output=True,
                              text=True, check=True).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", "-F", part], check=True)
    finally:
        detach(part, drive.backing)
    subprocess.run(["blockdev", "--flushbufs", drive.path], check=True)
    assert blkid(drive.path)["PTTYPE"] == "dos"
    assert blkid(drive.path, "-O", str(8 * MiB))["TYPE"] == "ext4"
    return drive


def test_erase_leaves_one_fat32_partition_that_blkid_and_fsck_accept(
        loop_factory: Callable[..., Loop]) -> None:
    drive = used_drive(loop_factory)
    result = popsicle("erase", drive.path, "--yes", "--label", "Stick", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["ok"] and summary["results"][0]["verified"]
    assert table(drive) == [(2048, drive.size // 512 - 2048, "c")]
    assert blkid(drive.path, "-O", str(8 * MiB)) == {}  # the old ext4 is gone
    with partition_of(drive) as part:
        found = blkid(part)
        assert (found["TYPE"], found["VERSION"], found["LABEL"]) == ("vfat", "FAT32", "STICK")
        fsck = subprocess.run(["fsck.vfat", "-n", part], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    mdir = subprocess.run(["mdir", "-i", f"{drive.path}@@1M"], capture_output=True, text=True)
    assert "Volume in drive : is STICK" in mdir.stdout, mdir


@pytest.mark.skipif(shutil.which("mkfs.exfat") is None, reason="needs exfatprogs")
def test_erase_exfat_with_zeros_everywhere(loop_factory: Callable[..., Loop]) -> None:
    drive = used_drive(loop_factory)
    result = popsicle("erase", drive.path, "--yes", "--fs", "exfat", "--label", "Big Stick",
                      "--zero")
    assert result.returncode == 0, result.stderr
    assert table(drive) == [(2048, drive.size // 512 - 2048, "7")]
    with partition_of(drive) as part:
        found = blkid(part)
        assert (found["TYPE"], found["LABEL"]) == ("exfat", "Big Stick")
        fsck = subprocess.run(["fsck.exfat", "-n", part], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert PATTERN not in drive.read()[4 * MiB:]  # zeros past the file system's head


def test_discard_reads_back_zeros_and_fs_none_only_wipes(
        loop_factory: Callable[..., Loop]) -> None:
    drive = used_drive(loop_factory)
    result = popsicle("erase", drive.path, "--yes", "--discard", "--fs", "none")
    assert result.returncode == 0, result.stderr
    assert drive.read() == bytes(drive.size)
    drive = used_drive(loop_factory)
    result = popsicle("erase", drive.path, "--yes", "--fs", "none")
    assert result.returncode == 0, result.stderr
    assert table(drive) == [] and blkid(drive.path) == {}
    assert blkid(drive.path, "-O", str(8 * MiB)) == {}
    wipefs = subprocess.run(["wipefs", "--no-act", drive.path], capture_output=True, text=True)
    assert wipefs.stdout == ""


def test_many_drives_at_once_each_with_its_result(loop_factory: Callable[..., Loop]) -> None:
    drives = [used_drive(loop_factory, 80 * MiB), loop_factory(24 * MiB, fill=PATTERN)]
    result = popsicle("erase", *(d.path for d in drives), "--yes", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    results = {r["device"]: r for r in events[-1]["results"]}
    assert set(results) == {d.path for d in drives}
    assert all(r["status"] == "ok" for r in results.values())
    with partition_of(drives[1]) as part:
        assert blkid(part)["VERSION"] == "FAT16"  # too small for FAT32's clusters
    assert table(drives[1]) == [(2048, drives[1].size // 512 - 2048, "e")]


def _clusters(part: str) -> int:
    out = subprocess.run(["fsck.vfat", "-n", "-v", part], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return int(next(line.split()[0] for line in out.stdout.splitlines()
                    if "data clusters" in line))


@pytest.mark.parametrize("args", [["--fs", "fat32"], []], ids=["fs-fat32", "default"])
def test_a_64_mib_drive_gets_the_fat32_it_is_told_of(loop_factory: Callable[..., Loop],
                                                     args: list[str]) -> None:
    """It was told "one fat32 partition" and given FAT16: FAT32 fits from 34 MiB, with the
    65525 clusters every system tells FAT32 by."""
    drive = loop_factory(64 * MiB, fill=PATTERN)
    result = popsicle("erase", drive.path, "--yes", *args)
    assert result.returncode == 0, result.stderr
    assert f"{drive.path}: one FAT32 partition\n" in result.stdout + result.stderr
    assert table(drive) == [(2048, drive.size // 512 - 2048, "c")]
    with partition_of(drive) as part:
        assert blkid(part)["VERSION"] == "FAT32"
        assert _clusters(part) >= 65525


def test_a_drive_too_small_for_fat32_is_told_what_it_gets(
        loop_factory: Callable[..., Loop]) -> None:
    drive = loop_factory(24 * MiB, fill=PATTERN)
    result = popsicle("erase", drive.path, "--yes")
    assert result.returncode == 0, result.stderr
    assert (f"{drive.path}: one FAT16 partition (too small for FAT32)\n"
            in result.stdout + result.stderr)
    with partition_of(drive) as part:
        assert blkid(part)["VERSION"] == "FAT16"


@pytest.mark.parametrize(("size", "instead"), [(24 * MiB, "FAT16"), (12 * MiB, "FAT12")])
def test_fs_fat32_on_a_drive_too_small_for_it_is_refused(
        loop_factory: Callable[..., Loop], size: int, instead: str) -> None:
    """Asked for by name, FAT32 is made or refused: never another FAT under its name."""
    drive = loop_factory(size, fill=PATTERN)
    result = popsicle("erase", drive.path, "--yes", "--fs", "fat32")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"popsicle-py: {drive.path} is too small for FAT32 (a partition of at least 33 MiB "
        f"after the first MiB): leave out --fs to make {instead}\n")
    assert drive.read() == bytes([PATTERN]) * drive.size


def test_fs_exfat_below_mkfs_exfats_least_is_refused_and_just_above_is_made(
        loop_factory: Callable[..., Loop]) -> None:
    """mkfs.exfat refuses a partition of 2 MiB ("boundary alignment is too big"): a 3 MiB
    drive is refused up front (exit 2, nothing written), not failed once confirmed."""
    drive = loop_factory(3 * MiB, fill=PATTERN)
    result = popsicle("erase", drive.path, "--yes", "--fs", "exfat")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"popsicle-py: {drive.path} is too small for exFAT (mkfs.exfat needs a partition of "
        "more than 2 MiB after the first MiB): leave out --fs to make FAT12\n")
    assert drive.read() == bytes([PATTERN]) * drive.size
    bigger = loop_factory(3 * MiB + erase.EXFAT_MIN_LENGTH - 2 * MiB, fill=PATTERN)
    result = popsicle("erase", bigger.path, "--yes", "--fs", "exfat")
    assert result.returncode == 0, result.stderr
    with partition_of(bigger) as part:
        assert blkid(part)["TYPE"] == "exfat"


@pytest.mark.parametrize(("args", "line"), [
    (["--zero", "--discard"], "--zero and --discard contradict each other; give one"),
    (["--label", "MUCH TOO LONG"], "--label 'MUCH TOO LONG': a FAT label is at most 11 ASCII "
                                   "characters"),
    (["--fs", "none", "--label", "X"], "--label names a file system, and --fs none makes none"),
    (["--fs", "exfat", "--label", "MYSTICKLABEL"],
     "--label 'MYSTICKLABEL': an exFAT label is at most 11 characters (UTF-16 units)"),
    (["--fs", "exfat", "--label", "\U0001f600" * 6],
     "--label '" + "\U0001f600" * 6 + "': an exFAT label is at most 11 characters (UTF-16 "
     "units)"),
    (["--label", " A"], "--label ' A': a FAT label cannot start with a space"),
    (["--fs", "exfat", "--label", "A/B"], "--label 'A/B': an exFAT label cannot hold "
                                          'control characters or " * / : < > ? \\ |'),
    (["--fs", "exfat", "--label", "A\x01"], "--label 'A\\x01': an exFAT label cannot hold "
                                            'control characters or " * / : < > ? \\ |'),
    (["--fs", "fat32", "--label", "A\tB"],
     "--label 'A\\tB': a FAT label cannot hold control characters"),
])
def test_bad_options_are_refused_and_nothing_is_written(
        loop_factory: Callable[..., Loop], args: list[str], line: str) -> None:
    drive = loop_factory(40 * MiB, fill=PATTERN)
    result = popsicle("erase", drive.path, "--yes", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"popsicle-py: {line}\n"
    assert drive.read() == bytes([PATTERN]) * drive.size


def test_without_yes_and_without_a_terminal_nothing_is_written(
        loop_factory: Callable[..., Loop]) -> None:
    drive = loop_factory(40 * MiB, fill=PATTERN)
    result = popsicle("erase", drive.path)
    assert result.returncode == 2, result.stderr
    assert "pass --yes to confirm in scripts" in result.stderr
    assert drive.read() == bytes([PATTERN]) * drive.size


def test_a_mounted_drive_is_refused(loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    drive = loop_factory(40 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", drive.path], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", drive.path, str(mnt)], check=True)
    try:
        result = popsicle("erase", drive.path, "--yes")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert result.returncode == 2, result.stderr
    assert f"{drive.path} is mounted at {mnt}; use --unmount to unmount it" in result.stderr
    assert blkid(drive.path)["TYPE"] == "ext4"


def test_ctrl_c_while_zeroing_leaves_no_partition_table(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any]) -> None:
    drive = used_drive(loop_factory)
    add = throttle((drive, 4 * MiB))
    proc = subprocess.Popen([*popsicle_cmd(), "erase", drive.path, "--yes", "--zero",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "progress":
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert json.loads(out.splitlines()[-1])["results"][0]["status"] == "cancelled"
    assert "PTTYPE" not in blkid(drive.path)


def _slow_mkfs(folder: Path) -> dict[str, str]:
    """An environment whose mkfs.vfat sleeps first (a slow $TMPDIR, a big drive): a window
    to press Ctrl-C in while it runs."""
    folder.mkdir()
    tool = folder / "mkfs.vfat"
    tool.write_text(f"#!/bin/sh\nsleep 30\nexec {shutil.which('mkfs.vfat')} \"$@\"\n")
    tool.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def test_ctrl_c_while_mkfs_runs_is_a_cancel_not_mkfs_failing(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Ctrl-C at a terminal goes to the whole foreground process group: it killed mkfs, and
    the drive was reported failed ("mkfs.vfat failed: exit status -2", exit 1).  The tool
    runs in a group of its own now: the cancel is ours, the drive is cancelled (130)."""
    drive = loop_factory(40 * MiB, fill=PATTERN)
    proc = subprocess.Popen([*popsicle_cmd(), "erase", drive.path, "--yes", "--fs", "fat32",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL, start_new_session=True,
                            env=_slow_mkfs(tmp_path / "bin"))
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["pgrep", "-f", str(tmp_path / "bin")],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)  # polling for the tool to start: no event says it did
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal's Ctrl-C does
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    [result] = json.loads(out.splitlines()[-1])["results"]
    assert (result["status"], result["cause"]) == ("cancelled", "cancelled"), result
    assert drive.read() == bytes([PATTERN]) * drive.size
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "bin")]).returncode == 1  # killed


def test_a_hung_tmpdir_is_named_not_the_healthy_drive_and_on_time(
        loop_factory: Callable[..., Loop]) -> None:
    """$TMPDIR frozen (a hung disk or NFS share under it): the file system, made there on the
    drive's own lane, read as the drive's stall ("/dev/loopN: stalled"), and only once the
    disk came back.  It is made on a watched worker now: the failure names $TMPDIR, its
    cause is not the drive's, on time, and nothing was written to the drive."""
    store = loop_factory(64 * MiB)
    drive = loop_factory(40 * MiB, fill=PATTERN)
    with mounted_ext4(store.path) as folder:
        subprocess.run(["fsfreeze", "-f", folder], check=True)
        try:
            proc = subprocess.Popen([*popsicle_cmd(), "erase", drive.path, "--yes", "--json",
                                     "--stall-timeout", "2"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "TMPDIR": folder})
            assert proc.stdout is not None
            started = time.monotonic()
            events: list[dict[str, Any]] = []
            while not events or events[-1]["event"] != "summary":
                line = proc.stdout.readline()  # the summary comes before the thaw below
                assert line, (events, proc.stderr.read() if proc.stderr else "")
                events.append(json.loads(line))
            took = time.monotonic() - started
            # A --label is tried on a small file system there first, in prepare: refused.
            started = time.monotonic()
            tried = subprocess.Popen([*popsicle_cmd(), "erase", drive.path, "--yes",
                                      "--label", "STICK", "--stall-timeout", "2"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL, env={**os.environ, "TMPDIR": folder})
            assert tried.stderr is not None
            refusal = tried.stderr.readline()  # the process itself exits after the thaw
            took_label = time.monotonic() - started
        finally:
            subprocess.run(["fsfreeze", "-u", folder], check=True)
            proc.wait(timeout=60)
            tried.wait(timeout=60)
    assert tried.returncode == 2
    assert refusal == (f"popsicle-py: making the file system in {folder} stalled: no progress "
                       "for 2 s (is the disk it is on hung? set TMPDIR to another)\n")
    assert took_label < 15, took_label
    notes = [e["text"] for e in events if e["event"] == "note"]
    assert (f"{folder}: a call there has not returned; popsicle-py exits once it does (when "
            "the disk it is on answers again)") in notes, notes
    results = [e for e in events if e["event"] == "result"]
    assert [(r["status"], r["cause"]) for r in results] == [("failed", "error")], results
    assert results[0]["error"] == (
        f"{drive.path}: making the file system in {folder} stalled: no progress for 2 s (is "
        "the disk it is on hung? set TMPDIR to another)")
    assert took < 15, took
    assert drive.read() == bytes([PATTERN]) * drive.size


def test_the_rules_on_plain_data() -> None:
    assert erase.default_fs(32 << 30) == "fat32" and erase.default_fs((32 << 30) + 1) == "exfat"
    assert [erase.layout(n + MiB, "fat32").fat_bits for n in (
        33 * MiB, 33 * MiB - 4096, 16 * MiB, 16 * MiB - 4096)] == [32, 16, 16, 12]
    assert erase.made(64 * MiB, "fat32") == "one FAT32 partition"
    assert erase.made(24 * MiB, "fat32") == "one FAT16 partition (too small for FAT32)"
    assert erase.made(64 * MiB, "exfat") == "one exFAT partition"
    assert erase.made(64 * MiB, "none") == "wiped only"
    part = erase.layout(100 * MiB, "fat32")
    assert (part.start, part.length, part.type_byte, part.fat_bits) == (
        MiB, 99 * MiB, 0x0C, 32)
    big = erase.layout(4 << 40, "exfat")
    assert big.length == (erase.MBR_MAX_SECTORS * 512) // 4096 * 4096
    sector = erase.mbr(part, b"\x01\x02\x03\x04")
    assert sector[510:] == b"\x55\xaa" and sector[446 + 4] == 0x0C
    assert int.from_bytes(sector[454:458], "little") == 2048
    assert erase.wipe_ranges(10 * MiB, [0x438, 5 * MiB + 17]) == [
        (0, MiB), (5 * MiB, 4096), (9 * MiB, MiB)]
    assert erase.label_problem("exfat", "x" * 16) is not None
    assert erase.label_problem("fat32", "A/B") == "--label 'A/B': a FAT label cannot hold /"
    assert erase.label_problem("exfat", "\u00e9" * 11) is None
    assert erase.label_problem("exfat", "\u00e9" * 12) is not None
    assert erase.label_problem("fat32", "A\x7f") is not None
    assert erase.clip([(MiB, 200 * MiB), (100 * MiB, MiB), (2 * MiB, MiB)], 64 * MiB) == [
        (MiB, 63 * MiB), (2 * MiB, MiB)]


def test_the_probe_finds_what_wipefs_and_partx_find(loop_factory: Callable[..., Loop]) -> None:
    """libblkid through the descriptor (O_DIRECT, as erase holds it) lists the signatures
    ``wipefs --no-act`` lists, every copy of each, and the partitions ``partx`` lists."""
    drive = loop_factory(80 * MiB)
    subprocess.run(["mkfs.vfat", drive.path], check=True, capture_output=True)
    used = used_drive(loop_factory)

    def wipefs(path: str) -> list[tuple[int, str]]:
        out = subprocess.run(["wipefs", "--no-act", "--json", path], capture_output=True,
                             text=True, check=True).stdout
        found = json.loads(out)["signatures"] if out.strip() else []
        return [(int(s["offset"], 0), s["type"]) for s in found]

    for loop in (drive, used):
        fd = os.open(loop.path, os.O_RDWR | os.O_DIRECT | os.O_EXCL)
        try:
            assert erase_probe.signatures(fd, loop.path) == wipefs(loop.path)
            partx = subprocess.run(["partx", "--raw", "--noheadings", "-o", "START,SECTORS",
                                    loop.path], capture_output=True, text=True).stdout
            assert erase_probe.partitions(fd, loop.path) == [
                (int(start) * 512, int(sectors) * 512)
                for start, sectors in (line.split() for line in partx.splitlines())]
            assert os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL)  # given back as it was
        finally:
            os.close(fd)
    assert len(wipefs(drive.path)) == 3  # FAT's three magics
    fd = os.open(used.path, os.O_RDONLY)
    try:
        assert erase_probe.signatures(fd, used.path, 8 * MiB, 16 * MiB) == [
            (8 * MiB + 0x438, "ext4")]
    finally:
        os.close(fd)


def result_line(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    summary = json.loads(result.stdout.splitlines()[-1])
    assert len(summary["results"]) == 1
    return dict(summary["results"][0])


def test_a_drive_that_drops_every_write_never_ends_ok(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    drive = faulty_drive(64 * MiB, fill=PATTERN, drop_writes_after=0)
    result = popsicle("erase", drive.path, "--yes", "--fs", "none", "--json")
    assert result.returncode == 1, result.stderr
    assert result_line(result)["status"] != "ok"
    assert drive.read(0, 2 * MiB) == bytes([PATTERN]) * 2 * MiB


def test_the_wiped_ranges_are_read_back_from_the_drive(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    """A byte of the wiped first MiB that does not read back as zero fails the drive (the
    capacity probe neither writes nor looks at it)."""
    at = 40 * 1024 + 5
    drive = faulty_drive(64 * MiB, fill=PATTERN, flip_bit=(at, 1))
    result = popsicle("erase", drive.path, "--yes", "--fs", "none", "--json")
    assert result.returncode == 1, result.stderr
    line = result_line(result)
    assert (line["status"], line["cause"]) == ("invalid", "mismatch")
    assert line["error"] == (f"{drive.path}: verification failed: byte {at} does not read "
                             "back as zeros")


def test_a_drive_whose_discard_does_not_zero_is_told_to_use_zero(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    """Said "zeros differs at byte 0": the grammar, and nothing said what to do."""
    drive = faulty_drive(64 * MiB, fill=PATTERN)  # a FUSE file: discarded blocks keep bytes
    result = popsicle("erase", drive.path, "--yes", "--discard", "--json")
    assert result.returncode == 1, result.stderr
    line = result_line(result)
    assert (line["status"], line["cause"]) == ("invalid", "mismatch")
    assert line["error"] == (
        f"{drive.path}: verification failed: byte 0 does not read back as zeros after "
        "discarding (this drive does not zero discarded blocks: use --zero instead)")


@pytest.mark.skipif(shutil.which("mkfs.exfat") is None, reason="needs exfatprogs")
def test_an_exfat_label_beyond_ascii(loop_factory: Callable[..., Loop]) -> None:
    label = "Clé \U0001f600 Été"  # 11 UTF-16 units: the emoji is two
    drive = loop_factory(40 * MiB, fill=PATTERN)
    result = popsicle("erase", drive.path, "--yes", "--fs", "exfat", "--label", label)
    assert result.returncode == 0, result.stderr
    with partition_of(drive) as part:
        out = subprocess.run(["blkid", "-p", "-s", "LABEL", "-o", "value", part],
                             capture_output=True, text=True, check=True).stdout
        assert out == label + "\n"
        fsck = subprocess.run(["fsck.exfat", "-n", part], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.skipif(shutil.which("mkfs.exfat") is None, reason="needs exfatprogs")
def test_a_bad_label_is_refused_before_an_old_file_system_is_touched(
        loop_factory: Callable[..., Loop]) -> None:
    drive = loop_factory(40 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "PRECIOUS", drive.path], check=True)
    before = drive.read()
    for fs, label in (("exfat", "MYSTICKLABEL"), ("fat32", " A"), ("fat32", "A\x01")):
        result = popsicle("erase", drive.path, "--fs", fs, "--label", label, "--yes")
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "I/O error" not in result.stderr
    assert drive.read() == before
    assert blkid(drive.path)["LABEL"] == "PRECIOUS"


@pytest.mark.skipif(shutil.which("mkfs.exfat") is None, reason="needs exfatprogs")
def test_a_mkfs_failure_is_not_the_drives_io_error(tmp_path: Path) -> None:
    part = erase.layout(40 * MiB, "exfat")
    with pytest.raises(OSError) as caught:
        erase.make_filesystem("exfat", part, "x" * 12, str(tmp_path))
    failure = failures.failure(caught.value, "/dev/sdx")
    assert failure.cause is Cause.ERROR
    assert "I/O error" not in failure.text and "failing" not in failure.text
    assert failure.text.startswith("/dev/sdx: mkfs.exfat failed: ")
    assert list(tmp_path.iterdir()) == []
    # prepare's dry run: what the tool says of a label, or of where it works
    assert erase.refused_label("exfat", "\u00e9t\u00e9", str(tmp_path)) is None
    assert (erase.refused_label("exfat", "x" * 12, str(tmp_path)) or "").startswith(
        "--label 'xxxxxxxxxxxx': mkfs.exfat failed: ")
    assert erase.refused_label("fat32", " A", str(tmp_path)) == (
        "--label ' A': mkfs.vfat failed: Label can't start with a space character")
    assert erase.refused_label("fat32", "A", str(tmp_path / "gone")) == (
        f"--fs fat32: cannot make the file system in {tmp_path / 'gone'}: No such file or "
        "directory")
    assert list(tmp_path.iterdir()) == []


def test_a_table_that_runs_past_the_drives_end_is_erased_the_first_time(
        loop_factory: Callable[..., Loop]) -> None:
    """As after dd of a bigger image onto a smaller stick: the first partition runs past the
    end, the second starts past it."""
    drive = loop_factory(64 * MiB, fill=PATTERN)
    write_mbr(str(drive.backing), [(2048, 409600), (300000, 2048)])
    subprocess.run(["blockdev", "--flushbufs", drive.path], check=True)
    result = popsicle("erase", drive.path, "--yes", "--json")
    assert result.returncode == 0, result.stderr
    assert result_line(result)["status"] == "ok"
    assert table(drive) == [(2048, drive.size // 512 - 2048, "c")]  # FAT32: it fits in 63 MiB
    with partition_of(drive) as part:
        fsck = subprocess.run(["fsck.vfat", "-n", part], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_counterfeit_stick_is_not_erased(faulty_drive: Callable[..., FaultyDrive]) -> None:
    drive = faulty_drive(64 * MiB, fill=PATTERN, wrap=16 * MiB)
    result = popsicle("erase", drive.path, "--yes", "--json")
    assert result.returncode == 1, result.stderr
    line = result_line(result)
    assert (line["status"], line["cause"]) == ("failed", "counterfeit")
    assert line["error"] == (f"{drive.path}: counterfeit: claims {format_size(64 * MiB)}, "
                             f"holds about {format_size(16 * MiB)}")
    assert not drive.ever_written(0, 64 << 10)  # only the probe's stamps, never the wipe
