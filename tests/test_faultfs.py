"""The faulty-drive fixture does what it says: each fault, seen through O_DIRECT I/O on the loop
device (or plain reads of the FUSE file), as the code under test will see it."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import needs_root
from faulty import FaultyDrive, FaultyFile, MiB, clean_eio_start

pytestmark = needs_root

FILL = 0x5A


def _buffer(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


@pytest.fixture
def direct() -> Iterator[Callable[[FaultyDrive], int]]:
    """Open a drive O_RDWR | O_DIRECT; closed at the end."""
    fds: list[int] = []

    def open_(drive: FaultyDrive) -> int:
        fds.append(os.open(drive.path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC))
        return fds[-1]

    yield open_
    for fd in fds:
        os.close(fd)


def pwrite(fd: int, data: bytes, offset: int) -> int:
    return os.pwrite(fd, _buffer(data), offset)


def pread(fd: int, length: int, offset: int) -> bytes:
    buf = mmap.mmap(-1, length)
    n = os.preadv(fd, [buf], offset)
    return bytes(buf[:n])


def test_healthy_drive_stores_and_logs_every_write(faulty_drive: Callable[..., FaultyDrive],
                                                   direct: Callable[[FaultyDrive], int]
                                                   ) -> None:
    drive = faulty_drive(64 * MiB, fill=FILL)
    assert os.path.basename(drive.path).startswith("loop")
    fd = direct(drive)
    data = os.urandom(4 * MiB)
    assert pwrite(fd, data, 8 * MiB) == len(data)
    assert pread(fd, len(data), 8 * MiB) == data
    assert drive.read(8 * MiB, len(data)) == data
    assert drive.read(0, 4) == bytes([FILL]) * 4
    writes = drive.writes()
    assert sum(n for _, n in writes) == len(data)
    assert min(o for o, _ in writes) == 8 * MiB
    assert drive.ever_written(8 * MiB, 12 * MiB) and not drive.ever_written(0, 8 * MiB)


def test_drop_writes_after_offset(faulty_drive: Callable[..., FaultyDrive],
                                  direct: Callable[[FaultyDrive], int]) -> None:
    drive = faulty_drive(64 * MiB, fill=FILL, drop_writes_after=16 * MiB)
    fd = direct(drive)
    low, high = os.urandom(MiB), os.urandom(MiB)
    assert pwrite(fd, low, 8 * MiB) == MiB
    assert pwrite(fd, high, 32 * MiB) == MiB  # "succeeds"
    assert pread(fd, MiB, 8 * MiB) == low
    assert pread(fd, MiB, 32 * MiB) == bytes([FILL]) * MiB
    assert drive.read(32 * MiB, MiB) == bytes([FILL]) * MiB
    assert {outcome for o, _, outcome in drive.write_outcomes() if o >= 32 * MiB} == {"dropped"}


def test_wrap_is_a_counterfeit_capacity(faulty_drive: Callable[..., FaultyDrive],
                                        direct: Callable[[FaultyDrive], int]) -> None:
    drive = faulty_drive(1 << 30, wrap=16 * MiB)
    fd = direct(drive)
    early, late = os.urandom(MiB), os.urandom(MiB)
    pwrite(fd, early, 4 * MiB)
    pwrite(fd, late, 4 * MiB + 48 * MiB)  # the same physical block, 3 wraps later
    assert pread(fd, MiB, 4 * MiB) == late
    assert pread(fd, MiB, 4 * MiB + 32 * MiB) == late
    assert drive.read(4 * MiB, MiB) == late
    assert os.stat(drive.store).st_blocks * 512 <= 16 * MiB


def test_bad_block_fails_forever_with_a_clean_eio(faulty_drive: Callable[..., FaultyDrive],
                                                   direct: Callable[[FaultyDrive], int]) -> None:
    start = clean_eio_start(8 * MiB + 1)
    assert start == 8 * MiB + 1280 * 1024
    drive = faulty_drive(64 * MiB, bad_write=(start, start + 4096))
    fd = direct(drive)
    for _ in range(3):
        with pytest.raises(OSError) as exc:
            pwrite(fd, os.urandom(4 * MiB), 8 * MiB)
        assert exc.value.errno == errno.EIO
    good = os.urandom(4 * MiB)
    assert pwrite(fd, good, 16 * MiB) == len(good)
    assert drive.read(16 * MiB, len(good)) == good
    assert drive.read(start, 4096) == bytes(4096)
    assert "eio" in {outcome for *_, outcome in drive.write_outcomes()}


def test_transient_bad_block_fails_k_times_then_works(faulty_drive: Callable[..., FaultyDrive],
                                                      direct: Callable[[FaultyDrive], int]
                                                      ) -> None:
    start = clean_eio_start(4 * MiB)
    drive = faulty_drive(64 * MiB, bad_write_times=(start, start + 4096, 2))
    fd = direct(drive)
    data = os.urandom(4 * MiB)
    for _ in range(2):
        with pytest.raises(OSError) as exc:
            pwrite(fd, data, 4 * MiB)
        assert exc.value.errno == errno.EIO
    assert pwrite(fd, data, 4 * MiB) == len(data)
    assert pread(fd, len(data), 4 * MiB) == data


def test_bad_read_range(faulty_drive: Callable[..., FaultyDrive],
                        direct: Callable[[FaultyDrive], int]) -> None:
    drive = faulty_drive(64 * MiB, fill=FILL, bad_read=(20 * MiB + 4096, 20 * MiB + 8192))
    fd = direct(drive)
    data = os.urandom(4 * MiB)
    assert pwrite(fd, data, 20 * MiB) == len(data)  # writes there still work
    with pytest.raises(OSError) as exc:
        pread(fd, 4 * MiB, 20 * MiB)
    assert exc.value.errno == errno.EIO
    assert pread(fd, 4096, 20 * MiB) == data[:4096]
    assert pread(fd, MiB, 28 * MiB) == bytes([FILL]) * MiB
    assert drive.read(20 * MiB, len(data)) == data


def test_flip_bit_from_the_kth_read(faulty_drive: Callable[..., FaultyDrive],
                                    direct: Callable[[FaultyDrive], int]) -> None:
    offset = 5 * MiB + 12345
    drive = faulty_drive(16 * MiB, flip_bit=(offset, 3))
    fd = direct(drive)
    data = os.urandom(MiB)
    pwrite(fd, data, 5 * MiB)
    reads = [pread(fd, MiB, 5 * MiB) for _ in range(4)]
    assert reads[0] == reads[1] == data
    for flipped in reads[2:]:
        diff = [i for i in range(MiB) if flipped[i] != data[i]]
        assert diff == [12345]
        assert flipped[12345] ^ data[12345] == 1
    assert drive.read(5 * MiB, MiB) == data  # stored right: only reads are wrong


def test_crawl_paces_io_past_an_offset(faulty_drive: Callable[..., FaultyDrive],
                                       direct: Callable[[FaultyDrive], int]) -> None:
    drive = faulty_drive(16 * MiB, crawl=(8 * MiB, 256 * 1024))
    fd = direct(drive)
    started = time.monotonic()
    pwrite(fd, os.urandom(MiB), 0)
    fast = time.monotonic() - started
    started = time.monotonic()
    pwrite(fd, os.urandom(512 * 1024), 8 * MiB)
    slow = time.monotonic() - started
    assert fast < 1.0
    assert 1.8 <= slow < 6, slow  # 512 KiB at 256 KiB/s


def test_a_crawl_from_the_kth_read_leaves_the_reads_before_it_fast(
        faulty_file: Callable[..., FaultyFile]) -> None:
    """``crawl=(from, rate, to, 2)``: a first pass over the file at full speed, the second
    paced (an image hashed at the start, then decoded slowly)."""
    data = os.urandom(4 * MiB)
    source = faulty_file(data, crawl=(MiB, 512 * 1024, 3 * MiB, 2))
    fd = os.open(source.file, os.O_RDONLY)
    try:
        passes = []
        for _ in range(2):
            started = time.monotonic()
            assert os.pread(fd, MiB, 0) + os.pread(fd, MiB, MiB) == data[: 2 * MiB]
            passes.append(time.monotonic() - started)
    finally:
        os.close(fd)
    assert passes[0] < 1.0, passes
    assert 1.8 <= passes[1] < 6, passes  # 1 MiB at 512 KiB/s


def test_hang_holds_one_write_and_nothing_else(faulty_drive: Callable[..., FaultyDrive],
                                               direct: Callable[[FaultyDrive], int]) -> None:
    """The daemon answers other requests while one write hangs.

    Through the loop device they wait (the loop driver handles one request at a time, as
    usb-storage does with a stick's commands); the FUSE file itself still answers.
    """
    drive = faulty_drive(16 * MiB, fill=FILL, hang=(4 * MiB, 60))
    fd = direct(drive)
    reader = os.open(drive.file, os.O_RDONLY)
    done = threading.Event()

    def hung_write() -> None:
        pwrite(fd, os.urandom(MiB), 4 * MiB)
        done.set()

    thread = threading.Thread(target=hung_write, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while "hang" not in {outcome for *_, outcome in drive.write_outcomes()}:
        assert time.monotonic() < deadline, "the write never reached the daemon"
        time.sleep(0.01)
    started = time.monotonic()
    assert os.pread(reader, MiB, 12 * MiB) == bytes([FILL]) * MiB  # others are answered
    assert time.monotonic() - started < 2
    os.close(reader)
    assert not done.wait(1.0)  # the write itself is still held
    drive.set(hang=None)  # switched off mid-run: the held write returns
    assert done.wait(5)


def test_faults_switch_mid_run(faulty_drive: Callable[..., FaultyDrive],
                               direct: Callable[[FaultyDrive], int]) -> None:
    drive = faulty_drive(16 * MiB)
    fd = direct(drive)
    data = os.urandom(MiB)
    assert pwrite(fd, data, 4 * MiB) == MiB
    drive.set(bad_write=(4 * MiB, 5 * MiB))
    with pytest.raises(OSError):
        pwrite(fd, data, 4 * MiB)
    drive.set(bad_write=None, drop_writes_after=0)
    assert pwrite(fd, os.urandom(MiB), 4 * MiB) == MiB
    assert drive.read(4 * MiB, MiB) == data


def test_cleanup_detaches_and_unmounts_even_when_busy() -> None:
    drive = FaultyDrive(16 * MiB, faults={"hang": (0, 600)})
    loop, mount = drive.path, drive.mount
    fd = os.open(loop, os.O_RDWR | os.O_DIRECT)
    thread = threading.Thread(target=lambda: pwrite(fd, bytes(4096), 0), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not drive.writes():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.close(fd)  # the hung write keeps the loop device busy
    started = time.monotonic()
    drive.close()
    assert time.monotonic() - started < 10
    thread.join(5)
    assert not os.path.ismount(mount)
    listing = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"],
                             capture_output=True, text=True).stdout
    assert str(mount) not in listing


def test_faulty_file_is_a_flaky_image_source(faulty_file: Callable[..., FaultyFile]) -> None:
    content = os.urandom(3 * MiB + 1000)
    offset = 2 * MiB + 777
    source = faulty_file(content, flip_bit=(offset, 2))
    with open(source.path, "rb") as f:
        first = f.read()
    with open(source.path, "rb") as f:
        second = f.read()
    assert first == content
    assert len(second) == len(content)
    assert [i for i in range(len(content)) if second[i] != content[i]] == [offset]
