"""Flashing images as people download them: every compressed format, checksums, one read.

End to end through the command on loop devices; the one-read check drives a FlashJob with an
image whose stream counts what is read from it.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import Loop, needs_root, popsicle_cmd

from popsicle_py import events
from popsicle_py.blockdev import OpenSpec, open_for_writing
from popsicle_py.flash import FlashJob, FlashOptions
from popsicle_py.images import open_image

pytestmark = needs_root

PATTERN = 0x5A
SIZE = (3 << 20) + 333  # not a multiple of the block size nor of the bucket size


def compress(fmt: str, data: bytes, path: Path) -> Path:
    if fmt == "gzip":
        half = len(data) // 2  # two members, as pigz and concatenated downloads make
        path.write_bytes(gzip.compress(data[:half]) + gzip.compress(data[half:]))
    elif fmt == "xz":
        path.write_bytes(lzma.compress(data))
    elif fmt == "bzip2":
        path.write_bytes(bz2.compress(data))
    elif fmt == "zstd":
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    elif fmt == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("disk.img", data)
    else:
        path.write_bytes(data)
    return path


def image_data() -> bytes:
    # Compressible but not trivial: random blocks between runs of zeros.
    chunks = [os.urandom(4096) if i % 3 else bytes(4096) for i in range(SIZE // 4096 + 1)]
    return b"".join(chunks)[:SIZE]


def flash(*args: str) -> tuple[int, list[dict], str]:
    proc = subprocess.run([*popsicle_cmd(), "flash", *args, "--yes", "--json",
                           "--bucket-size", "1M"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    return proc.returncode, [json.loads(x) for x in proc.stdout.splitlines()], proc.stderr


@pytest.mark.parametrize("fmt", ["raw", "gzip", "xz", "bzip2", "zstd", "zip"])
def test_every_format_round_trips(fmt: str, loop_factory: Callable[..., Loop],
                                  tmp_path: Path) -> None:
    data = image_data()
    # Named .img whatever it holds: detection is by magic bytes, not by name.
    path = compress(fmt, data, tmp_path / "download.img")
    drives = [loop_factory(4 << 20, fill=PATTERN) for _ in range(2)]
    rc, evs, err = flash(str(path), *(d.path for d in drives))
    assert rc == 0, err
    assert evs[0]["event"] == "start" and evs[0]["format"] == fmt
    assert all(r["status"] == "ok" for r in evs[-1]["results"])
    for d in drives:
        assert d.read(SIZE) == data
        assert d.read(d.size - SIZE, SIZE) == bytes([PATTERN]) * (d.size - SIZE)


def test_unknown_size_larger_than_drive_fails_that_drive(loop_factory: Callable[..., Loop],
                                                          tmp_path: Path) -> None:
    data = os.urandom(6 << 20)
    path = compress("gzip", data, tmp_path / "big.img.gz")  # gzip: size unknown up front
    small = loop_factory(4 << 20, fill=PATTERN)
    large = loop_factory(8 << 20, fill=PATTERN)
    rc, evs, err = flash(str(path), small.path, large.path)
    assert rc == 1, err
    results = {r["device"]: r for r in evs[-1]["results"]}
    assert results[large.path]["status"] == "ok"
    assert results[small.path]["status"] == "failed"
    assert "image is larger than the drive" in results[small.path]["error"]
    assert large.read(len(data)) == data
    assert all(e["total"] is None for e in evs if e["event"] == "progress"
               and e["phase"] == "writing")


@pytest.mark.parametrize("fmt", ["gzip", "xz", "bzip2", "zstd", "zip"])
def test_truncated_image_fails_every_drive(fmt: str, loop_factory: Callable[..., Loop],
                                           tmp_path: Path) -> None:
    payload = os.urandom(SIZE)
    whole = compress(fmt, payload, tmp_path / "whole")
    cut = tmp_path / "cut.img"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.7)])
    drives = [loop_factory(4 << 20, fill=PATTERN) for _ in range(2)]
    rc, evs, err = flash(str(cut), *(d.path for d in drives))
    if rc == 2:  # the format's index is at the end: refused up front, nothing written
        assert "cut.img" in err
        for d in drives:
            assert d.read() == bytes([PATTERN]) * d.size
        return
    assert rc == 1, err
    for r in evs[-1]["results"]:
        assert r["status"] == "failed"
        assert "cut.img" in r["error"]
    for d in drives:
        # The image's head is never written: the stamp holds its place once writing began.
        assert d.head_is_safe(payload, PATTERN), d.read(32)


def test_checksum_right_wrong_and_sidecars(loop_factory: Callable[..., Loop],
                                           tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    path = tmp_path / "os.img"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    drive = loop_factory(2 << 20, fill=PATTERN)

    rc, evs, err = flash(str(path), drive.path, "--sha256", "0" * 64)
    assert rc == 2 and "checksum" in err and "mismatch" in err
    assert drive.read() == bytes([PATTERN]) * drive.size

    rc, evs, err = flash(str(path), drive.path, "--checksum", f"sha256:{digest}")
    assert rc == 0, err
    assert any(e["event"] == "phase" and e["phase"] == "checksum" for e in evs)

    (tmp_path / "SHA256SUMS").write_text(f"{'1' * 64}  os.img\n")
    rc, _, err = flash(str(path), drive.path)
    assert rc == 2 and "mismatch" in err
    rc, _, err = flash(str(path), drive.path, "--no-checksum")
    assert rc == 0, err
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  os.img\n")
    (tmp_path / "os.img.sha256").write_text(f"{digest}  os.img\n")
    rc, evs, err = flash(str(path), drive.path)
    assert rc == 0, err
    assert any(e["event"] == "note" and "checksum ok" in e["text"] for e in evs)


@dataclass
class CountingImage:
    """An image whose every stream counts the bytes read from it."""

    inner: Any
    read: int = 0

    @property
    def path(self) -> str:
        return self.inner.path

    @property
    def format(self) -> str:
        return self.inner.format

    @property
    def size(self) -> int | None:
        return self.inner.size

    @property
    def seekable_raw(self) -> bool:
        return False

    def open(self) -> Any:
        stream = self.inner.open()
        outer = self

        class Counting:
            def readinto(self, view: memoryview) -> int:
                n = stream.readinto(view)
                outer.read += n or 0
                return n

            def close(self) -> None:
                stream.close()

        return Counting()


def test_verification_reads_the_source_once(loop_factory: Callable[..., Loop],
                                            tmp_path: Path) -> None:
    data = image_data()
    image = CountingImage(open_image(str(compress("xz", data, tmp_path / "os.img.xz"))))
    drives = [loop_factory(4 << 20, fill=PATTERN) for _ in range(3)]
    devices = [open_for_writing(OpenSpec(d.path, d.size)) for d in drives]
    seen: list[events.Event] = []
    flipped = drives[1]
    corrupted: list[bool] = []

    def emit(event: events.Event) -> None:
        seen.append(event)

    # Corrupt one byte of one drive between its write and its verification: on the drive's
    # own thread, at its first read after a flush (an event reaches us too late for that).
    device = devices[1]
    fsync, readinto = device.fsync, device.readinto
    flushed: list[bool] = []

    def after_flush() -> None:
        fsync()
        flushed.append(True)

    def read(buffer: Any) -> int:
        if flushed and not corrupted:
            corrupted.append(True)
            with open(flipped.path, "r+b", buffering=0) as f:
                f.seek(2_000_000)
                byte = f.read(1)
                f.seek(2_000_000)
                f.write(bytes([byte[0] ^ 0xFF]))
                os.fsync(f.fileno())
        return readinto(buffer)

    device.fsync = after_flush  # type: ignore[method-assign]
    device.readinto = read  # type: ignore[method-assign]

    summary = FlashJob(image, devices,  # type: ignore[arg-type]  # a counting double
                       FlashOptions(bucket_size=1 << 20, repair_attempts=0), emit,
                       lambda: False).run()
    assert image.read == SIZE  # written and verified with a single read of the image
    status = {r.device: r for r in summary.results}
    assert status[drives[0].path].status == "ok" and status[drives[2].path].status == "ok"
    bad = status[flipped.path]
    assert bad.status == "invalid"
    # The exact byte: narrowed by position from the spill file, xz is still not decoded twice.
    assert bad.mismatch_offset == 2_000_000
    assert "at byte 2000000" in (bad.error or "")


def test_an_image_that_fails_to_open_still_ends_with_a_summary(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A zip whose entry's own header disagrees with its directory fails only when opened."""
    path = compress("zip", os.urandom(SIZE), tmp_path / "bad.zip")
    raw = bytearray(path.read_bytes())
    raw[30] ^= 0x20  # the first letter of the name in the local header: "disk" -> "Disk"
    path.write_bytes(bytes(raw))
    drive = loop_factory(4 << 20, fill=PATTERN)
    for command in ("flash", "verify"):
        args = [*popsicle_cmd(), command, str(path), drive.path, "--json"]
        if command == "flash":
            args.append("--yes")
        proc = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=60)
        lines = [json.loads(x) for x in proc.stdout.splitlines()]
        assert proc.returncode == 1, (command, proc.stderr)
        assert lines[-1]["event"] == "summary" and lines[-1]["ok"] is False
        (result,) = lines[-1]["results"]
        assert result["status"] == "failed" and "bad.zip" in result["error"]
        assert "internal error" not in result["error"] and "Traceback" not in proc.stderr
    assert drive.read() == bytes([PATTERN]) * drive.size


