"""``popsicle-py read DEVICE OUTPUT`` (issue 28): a drive read once into an image file.

Real loop devices with real file systems; the results are checked with the tools a user has
(zstd, xz, gzip, sha256sum, bmaptool) and with our own flash.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import select
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, events_until_summary, needs_root, popsicle_cmd, waits_in_kernel
from loopdev import DROP_OTHER_TESTS_MOUNTS, mounted_elsewhere, mounted_ext4, write_mbr

from popsicle_py import reading
from popsicle_py.blockdev import OpenSpec, open_for_reading
from popsicle_py.images.checksums import find_sidecar

MiB = 1 << 20

pytestmark = needs_root


def popsicle(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, check=False)


def events_of(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def fat_drive(loop_factory: Callable[..., Loop], size: int = 16 * MiB) -> Loop:
    """A drive with a FAT file system holding a random file (mtools), zeros elsewhere."""
    drive = loop_factory(size)
    subprocess.run(["mkfs.vfat", "-n", "STICK", drive.path], check=True, capture_output=True)
    payload = Path(f"/dev/shm/popsicle-payload-{os.getpid()}")
    payload.write_bytes(os.urandom(3 * MiB))
    try:
        subprocess.run(["mcopy", "-i", drive.path, str(payload), "::/data.bin"], check=True,
                       capture_output=True)
    finally:
        payload.unlink()
    return drive


def partitioned(loop_factory: Callable[..., Loop], fs: Path, size: int) -> Loop:
    """A drive of ``size`` bytes with one MBR partition at 1 MiB holding the file system ``fs``."""
    drive = loop_factory(size)
    write_mbr(str(drive.backing), [(2048, fs.stat().st_size // 512)])
    with open(drive.backing, "r+b") as f:
        f.seek(MiB)
        f.write(fs.read_bytes())
    subprocess.run(["blockdev", "--flushbufs", drive.path], check=True)
    return drive


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def read_sectors(loop: Loop) -> int:
    major, minor = loop.major_minor
    return int(Path(f"/sys/dev/block/{major}:{minor}/stat").read_text().split()[2])


DECODERS = {".zst": ["zstd", "-dc"], ".xz": ["xz", "-dc"], ".gz": ["gzip", "-dc"],
            ".img": ["cat"]}


@pytest.mark.parametrize("suffix", [".zst", ".xz", ".gz", ".img"])
def test_read_writes_the_drive_compressed_by_suffix_with_its_sha256(
        loop_factory: Callable[..., Loop], tmp_path: Path, suffix: str) -> None:
    drive = fat_drive(loop_factory)
    out = tmp_path / f"stick{suffix}"
    before = read_sectors(drive)
    result = popsicle("read", drive.path, out, "--json")
    assert result.returncode == 0, result.stderr
    assert (read_sectors(drive) - before) * 512 == drive.size  # once, O_DIRECT, no more
    decoded = subprocess.run([*DECODERS[suffix], str(out)], capture_output=True,
                             check=True).stdout
    assert decoded == drive.read()
    if suffix in (".zst", ".xz"):  # a check of its own, so flash never warns it lacks one
        listed = subprocess.run([DECODERS[suffix][0], "-lv", str(out)], capture_output=True,
                                text=True, check=True).stdout
        assert ("XXH64" if suffix == ".zst" else "CRC64") in listed, listed
    check = subprocess.run(["sha256sum", "-c", out.name + ".sha256"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout == f"{out.name}: OK\n", check
    evs = events_of(result.stdout)
    assert evs[0]["event"] == "note" and evs[0]["text"].startswith(f"reading {drive.path} ")
    assert {"event": "phase", "device": drive.path, "phase": "reading"}.items() <= \
        evs[1].items()
    progress = [e for e in evs if e["event"] == "progress"]
    assert progress[-1]["bytes"] == progress[-1]["total"] == drive.size
    summary = evs[-1]
    assert summary["event"] == "summary" and summary["results"][0]["status"] == "ok"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", [b"\xff.img", b"a\nb\\c.img"], ids=["not-utf8", "newline"])
def test_any_output_name_gets_a_sidecar_sha256sum_and_flash_read(
        loop_factory: Callable[..., Loop], tmp_path: Path, name: bytes) -> None:
    """A name that is not UTF-8 read the whole drive and then failed ("unexpected error"),
    and a name with a newline got a sidecar sha256sum could not parse: the sidecar holds the
    name's own bytes, escaped as GNU sha256sum escapes them."""
    drive = loop_factory(4 * MiB)
    with open(drive.backing, "r+b") as f:
        f.write(os.urandom(4 * MiB))
    out = tmp_path / os.fsdecode(name)
    result = popsicle("read", drive.path, out, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert events_of(result.stdout)[-1]["results"][0]["status"] == "ok"
    check = subprocess.run(["sha256sum", "-c", os.fsencode(out) + b".sha256"],
                           cwd=tmp_path, capture_output=True)
    assert check.returncode == 0 and check.stdout.endswith(b": OK\n"), check
    found = find_sidecar(str(out))
    assert found is not None
    assert found.hexdigest == hashlib.sha256(drive.read()).hexdigest()
    assert leftovers(tmp_path) == []


def test_bmap_of_a_dirty_fat_says_why_its_free_blocks_are_kept(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A FAT not cleanly unmounted is not trusted, and its free blocks are mapped all the
    same: said in a note (it was silent, so a map larger than expected had no reason given)."""
    drive = fat_drive(loop_factory)
    with open(drive.path, "r+b") as f:  # Linux's "dirty" state flag (FAT16 boot sector)
        f.seek(0x25)
        f.write(b"\x01")
    out = tmp_path / "stick.img"
    result = popsicle("read", drive.path, out, "--bmap", "--json")
    assert result.returncode == 0, result.stderr
    notes = [e["text"] for e in events_of(result.stdout) if e["event"] == "note"]
    assert ("block map: the drive: it was not cleanly unmounted (marked dirty; fsck.fat has "
            "not repaired it): every block kept") in notes, notes


def test_bmap_is_bmaptools_and_flash_uses_it(loop_factory: Callable[..., Loop],
                                            tmp_path: Path) -> None:
    drive = fat_drive(loop_factory)
    out = tmp_path / "stick.img.zst"
    result = popsicle("read", drive.path, out, "--bmap")
    assert result.returncode == 0, result.stderr
    bmap = tmp_path / "stick.img.bmap"  # where bmaptool looks: the name without .zst
    text = bmap.read_text()
    assert "<MappedBlocksCount>" in text
    mapped = int(text.split("<MappedBlocksCount>")[1].split("<")[0])
    assert 3 * MiB // 4096 <= mapped < drive.size // 4096 // 2  # the file, not the zeros
    copy = tmp_path / "copy.img"
    with open(copy, "wb") as f:
        f.truncate(drive.size)
    run = subprocess.run(["bmaptool", "copy", str(out), str(copy)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert f"discovered bmap file '{bmap}'" in run.stderr
    assert copy.read_bytes() == drive.read()  # unmapped blocks were zeros
    target = loop_factory(drive.size, fill=0x5A)
    result = popsicle("flash", out, target.path, "--yes")
    assert result.returncode == 0, result.stderr
    assert f"block map {bmap}" in result.stdout + result.stderr
    data, written = drive.read(), target.read()
    for line in text.split("<BlockMap>")[1].splitlines():
        if "<Range" not in line:
            continue
        span = line.split(">")[1].split("<")[0].strip()
        first, _, last = span.partition("-")
        start, end = int(first) * 4096, (int(last or first) + 1) * 4096
        assert written[start:end] == data[start:end]


def test_bmap_leaves_out_the_free_blocks_of_a_clean_ext4(loop_factory: Callable[..., Loop],
                                                         tmp_path: Path) -> None:
    """Deleted data in free blocks is not copied, and the copy is still a sound file system."""
    files = tmp_path / "files"
    files.mkdir()
    payload = os.urandom(2 * MiB)
    (files / "data.bin").write_bytes(payload)
    fs = tmp_path / "fs.img"
    fs.write_bytes(os.urandom(60 * MiB))  # old bytes everywhere, as on a used stick
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-d", str(files), str(fs)],
                   check=True)
    drive = partitioned(loop_factory, fs, 64 * MiB)
    out = tmp_path / "stick.img.zst"
    result = popsicle("read", drive.path, out, "--bmap")
    assert result.returncode == 0, result.stderr
    assert "block map: free blocks left out, as the file systems say (partition 1: ext4, " \
        in result.stdout
    text = (tmp_path / "stick.img.bmap").read_text()
    mapped = int(text.split("<MappedBlocksCount>")[1].split("<")[0])
    assert 2 * MiB // 4096 < mapped < 12 * MiB // 4096, mapped  # not the 60 MiB of old bytes
    copy = tmp_path / "copy.img"
    copy.write_bytes(bytes([0x5A]) * drive.size)  # what the free blocks hold there: other
    run = subprocess.run(["bmaptool", "copy", str(out), str(copy)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    where = f"{copy}?offset={MiB}"
    check = subprocess.run(["e2fsck", "-fn", where], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    subprocess.run(["debugfs", "-R", f"dump /data.bin {tmp_path / 'back.bin'}", where],
                   check=True, capture_output=True)
    assert (tmp_path / "back.bin").read_bytes() == payload


def test_bmap_leaves_out_the_free_clusters_of_a_fat_file_system(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A deleted file's clusters (old data) are not copied; the copy is a sound FAT volume."""
    fs = tmp_path / "fs.img"
    fs.write_bytes(os.urandom(40 * MiB))  # old bytes everywhere, as on a used stick
    subprocess.run(["mkfs.vfat", "-F", "32", "-n", "STICK", str(fs)], check=True,
                   capture_output=True)
    kept, gone = tmp_path / "kept.bin", tmp_path / "gone.bin"
    kept.write_bytes(os.urandom(2 * MiB))
    gone.write_bytes(os.urandom(20 * MiB))
    for name in (kept, gone):
        subprocess.run(["mcopy", "-i", str(fs), str(name), f"::/{name.name}"], check=True,
                       capture_output=True)
    subprocess.run(["mdel", "-i", str(fs), "::/gone.bin"], check=True, capture_output=True)
    drive = partitioned(loop_factory, fs, 48 * MiB)
    out = tmp_path / "stick.img.zst"
    result = popsicle("read", drive.path, out, "--bmap")
    assert result.returncode == 0, result.stderr
    assert "(partition 1: FAT32, " in result.stdout
    text = (tmp_path / "stick.img.bmap").read_text()
    mapped = int(text.split("<MappedBlocksCount>")[1].split("<")[0])
    # not the deleted 20 MiB (the drive's first and last MiB are mapped whole)
    assert 2 * MiB // 4096 < mapped < 6 * MiB // 4096, mapped
    copy = tmp_path / "copy.img"
    copy.write_bytes(bytes([0x5A]) * drive.size)
    run = subprocess.run(["bmaptool", "copy", str(out), str(copy)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    volume = tmp_path / "volume.img"
    with open(copy, "rb") as f:
        f.seek(MiB)
        volume.write_bytes(f.read(40 * MiB))
    check = subprocess.run(["fsck.vfat", "-n", str(volume)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    back = tmp_path / "back.bin"
    subprocess.run(["mcopy", "-i", str(volume), "::/kept.bin", str(back)], check=True,
                   capture_output=True)
    assert back.read_bytes() == kept.read_bytes()


def test_the_plain_result_says_read_not_written(loop_factory: Callable[..., Loop],
                                                tmp_path: Path) -> None:
    drive = fat_drive(loop_factory)
    result = popsicle("read", drive.path, tmp_path / "stick.img")
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith(f"{drive.path}: ok"))
    assert re.fullmatch(rf"{drive.path}: ok \(16 MiB read, [0-9.]+ [KMG]iB/s\)", line), line


def test_an_existing_output_is_refused_unless_force(loop_factory: Callable[..., Loop],
                                                   tmp_path: Path) -> None:
    drive = fat_drive(loop_factory)
    out = tmp_path / "stick.img"
    out.write_bytes(b"precious")
    result = popsicle("read", drive.path, out)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"popsicle-py: {out} exists; --force replaces it\n"
    assert out.read_bytes() == b"precious"
    result = popsicle("read", drive.path, out, "--force")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == drive.read()


@pytest.mark.parametrize("suffix", [".bz2", ".zip", ".7z", ".lz4"])
def test_an_output_named_for_a_compression_not_written_is_refused(
        suffix: str, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Never a raw image under a name that says otherwise (before: "ok" and a raw file that
    bunzip2 refuses)."""
    drive = fat_drive(loop_factory)
    out = tmp_path / f"stick.img{suffix}"
    result = popsicle("read", drive.path, out)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"popsicle-py: {out} ends in {suffix}, which read does not write: "
                             "end it in .zst, .xz or .gz to compress, or .img for a raw copy\n")
    assert list(tmp_path.iterdir()) == []


def test_an_output_name_too_long_is_one_line(loop_factory: Callable[..., Loop],
                                            tmp_path: Path) -> None:
    drive = fat_drive(loop_factory)
    out = tmp_path / ("a" * 300 + ".img")
    result = popsicle("read", drive.path, out)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"popsicle-py: {out} cannot be written: File name too long\n"
    assert list(tmp_path.iterdir()) == []


def test_a_symlink_as_output_is_replaced_never_followed(loop_factory: Callable[..., Loop],
                                                       tmp_path: Path) -> None:
    drive = fat_drive(loop_factory)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "stick.img"
    out.symlink_to(victim)
    assert popsicle("read", drive.path, out).returncode == 2
    result = popsicle("read", drive.path, out, "--force")
    assert result.returncode == 0, result.stderr
    assert not out.is_symlink() and out.read_bytes() == drive.read()
    assert victim.read_bytes() == b"precious"


@pytest.fixture
def mount_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def test_an_empty_output_name_gets_one_clear_line(loop_factory: Callable[..., Loop],
                                                  tmp_path: Path) -> None:
    """``read DEV ''`` (an unset shell variable): not "is a directory" for the current one."""
    drive = loop_factory(4 * MiB)
    result = subprocess.run([*popsicle_cmd(), "read", drive.path, ""], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("popsicle-py: the output's name is empty (an unset variable?); "
                             "name a file such as stick.img.zst\n"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_on_the_drive_being_read_is_refused(loop_factory: Callable[..., Loop],
                                                  mount_dir: Path) -> None:
    drive = loop_factory(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", drive.path], check=True)
    subprocess.run(["mount", drive.path, str(mount_dir)], check=True)
    result = popsicle("read", drive.path, mount_dir / "self.img.zst")
    assert result.returncode == 2, result.stderr
    assert (f"{mount_dir}/self.img.zst is on {drive.path}, the drive being read; write it "
            "elsewhere") in result.stderr
    assert f"{drive.path} is mounted read-write at {mount_dir}" in result.stderr
    assert sorted(p.name for p in mount_dir.iterdir()) == ["lost+found"]


def test_a_drive_mounted_read_write_in_a_container_is_refused(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Mounted read-write only inside ``unshare -m`` (a container): its bytes could change
    mid-read just the same, so it is refused, naming where."""
    drive = loop_factory(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", drive.path], check=True)
    mountpoint = tmp_path / "inside"
    with mounted_elsewhere(drive.path, mountpoint, read_only=False) as proc:
        out = tmp_path / "x.img"
        result = popsicle("read", drive.path, out)
        assert result.returncode == 2, result.stderr
        assert (f"{drive.path} is mounted read-write at {mountpoint} in the mount namespace "
                f"of pid {proc.pid}") in result.stderr, result.stderr
        assert not out.exists()


def test_a_drive_mounted_in_a_namespace_no_process_is_in_is_refused(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A mount namespace kept only by a bind mount of its nsfs file: no process's table shows
    the read-write mount, but the kernel's exclusive open does."""
    drive = loop_factory(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", drive.path], check=True)
    keep, inside = tmp_path / "ns", tmp_path / "inside"
    keep.mkdir()
    inside.mkdir()
    subprocess.run(["mount", "--bind", str(keep), str(keep)], check=True)
    try:
        subprocess.run(["mount", "--make-private", str(keep)], check=True)
        (keep / "mnt").touch()
        subprocess.run(["unshare", f"--mount={keep / 'mnt'}", "--propagation", "private", "sh",
                        "-c", DROP_OTHER_TESTS_MOUNTS + f"mount {drive.path} {inside}"],
                       check=True)
        out = tmp_path / "x.img"
        result = popsicle("read", drive.path, out)
        assert result.returncode == 2, result.stderr
        assert f"{drive.path} is held exclusively" in result.stderr, result.stderr
        assert not out.exists()
    finally:
        subprocess.run(["umount", str(keep / "mnt")], check=False)
        subprocess.run(["umount", "-l", str(keep)], check=False)


def test_a_drive_open_for_writing_is_refused(loop_factory: Callable[..., Loop],
                                            tmp_path: Path) -> None:
    drive = fat_drive(loop_factory)
    holder = subprocess.Popen(["sh", "-c", f"exec 3<>{drive.path}; echo ready; exec sleep 60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        result = popsicle("read", drive.path, tmp_path / "x.img")
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr
    assert f"{drive.path} is open for writing by sleep (pid {holder.pid})" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_room_is_refused_early_when_known_and_fails_cleanly_when_not(
        loop_factory: Callable[..., Loop], mount_dir: Path) -> None:
    drive = loop_factory(16 * MiB)
    with open(drive.backing, "r+b") as f:
        f.write(os.urandom(16 * MiB))  # incompressible
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount_dir)],
                   check=True)
    result = popsicle("read", drive.path, mount_dir / "big.img")
    assert result.returncode == 2, result.stderr
    assert f"not enough room for {mount_dir}/big.img: 16 MiB needed" in result.stderr
    result = popsicle("read", drive.path, mount_dir / "big.img.gz", "--json")
    assert result.returncode == 1, result.stderr
    r = events_of(result.stdout)[-1]["results"][0]
    assert r["status"] == "failed" and r["cause"] == "no-space", r
    assert isinstance(r["elapsed"], float), r  # as README says of every result
    assert r["error"].startswith(f"{mount_dir}/big.img.gz: ")
    assert list(mount_dir.iterdir()) == []


def test_ctrl_c_leaves_no_output(loop_factory: Callable[..., Loop], throttle: Callable[..., Any],
                                 tmp_path: Path) -> None:
    drive = fat_drive(loop_factory, 32 * MiB)
    add = throttle((drive, 4 * MiB))
    out = tmp_path / "stick.img.zst"
    proc = subprocess.Popen([*popsicle_cmd(), "read", drive.path, str(out), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "progress":
            proc.send_signal(signal.SIGINT)
            break
    out_text, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    r = json.loads(out_text.splitlines()[-1])["results"][0]
    assert r["status"] == "cancelled" and isinstance(r["elapsed"], float), r
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".img", ".img.zst"])
def test_ctrl_c_twice_leaves_no_partial_image(loop_factory: Callable[..., Loop],
                                             throttle: Callable[..., Any], tmp_path: Path,
                                             suffix: str) -> None:
    """The second Ctrl-C quits at once (os._exit), past the code that removes the temporary
    file: a hidden .part as large as the drive was left beside OUTPUT.  It is removed first."""
    drive = fat_drive(loop_factory, 32 * MiB)
    add = throttle((drive, 4 * MiB))
    proc = subprocess.Popen([*popsicle_cmd(), "read", drive.path, str(tmp_path / f"x{suffix}"),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "progress":
            break
    assert leftovers(tmp_path), list(tmp_path.iterdir())  # the partial image is there
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # heard (a second signal sent before is merged into the first)
        if "SIGINT: stopping" in line:
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    # 130, or SIGINT's own death when the run had ended first (its handlers put back)
    assert proc.returncode in (130, -signal.SIGINT)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_xz_compresses_is_heard_at_once(loop_factory: Callable[..., Loop],
                                                     tmp_path: Path) -> None:
    """xz took a whole 8 MiB bucket at a time on the main thread: on incompressible bytes
    Ctrl-C waited 3.5 to 7 s for it.  The main thread only watches now, and xz is fed in
    pieces of 1 MiB: the shell is back within a second or two."""
    drive = loop_factory(64 * MiB)
    with open(drive.backing, "r+b") as f:
        f.write(os.urandom(64 * MiB))
    proc = subprocess.Popen([*popsicle_cmd(), "read", drive.path, str(tmp_path / "x.img.xz"),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "progress":
            break
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out_text, _ = proc.communicate(timeout=60)
    took = time.monotonic() - signalled
    assert proc.returncode == 130
    assert json.loads(out_text.splitlines()[-1])["results"][0]["status"] == "cancelled"
    assert took < 2, took
    assert list(tmp_path.iterdir()) == []


def written_while_read(drive: Loop, add: Callable[[int], None], args: list[str | Path],
                       when: Callable[[str], bool], offset: int, *, synced: bool = True
                       ) -> tuple[int, str, str]:
    """Run ``read`` (``add`` throttles it) and write 4 KiB at ``offset`` of the drive once
    ``when(line)`` says so: through the page cache, fsync'ed or not (``synced``).  Returns
    the exit status, stdout and stderr."""
    proc = subprocess.Popen([*popsicle_cmd(), "read", drive.path, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, preexec_fn=lambda: add(os.getpid()),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        if when(line):
            fd = os.open(drive.path, os.O_WRONLY)
            try:
                os.pwrite(fd, b"changed!" * 512, offset)
                if synced:
                    os.fsync(fd)
            finally:
                os.close(fd)
            break
    out_text, err = proc.communicate(timeout=60)
    return proc.returncode, out_text, err


def progressed(line: str) -> bool:
    return bool(json.loads(line)["event"] == "progress")


def test_a_drive_written_while_it_is_read_leaves_no_output(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any], tmp_path: Path) -> None:
    drive = fat_drive(loop_factory, 32 * MiB)
    status, out_text, err = written_while_read(
        drive, throttle((drive, 4 * MiB)), [tmp_path / "stick.img.zst", "--json"], progressed,
        30 * MiB)
    assert status == 1, err
    r = json.loads(out_text.splitlines()[-1])["results"][0]
    assert r["status"] == "failed" and r["cause"] == "source", r
    assert f"{drive.path} changed while it was read" in r["error"]
    assert list(tmp_path.iterdir()) == []


def test_names_of_the_files_beside_output() -> None:
    assert reading.format_for("a.IMG.ZST") == "zstd"
    assert reading.format_for("a.img") == "raw"
    assert reading.bmap_path_for("/x/disk.img.zst") == "/x/disk.img.bmap"
    assert reading.bmap_path_for("/x/disk.img") == "/x/disk.img.bmap"
    assert reading.sidecar_path_for("/x/disk.img.xz") == "/x/disk.img.xz.sha256"


def test_free_ranges_become_a_mask_of_whole_blocks() -> None:
    from popsicle_py import fsmap

    mask = fsmap.free_mask([(4096 + 1, 3 * 4096), (8 * 4096, 4096)], 10 * 4096, 4096)
    assert list(mask) == [0, 0, 1, 1, 0, 0, 0, 0, 1, 0]  # only whole blocks


def test_the_map_leaves_zero_blocks_out_and_hashes_each_range() -> None:
    import hashlib

    data = bytearray(16 * 4096)
    data[4096:4100] = b"abcd"  # block 1
    data[3 * 4096] = 1  # blocks 3-4
    data[4 * 4096 + 5] = 2
    data[15 * 4096 + 1] = 3  # the last block
    mapper = reading.Mapper()
    mapper.feed(0, memoryview(bytes(data[: 8 * 4096])))
    mapper.feed(8 * 4096, memoryview(bytes(data[8 * 4096:])))
    ranges = mapper.finish(len(data))
    assert [(a, b) for a, b, _ in ranges] == [(1, 1), (3, 4), (15, 15)]
    assert ranges[1][2] == hashlib.sha256(data[3 * 4096: 5 * 4096]).hexdigest()
    text = reading.render_bmap(len(data), 4096, ranges)
    from popsicle_py.bmap import parse

    parsed = parse(text)  # its own checksum checks
    assert [(e.offset, e.length) for e in parsed.extents] == [
        (4096, 4096), (3 * 4096, 2 * 4096), (15 * 4096, 4096)]


def output_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name in ("popsicle-output", "popsicle-encode") and t.is_alive()]


def nothing_writes_after(sink: reading.Sink, out: Path, elsewhere: Path) -> None:
    """read_drive returned and the sink is closed: no write reaches a file opened since under
    the same number, and OUTPUT gets at most the one write call under way, up to the end of
    every thread of the read (waited for)."""
    sink.close()
    size = out.stat().st_size
    other = elsewhere / "other"
    fd = os.open(other, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        for thread in output_threads():
            thread.join(60)
        assert output_threads() == []
        assert size <= out.stat().st_size <= size + reading.WRITE_CALL
        assert other.stat().st_size == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", ["raw", "gzip", "xz", "zstd"])
def test_a_full_output_raises_no_space_and_nothing_writes_after(
        loop_factory: Callable[..., Loop], mount_dir: Path, tmp_path: Path, fmt: str) -> None:
    """The output's error reaches the caller however the output is written (on the encoding
    thread or the spool's), and once read_drive returns and the caller closed the sink,
    nothing writes to the descriptor (a late write could reach a file opened since under
    its number)."""
    drive = loop_factory(16 * MiB)
    with open(drive.backing, "r+b") as f:
        f.write(os.urandom(16 * MiB))  # incompressible
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount_dir)],
                   check=True)
    out = mount_dir / "out"
    sink = reading.Sink(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    device = open_for_reading(OpenSpec(drive.path, drive.size))
    try:
        with pytest.raises(OSError) as err:
            reading.read_drive(device, drive.size, reading.encoder(fmt, sink, drive.size),
                               sink, bucket=1 * MiB)
        assert err.value.errno == errno.ENOSPC
        nothing_writes_after(sink, out, tmp_path)
    finally:
        device.close()
        sink.close()


@pytest.mark.parametrize("fmt", ["raw", "gzip", "xz", "zstd"])
def test_stopping_returns_none_and_nothing_writes_after(
        loop_factory: Callable[..., Loop], tmp_path: Path, fmt: str) -> None:
    drive = loop_factory(16 * MiB)
    with open(drive.backing, "r+b") as f:
        f.write(os.urandom(16 * MiB))
    out = tmp_path / "out"
    sink = reading.Sink(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    device = open_for_reading(OpenSpec(drive.path, drive.size))
    seen: list[int] = []
    try:
        done = reading.read_drive(device, drive.size, reading.encoder(fmt, sink, drive.size),
                                  sink, bucket=1 * MiB, progress=seen.append,
                                  stopped=lambda: len(seen) >= 2)
        assert done is None
        nothing_writes_after(sink, out, tmp_path)
        assert out.stat().st_size < drive.size
    finally:
        device.close()
        sink.close()


def test_the_terminal_table_says_read_not_written(loop_factory: Callable[..., Loop],
                                                 tmp_path: Path) -> None:
    from test_cli import run_in_pty, screen_lines

    drive = fat_drive(loop_factory)
    status, output = run_in_pty(["read", drive.path, str(tmp_path / "stick.img")])
    assert status == 0, output
    lines = screen_lines(output)
    header = next(x for x in lines if "Drive" in x and "Result" in x)
    assert "Read" in header and "Written" not in header, header
    row = next(x for x in lines if x.startswith("│") and drive.path in x)
    assert re.search(r"\bok\b.*16 MiB.*\bread\b", row) and "written" not in row, row


# --------------------------------------------------------------------------------------------
# Session 10's review: an old map, a buffered write, a slow drive, nodes, an unwritable folder


def test_an_old_block_map_beside_output_is_refused_and_force_removes_it(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """flash trusts the map it finds beside an image: an old one beside a new image would
    leave the new image's other blocks unwritten, and flash would say ok."""
    drive = loop_factory(32 * MiB)
    with open(drive.backing, "r+b") as f:
        f.write(os.urandom(8 * MiB))  # zeros after
    assert popsicle("read", drive.path, tmp_path / "y.img.gz", "--bmap").returncode == 0
    old_map = tmp_path / "y.img.bmap"
    assert old_map.exists()
    with open(drive.backing, "r+b") as f:
        f.seek(16 * MiB)
        f.write(os.urandom(4 * MiB))  # data where the old map says zeros
    subprocess.run(["blockdev", "--flushbufs", drive.path], check=True)
    out = tmp_path / "y.img.zst"
    result = popsicle("read", drive.path, out)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"popsicle-py: {old_map} exists: flash would take that old block "
                             "map for y.img.zst; --force removes it\n")
    assert not out.exists() and leftovers(tmp_path) == []
    result = popsicle("read", drive.path, out, "--force")
    assert result.returncode == 0, result.stderr
    assert not old_map.exists()
    target = loop_factory(drive.size, fill=0x5A)
    result = popsicle("flash", out, target.path, "--yes")
    assert result.returncode == 0, result.stderr
    assert "block map" not in result.stdout + result.stderr
    assert target.read() == drive.read()


def test_a_map_under_the_compressed_name_is_refused_beside_a_new_map(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """flash looks for OUTPUT.bmap before the map read writes (the name without .zst)."""
    drive = fat_drive(loop_factory)
    shadow = tmp_path / "s.img.zst.bmap"
    shadow.write_text("an old map")
    out = tmp_path / "s.img.zst"
    result = popsicle("read", drive.path, out, "--bmap")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"popsicle-py: {shadow} exists: flash would take that old block "
                             "map for s.img.zst; --force removes it\n")
    result = popsicle("read", drive.path, out, "--bmap", "--force")
    assert result.returncode == 0, result.stderr
    assert not shadow.exists() and (tmp_path / "s.img.bmap").exists()


@pytest.mark.parametrize("args", [(), ("--force",), ("--bmap", "--force")],
                         ids=["plain", "force", "bmap-force"])
def test_another_images_block_map_is_never_taken_nor_removed(
        loop_factory: Callable[..., Loop], tmp_path: Path, args: tuple[str, ...]) -> None:
    """backup.img.bmap belongs to backup.img beside it, and flash would take it for
    backup.img.zst too: refused whatever --force says (before: --force removed it, or
    --bmap --force replaced it, and backup.img lost its own map)."""
    drive = fat_drive(loop_factory)
    raw = tmp_path / "backup.img"
    assert popsicle("read", drive.path, raw, "--bmap").returncode == 0
    its_map = tmp_path / "backup.img.bmap"
    kept = its_map.read_bytes()
    result = popsicle("read", drive.path, tmp_path / "backup.img.zst", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"popsicle-py: {its_map} is the block map of {raw}, and flash "
                             "would take it for backup.img.zst too: give OUTPUT another "
                             "name\n")
    assert its_map.read_bytes() == kept
    assert not (tmp_path / "backup.img.zst").exists()


def test_a_drive_written_through_the_page_cache_while_it_is_read_leaves_no_output(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any], tmp_path: Path) -> None:
    """A buffered write (dd without oflag=direct) into what was already read is in the page
    cache only, uncounted by the kernel until written back: the check writes it back first."""
    drive = fat_drive(loop_factory, 32 * MiB)
    status, out_text, err = written_while_read(  # the first 8 MiB are read: write in them
        drive, throttle((drive, 4 * MiB)), [tmp_path / "stick.img.zst", "--json"], progressed,
        8192, synced=False)
    assert status == 1, err
    r = json.loads(out_text.splitlines()[-1])["results"][0]
    assert r["status"] == "failed" and r["cause"] == "source", r
    assert f"{drive.path} changed while it was read" in r["error"]
    assert list(tmp_path.iterdir()) == []


def test_a_slow_drive_that_keeps_reading_is_not_stalled(
        faulty_drive: Callable[..., Any], tmp_path: Path) -> None:
    """The stall rule is less than 1 MiB in --stall-timeout, counted as the bytes come, not per
    8 MiB bucket: 5 MiB at 1 MiB/s with a 3 s timeout is read to its end."""
    drive = faulty_drive(5 * MiB, fill=0x5A, crawl=(0, MiB))
    out = tmp_path / "slow.img"
    result = popsicle("read", drive.path, out, "--stall-timeout", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.read_bytes() == drive.read(0, 5 * MiB)


def test_a_drive_that_stops_answering_is_failed_on_time(
        faulty_drive: Callable[..., Any], tmp_path: Path) -> None:
    drive = faulty_drive(4 * MiB, fill=0x5A, crawl=(2 * MiB, 4096, 3 * MiB))
    out = tmp_path / "stuck.img"
    proc = subprocess.Popen([*popsicle_cmd(), "read", drive.path, str(out), "--json",
                             "--stall-timeout", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    notes = []
    try:
        started = None
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "phase" and started is None:
                started = time.monotonic()
            if event["event"] == "note":
                notes.append(event["text"])
            if event["event"] == "summary":
                break
        assert started is not None
        took = time.monotonic() - started
    finally:
        drive.clear()  # the request left in the kernel returns; the process can end
        proc.communicate(timeout=60)
    assert proc.returncode == 1
    r = event["results"][0]
    assert r["status"] == "failed" and r["error"].startswith(f"{drive.path}: stalled: "), r
    assert 2 <= took < 12, took  # 1 KiB/s would need minutes for the next MiB
    assert list(tmp_path.iterdir()) == []
    # The process outlives the summary (the read left in the kernel): it says so, as flash.
    assert any(n.startswith(f"{drive.path}: a read or write to this drive has not returned")
               for n in notes), notes


def test_a_read_error_says_which_bytes(faulty_drive: Callable[..., Any],
                                      tmp_path: Path) -> None:
    """An unreadable block said only "I/O error" (flash says which bytes): the range of the
    read that failed is named, and it holds the bad block."""
    bad = 20 * MiB
    drive = faulty_drive(32 * MiB, fill=0x22, bad_read=(bad, bad + 4096))
    result = popsicle("read", drive.path, tmp_path / "bad.img", "--json")
    assert result.returncode == 1, result.stderr
    r = events_of(result.stdout)[-1]["results"][0]
    assert r["status"] == "failed" and r["cause"] == "io-error", r
    m = re.search(r"\(reading bytes (\d+)-(\d+)\)", r["error"])
    assert m is not None, r["error"]
    assert int(m[1]) <= bad < bad + 4096 <= int(m[2]) + 1, r["error"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("what", ["device node", "symlink to a device", "fifo as sidecar"])
def test_an_output_that_is_not_a_file_is_refused_even_with_force(
        what: str, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """``read /dev/sdb /dev/sdc --force`` must never replace the node /dev/sdc with a file."""
    drive = fat_drive(loop_factory)
    other = loop_factory(8 * MiB)
    out = tmp_path / "node"
    named = out
    if what == "device node":
        os.mknod(out, 0o600 | stat.S_IFBLK, os.makedev(*other.major_minor))
        line = f"{out} is a block device: read replaces only files"
    elif what == "symlink to a device":
        out.symlink_to(other.path)
        line = f"{out} is a symlink to a block device: read replaces only files"
    else:
        named = tmp_path / "node.sha256"
        os.mkfifo(named)
        line = f"{named} is a FIFO: read replaces only files"
    kind = os.lstat(named).st_mode
    result = popsicle("read", drive.path, out, "--force")
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"popsicle-py: {line}\n"
    assert os.lstat(named).st_mode == kind
    assert leftovers(tmp_path) == []


def test_an_output_directory_that_is_read_only_is_refused(
        loop_factory: Callable[..., Loop], mount_dir: Path) -> None:
    drive = fat_drive(loop_factory)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64M", "tmpfs", str(mount_dir)],
                   check=True)
    before = read_sectors(drive)
    out = mount_dir / "stick.img.zst"
    result = popsicle("read", drive.path, out)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"popsicle-py: {out} cannot be written: Read-only file system\n"
    assert read_sectors(drive) - before < drive.size // 512  # not read


def test_an_output_name_too_long_for_its_temporary_files_is_refused(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """OUTPUT fits (244 characters) but .OUTPUT.sha256.xxxxxxxx.part does not."""
    drive = fat_drive(loop_factory)
    out = tmp_path / ("a" * 240 + ".img")
    result = popsicle("read", drive.path, out)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"popsicle-py: {out} cannot be written: its name is too long for "
                             "the temporary files read writes beside it; shorten it to 233 "
                             "characters or less\n")
    assert list(tmp_path.iterdir()) == []
    short = tmp_path / ("a" * 229 + ".img")  # 233: it fits
    result = popsicle("read", drive.path, short)
    assert result.returncode == 0, result.stderr
    assert short.read_bytes() == drive.read()


def test_a_drive_changed_while_it_is_read_is_not_called_a_failed_image(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any], tmp_path: Path) -> None:
    """read has no image to blame: the summary says what happened to the drive."""
    drive = fat_drive(loop_factory, 32 * MiB)
    status, out_text, err = written_while_read(
        drive, throttle((drive, 4 * MiB)), [tmp_path / "s.img"],
        lambda line: line == f"{drive.path}: reading\n", 30 * MiB)
    assert status == 1, err
    assert out_text.splitlines()[-1] == (f"finished with problems: 0 of 1 drives ok; not ok: "
                                         f"#1 {drive.path} failed (changed while it was read)")




@pytest.mark.parametrize("suffix,sigint", [(".img", False), (".img.zst", False),
                                           (".img.gz", True), (".img", True)])
def test_an_output_whose_file_system_stops_answering_fails_on_time(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any], suffix: str,
        sigint: bool) -> None:
    """OUTPUT's file system frozen mid-read (as a hung disk or share would be): the writes
    were on no stall clock and the main thread waited in them, so the read hung for good,
    Ctrl-C unheard.  Now the drive fails after the stall timeout, naming OUTPUT's directory
    (or Ctrl-C ends it at once), with a note that the exit waits for the file system; once
    it answers, the process ends and no partial file is left."""
    store = loop_factory(64 * MiB)
    drive = loop_factory(48 * MiB)
    with open(drive.backing, "r+b") as f:
        f.write(os.urandom(48 * MiB))
    add = throttle((drive, 4 * MiB))
    with mounted_ext4(store.path) as folder:
        out = os.path.join(folder, f"o{suffix}")
        proc = subprocess.Popen([*popsicle_cmd(), "read", drive.path, out, "--json",
                                 "--stall-timeout", "2"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: add(os.getpid()))
        frozen: list[float] = []

        def seen(events: list[dict[str, Any]]) -> None:
            if not frozen and any(e["event"] == "progress" for e in events):
                subprocess.run(["fsfreeze", "-f", folder], check=True)
                frozen.append(time.monotonic())
                if sigint:
                    proc.send_signal(signal.SIGINT)
        try:
            events, when = events_until_summary(proc, time.monotonic() + 60, seen)
            assert proc.poll() is None  # a write is still in the kernel
        finally:
            if frozen:
                subprocess.run(["fsfreeze", "-u", folder], check=True)
            proc.communicate(timeout=60)
        assert proc.returncode == (130 if sigint else 1)
        assert when - frozen[0] < (3 if sigint else 2 + 5), when - frozen[0]
        [result] = events[-1]["results"]
        if sigint:
            assert result["status"] == "cancelled", result
        else:
            assert result["status"] == "failed", result
            assert result["error"] == (f"writing {out} stalled: no call to {folder} returned "
                                       "for 2 s (is the disk it is on hung?)"), result
        notes = [e["text"] for e in events if e["event"] == "note"]
        assert any(n.startswith(f"{folder}: a write or other call to this directory has not "
                                "returned; popsicle-py exits once it does") for n in notes), notes
        assert sorted(os.listdir(folder)) == ["lost+found"]


@needs_root
def test_an_output_directory_hung_before_the_read_is_a_refusal_on_time(
        loop_factory: Callable[..., Loop]) -> None:
    """OUTPUT's file system frozen before the read starts (a hung disk or share): the check
    that creates a file there waited on the main thread for good, Ctrl-C unheard.  Now it is
    a refusal once --stall-timeout passes, and nothing of the drive was read."""
    store = loop_factory(64 * MiB)
    drive = loop_factory(8 * MiB)
    with mounted_ext4(store.path) as folder:
        out = os.path.join(folder, "o.img")
        subprocess.run(["fsfreeze", "-f", folder], check=True)
        try:
            began = time.monotonic()
            proc = subprocess.Popen([*popsicle_cmd(), "read", drive.path, out,
                                     "--stall-timeout", "2"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            assert proc.stderr is not None
            ready, _, _ = select.select([proc.stderr], [], [], 30)
            said_at = time.monotonic() - began
            line = proc.stderr.readline().decode() if ready else ""
        finally:
            subprocess.run(["fsfreeze", "-u", folder], check=True)
        out_text, rest = proc.communicate(timeout=60)
        assert line == (f"popsicle-py: {folder} stopped answering while o.img was checked: "
                        "no answer for 2 s (is the disk or share it is on hung?); popsicle-py "
                        "exits once it answers\n"), (line, rest)
        assert said_at < 2 + 8, said_at
        assert proc.returncode == 2, (out_text, rest)
        assert sorted(os.listdir(folder)) == ["lost+found"]


@needs_root
def test_ctrl_c_while_the_output_directory_hangs_says_why_the_shell_waits(
        loop_factory: Callable[..., Loop]) -> None:
    """Ctrl-C while OUTPUT's directory is being checked on a hung disk: nothing was read or
    written, but the process can end only once the check's call returns.  It said only
    "interrupted before writing", then sat there; now it says what it waits for, at once."""
    store = loop_factory(64 * MiB)
    drive = loop_factory(8 * MiB)
    with mounted_ext4(store.path) as folder:
        out = os.path.join(folder, "o.img")
        subprocess.run(["fsfreeze", "-f", folder], check=True)
        try:
            proc = subprocess.Popen([*popsicle_cmd(), "read", drive.path, out,
                                     "--stall-timeout", "60"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            assert proc.stderr is not None
            deadline = time.monotonic() + 30
            while not waits_in_kernel(proc.pid, "percpu_rwsem_wait"):
                assert time.monotonic() < deadline and proc.poll() is None, "never checked"
                threading.Event().wait(0.05)
            proc.send_signal(signal.SIGINT)
            said = b""
            while said.count(b"\n") < 2 and select.select([proc.stderr], [], [], 10)[0]:
                said += os.read(proc.stderr.fileno(), 4096)  # past Python's buffer: select
            assert proc.poll() is None  # held by the frozen directory, as it said
        finally:
            subprocess.run(["fsfreeze", "-u", folder], check=True)
        _, rest = proc.communicate(timeout=60)
        assert said.decode().splitlines() == [
            "popsicle-py: interrupted before writing: nothing was written",
            f"popsicle-py: {folder}: a check that o.img can be written there has not returned; "
            "popsicle-py exits once it does (when the disk or share it is on answers again)",
        ], (said, rest)
        assert proc.returncode == 130, rest
        assert sorted(os.listdir(folder)) == ["lost+found"]


@needs_root
def test_a_drive_that_hangs_while_its_free_blocks_are_read_fails_on_time(
        faulty_drive: Callable[..., Any], tmp_path: Path) -> None:
    """``--bmap`` reads the drive's file systems before the drive itself, and did so on the
    main thread with no stall clock: a drive that stops answering there held the read for
    good, Ctrl-C unheard.  Now it fails as stalled on time, OUTPUT never made."""
    fs = tmp_path / "fs.img"
    with open(fs, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fs)], check=True)
    drive = faulty_drive(16 * MiB, content=fs.read_bytes())
    drive.set(crawl=(0, 1))  # a byte a second: no read of its metadata returns
    out = tmp_path / "out" / "o.img"
    out.parent.mkdir()
    proc = subprocess.Popen([*popsicle_cmd(), "read", drive.path, str(out), "--bmap",
                             "--json", "--stall-timeout", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    began = time.monotonic()
    try:
        events, when = events_until_summary(proc, began + 60)
    finally:
        drive.clear()  # the hung read returns: the process may end
        proc.communicate(timeout=60)
    [result] = events[-1]["results"]
    assert (result["status"], result["cause"]) == ("failed", "stalled"), result
    assert "while its file systems' free blocks were read" in result["error"], result
    assert when - began < 2 + 10
    assert proc.returncode == 1
    assert list(out.parent.iterdir()) == []


@needs_root
def test_ctrl_c_during_the_final_sync_of_a_slow_disk_is_a_cancel_not_ok(
        faulty_drive: Callable[..., Any], loop_factory: Callable[..., Loop],
        tmp_path: Path) -> None:
    """OUTPUT on a disk that takes 8 MB/s: the read is done, its sync takes seconds, and
    Ctrl-C lands in it.  It said "ok" and published OUTPUT, yet exited 130; now it is
    cancelled, and nothing is left."""
    drive = loop_factory(64 * MiB)
    with open(drive.backing, "r+b") as f:
        f.write(os.urandom(64 * MiB))
    disk = faulty_drive(512 * MiB)
    with mounted_ext4(disk.path) as folder:
        disk.set(crawl=(0, 8 * MiB))
        out = os.path.join(folder, "o.img")
        proc = subprocess.Popen([*popsicle_cmd(), "read", drive.path, out, "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)

        sent: list[bool] = []

        def seen(events: list[dict[str, Any]]) -> None:  # read whole: its sync begins
            if not sent and any(e["event"] == "progress" and e["bytes"] == 64 * MiB
                                for e in events):
                sent.append(True)
                proc.send_signal(signal.SIGINT)
        try:
            events, _ = events_until_summary(proc, time.monotonic() + 120, seen)
        finally:
            disk.set(crawl=None)
            proc.communicate(timeout=60)
        [result] = events[-1]["results"]
        assert result["status"] == "cancelled", result
        assert proc.returncode == 130
        assert sorted(os.listdir(folder)) == ["lost+found"]