# ----------------------------------------------------------------------------------------------
# Standard input is judged like a file, before any drive is opened


NOT_FOUND_HTML = (b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
                  b"<center><h1>404 Not Found</h1></center>\r\n</body>\r\n</html>\r\n")


def _sparse() -> bytes:
    """An Android sparse image's header (what simg2img converts)."""
    return bytes.fromhex("3aff26ed0100000001c000000c000000") + bytes(4096)


def _lzip(tmp_path: Path) -> bytes:
    raw = tmp_path / "lz.img"
    raw.write_bytes(os.urandom(64 << 10))
    subprocess.run(["lzip", "-kf", str(raw)], check=True)
    return (tmp_path / "lz.img.lz").read_bytes()


#: What comes through the pipe, and the one line that refuses it.
STDIN_REFUSED: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "404 page": (lambda d: NOT_FOUND_HTML,
                 'standard input is an HTML page ("404 Not Found"), not a disk image: the '
                 "download may have failed; --force writes it anyway"),
    "404 page, gzipped": (lambda d: gzip.compress(NOT_FOUND_HTML),
                          'standard input is an HTML page ("404 Not Found"), not a disk image'),
    "one line of text": (lambda d: b"Not Found\n",
                         'standard input is a text file, not a disk image: the download may '
                         'have failed (it begins "Not Found"); --force writes it anyway'),
    "qcow2": (lambda d: b"QFI\xfb\x00\x00\x00\x03" + os.urandom(1 << 20),
              "standard input is a QEMU qcow2 image, not a raw disk image: convert it with "
              "`qemu-img convert -O raw`; --force writes it anyway"),
    "7z": (lambda d: b"7z\xbc\xaf\x27\x1c" + os.urandom(1 << 20),
           "standard input is a 7-Zip archive, not a raw disk image"),
    "100 bytes": (lambda d: os.urandom(100),
                  "standard input is only 100 bytes, smaller than one 512-byte sector: not a "
                  "disk image; --force writes it anyway"),
    "empty once decompressed": (lambda d: gzip.compress(b""),
                                "standard input (inside its gzip layer) is empty"),
    "sparse inside gzip": (lambda d: gzip.compress(_sparse()),
                           "standard input (inside its gzip layer) is an Android sparse image, "
                           "which is not a raw disk image: convert it with `simg2img FILE "
                           "image.img` and write image.img (or flash it with fastboot), where "
                           "FILE is what standard input's gzip layer holds, decompressed into "
                           "a file"),
    "lzip": (_lzip, "standard input is an lzip file, which popsicle-py does not decompress: "
                    "run `lzip -dk FILE` and write the result, or `lzip -dc FILE | popsicle-py "
                    "flash - DEVICE`, where FILE is what came through standard input, saved "
                    "to a file"),
}


def flash_stdin(stream: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*popsicle_cmd(), "flash", "-", *args, "--yes", "--bucket-size", "1M"],
                          capture_output=True, input=stream, timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode())


@pytest.mark.parametrize("case", list(STDIN_REFUSED))
def test_standard_input_that_is_not_a_disk_image_is_refused(
        case: str, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """`curl URL | popsicle-py flash - DEV` with an error page is refused as the file would be:
    exit 2, one line, the drive untouched."""
    make, line = STDIN_REFUSED[case]
    drive = loop_factory(2 << 20, fill=PATTERN)
    proc = flash_stdin(make(tmp_path), drive.path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [f"popsicle-py: {line}"] or (
        len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"popsicle-py: {line}")
    ), proc.stderr
    assert drive.read() == bytes([PATTERN]) * drive.size


def test_standard_input_refused_is_written_with_force(loop_factory: Callable[..., Loop]) -> None:
    drive = loop_factory(2 << 20, fill=PATTERN)
    proc = flash_stdin(NOT_FOUND_HTML, drive.path, "--force")
    assert proc.returncode == 0, proc.stderr
    assert "an HTML page" in proc.stdout and "writing it anyway (--force)" in proc.stdout
    assert drive.read(len(NOT_FOUND_HTML)) == NOT_FOUND_HTML


def test_standard_input_sampled_up_front_is_written_whole(
        loop_factory: Callable[..., Loop]) -> None:
    """The start read to judge the stream (decoded beyond the 72 KiB it needs) is written first,
    and an image whose first 72 KiB hold no signature gets the file's note."""
    data = os.urandom(3 << 20)
    drive = loop_factory(4 << 20, fill=PATTERN)
    proc = flash_stdin(lzma.compress(data, preset=0), drive.path)
    assert proc.returncode == 0, proc.stderr
    assert ("standard input has no partition table, ISO 9660 or file system signature"
            in proc.stdout)
    assert drive.read(len(data)) == data


def _blocked_on_pipe(pid: int) -> bool:
    """Some thread of ``pid`` waits in a read of an empty pipe."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "wchan").read_text() in ("pipe_read", "anon_pipe_read", "pipe_wait"):
                return True
        except OSError:
            continue
    return False


def test_a_non_blocking_standard_input_that_pauses_is_read_to_its_end(
        loop_factory: Callable[..., Loop]) -> None:
    """A pipe left non-blocking by whoever made it says "nothing yet" (EAGAIN) while its
    producer pauses; that is no end of the image.  (Before: taken for the end, and the first
    100000 bytes were written, verified and reported ok.)"""
    data = os.urandom(1 << 20)
    drive = loop_factory(2 << 20, fill=PATTERN)
    r, w = os.pipe()
    os.set_blocking(r, False)
    proc = subprocess.Popen([*popsicle_cmd(), "flash", "-", drive.path, "--yes", "--json"],
                            stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(r)
    try:
        os.write(w, data[:100000])
        deadline = time.monotonic() + 30
        while not _blocked_on_pipe(proc.pid) and proc.poll() is None:  # the pause is seen
            assert time.monotonic() < deadline, "never waited for more"
            threading.Event().wait(0.02)
        with contextlib.suppress(BrokenPipeError):
            view = memoryview(data)[100000:]
            while view:
                view = view[os.write(w, view):]
    finally:
        os.close(w)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert drive.read(len(data)) == data


# ----------------------------------------------------------------------------------------------
# A checksum list naming the image under several algorithms


def test_a_list_with_the_image_under_two_algorithms_takes_the_strongest(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """`sha256sum --tag img; sha512sum --tag img > SHA256SUMS`: both right, sha512 checked."""
    data = os.urandom(1 << 20)
    path = tmp_path / "img.raw"
    path.write_bytes(data)
    tagged = [subprocess.run([tool, "--tag", "img.raw"], cwd=tmp_path, check=True,
                             capture_output=True, text=True).stdout
              for tool in ("sha256sum", "sha512sum")]
    (tmp_path / "SHA256SUMS").write_text("".join(tagged))
    drive = loop_factory(2 << 20, fill=PATTERN)
    rc, evs, err = flash(str(path), drive.path)
    assert rc == 0, err
    assert any(e["event"] == "note" and e["text"].startswith("checksum ok (sha512 from")
               for e in evs), evs
    assert drive.read(len(data)) == data

    # The strongest is the one checked: a wrong sha512 beside a right sha256 is a mismatch.
    wrong = tagged[1].rsplit("= ", 1)[0] + "= " + "0" * 128 + "\n"
    (tmp_path / "SHA256SUMS").write_text(tagged[0] + wrong)
    other = loop_factory(2 << 20, fill=PATTERN)
    rc, _, err = flash(str(path), other.path)
    assert rc == 2 and "checksum mismatch" in err and "sha512" in err, err
    assert other.read() == bytes([PATTERN]) * other.size

    # Two different digests of one algorithm: which one is the image's?
    (tmp_path / "SHA256SUMS").write_text(tagged[0] + tagged[0].replace(
        hashlib.sha256(data).hexdigest(), "1" * 64))
    rc, _, err = flash(str(path), other.path)
    assert rc == 2 and "lists img.raw with different checksums" in err, err
    assert other.read() == bytes([PATTERN]) * other.size


def test_advice_for_an_inner_layer_names_a_file_a_command_can_take(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    path = tmp_path / "sp.simg.gz"
    path.write_bytes(gzip.compress(_sparse()))
    drive = loop_factory(2 << 20, fill=PATTERN)
    rc, _, err = flash(str(path), drive.path)
    assert rc == 2
    assert err.splitlines() == [
        f"popsicle-py: {path} (inside its gzip layer) is an Android sparse image, which is not "
        "a raw disk image: convert it with `simg2img FILE image.img` and write image.img (or "
        f"flash it with fastboot), where FILE is what {path}'s gzip layer holds, decompressed "
        "into a file"]
    assert drive.read() == bytes([PATTERN]) * drive.size
