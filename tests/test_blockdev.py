"""BlockDevice on real loop devices: O_DIRECT, odd-sized images, reading back, the drive's end."""

from __future__ import annotations

import errno
import io
import os
import random
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from popsicle_py import BusVerifier, BusVerifierMessage, BusWriter, BusWriterMessage, failures
from popsicle_py.blockdev import BlockDevice, OpenSpec, open_for_reading, open_for_writing
from popsicle_py.buffers import aligned_buffer
from popsicle_py.engine import read_full, write_all
from popsicle_py.errors import Stalled, TooSmall
from popsicle_py.events import Cause

pytestmark = pytest.mark.root

MIB = 1 << 20
PATTERN = 0xA5


def data(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def fd_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


@pytest.fixture
def opened() -> Iterator[Callable[[BlockDevice], BlockDevice]]:
    devices: list[BlockDevice] = []

    def keep(device: BlockDevice) -> BlockDevice:
        devices.append(device)
        return device

    yield keep
    for d in devices:
        d.close()


def test_o_direct_is_really_used(loop_factory: Callable[..., Any],
                                 opened: Callable[[BlockDevice], BlockDevice]) -> None:
    loop = loop_factory(MIB)
    writer = opened(open_for_writing(OpenSpec(loop.path, loop.size)))
    reader = opened(open_for_reading(OpenSpec(loop.path, loop.size)))
    assert writer.direct and reader.direct
    assert fd_flags(writer.fileno()) & os.O_DIRECT
    assert fd_flags(writer.fileno()) & os.O_SYNC == os.O_SYNC
    assert fd_flags(reader.fileno()) & os.O_DIRECT


def test_a_drive_is_opened_exclusively(loop_factory: Callable[..., Any],
                                       opened: Callable[[BlockDevice], BlockDevice]) -> None:
    loop = loop_factory(MIB)
    opened(open_for_writing(OpenSpec(loop.path, loop.size)))
    with pytest.raises(OSError) as info:
        opened(open_for_writing(OpenSpec(loop.path, loop.size)))
    assert info.value.errno == errno.EBUSY


def descriptors_of(path: str) -> list[int]:
    """This process's descriptors open on the device at ``path``."""
    rdev = os.stat(path).st_rdev
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.stat(f"/proc/self/fd/{name}").st_rdev == rdev:
                found.append(int(name))
        except OSError:
            pass
    return found


def test_unsynced_writes_go_through_a_second_descriptor_freed_with_the_drive(
        loop_factory: Callable[..., Any]) -> None:
    """The probe's stamps: without O_SYNC, on the same exclusive open, closed with it."""
    loop = loop_factory(MIB)
    device = open_for_writing(OpenSpec(loop.path, loop.size))
    try:
        block = memoryview(aligned_buffer(4096))
        block[:] = b"s" * 4096
        assert device.at(8192, block, write=True, synced=False) == 4096
        second = [fd for fd in descriptors_of(loop.path) if fd != device.fileno()]
        assert len(second) == 1
        assert fd_flags(second[0]) & os.O_DIRECT and not fd_flags(second[0]) & os.O_SYNC
        with pytest.raises(OSError) as info:  # still nobody else's to open
            open_for_writing(OpenSpec(loop.path, loop.size)).close()
        assert info.value.errno == errno.EBUSY
    finally:
        device.close()
    assert descriptors_of(loop.path) == []
    assert loop.read(4096, 8192) == b"s" * 4096


@pytest.mark.parametrize("k", [0, 1, 700])
def test_an_odd_sized_image_is_written_exactly(loop_factory: Callable[..., Any],
                                               opened: Callable[[BlockDevice], BlockDevice],
                                               k: int) -> None:
    """512*k + 77 bytes: the unaligned tail goes through the bounce buffer, nothing past it."""
    loop = loop_factory(MIB, fill=PATTERN)
    image = data(512 * k + 77, seed=k)
    device = opened(open_for_writing(OpenSpec(loop.path, loop.size)))
    rec: list[Any] = []
    result = BusWriter(io.BytesIO(image), [device], rec.append, lambda: False).bucket_size(
        64 << 10).write()
    assert result[0].ok and result[0].bytes_written == len(image)
    assert rec[-1] == BusWriterMessage.Completed(0)
    on_disk = loop.read()
    assert on_disk[: len(image)] == image
    assert on_disk[len(image) :] == bytes([PATTERN]) * (loop.size - len(image))

    # It reads back exactly, through O_DIRECT, however the reads are cut.
    back = opened(open_for_reading(OpenSpec(loop.path, loop.size)))
    buf = memoryview(aligned_buffer(len(image)))
    assert read_full(back, buf[: len(image)]) == len(image)
    assert bytes(buf[: len(image)]) == image
    back.seek(3)
    odd = bytearray(len(image) - 3)
    assert read_full(back, memoryview(odd)) == len(odd)
    assert bytes(odd) == image[3:]
    back.seek(loop.size - 10)
    tail = bytearray(100)
    assert back.readinto(tail) == 10  # a read stops at the drive's end
    assert bytes(tail[:10]) == bytes([PATTERN]) * 10
    assert back.readinto(tail) == 0


def test_unaligned_memory_and_offsets_are_written_exactly(
        loop_factory: Callable[..., Any], opened: Callable[[BlockDevice], BlockDevice]) -> None:
    loop = loop_factory(MIB, fill=PATTERN)
    device = opened(open_for_writing(OpenSpec(loop.path, loop.size)))
    payload = data(3 * 4096 + 1000, seed=5)
    view = memoryview(bytearray(b"x" + payload))[1:]  # an odd address: never aligned
    start = 4096 + 333
    device.seek(start)
    assert write_all(device, view) == len(payload)
    assert device.tell() == start + len(payload)
    on_disk = loop.read()
    assert on_disk[start : start + len(payload)] == payload
    assert on_disk[:start] == bytes([PATTERN]) * start
    assert on_disk[start + len(payload) :] == bytes([PATTERN]) * (
        loop.size - start - len(payload))


def test_read_only_memory_is_written(loop_factory: Callable[..., Any],
                                    opened: Callable[[BlockDevice], BlockDevice]) -> None:
    """``bytes`` have no address to check: whole blocks of them must not fail with EINVAL."""
    loop = loop_factory(MIB, fill=PATTERN)
    device = opened(open_for_writing(OpenSpec(loop.path, loop.size)))
    payload = data(64 << 10, seed=9)
    assert write_all(device, memoryview(payload)) == len(payload)
    assert loop.read(len(payload) + 512) == payload + bytes([PATTERN]) * 512


def test_writing_past_the_end_is_enospc(loop_factory: Callable[..., Any],
                                        opened: Callable[[BlockDevice], BlockDevice]) -> None:
    small = loop_factory(MIB)
    image = data(MIB + 512 + 77)
    device = opened(open_for_writing(OpenSpec(small.path, small.size)))
    with pytest.raises(OSError) as info:
        write_all(device, memoryview(image))
    assert info.value.errno == errno.ENOSPC
    assert "image is larger than the drive" in str(info.value)
    assert small.read() == image[: MIB]  # everything that fits was written


def test_a_drive_whose_capacity_drops_to_zero_mid_write_was_removed(
        loop_factory: Callable[..., Any], opened: Callable[[BlockDevice], BlockDevice]) -> None:
    """A pulled USB stick's capacity reads 0 before its node goes, and writes fail with ENOSPC.

    A loop device whose backing file shrinks to nothing (``losetup -c``) goes through the same
    kernel path; the drive must be reported removed, not blamed for running out of space.
    """
    loop = loop_factory(4 * MIB)
    device = opened(open_for_writing(OpenSpec(loop.path, loop.size)))
    write_all(device, memoryview(data(MIB)))
    os.truncate(loop.backing, 0)
    subprocess.run(["losetup", "-c", loop.path], check=True)
    with pytest.raises(OSError) as info:
        write_all(device, memoryview(data(MIB, seed=1)))
    assert info.value.errno in (errno.ENOSPC, errno.EIO)
    why = failures.failure(info.value, loop.path)
    assert why.cause is Cause.REMOVED
    assert why.text == f"{loop.path}: the drive was removed"


def test_a_drive_too_small_among_others(loop_factory: Callable[..., Any],
                                        opened: Callable[[BlockDevice], BlockDevice]) -> None:
    small, big = loop_factory(MIB), loop_factory(2 * MIB)
    image = data(MIB + 4096)
    devices = [opened(open_for_writing(OpenSpec(lp.path, lp.size))) for lp in (small, big)]
    rec: list[Any] = []
    result = BusWriter(io.BytesIO(image), devices, rec.append, lambda: False).bucket_size(
        256 << 10).write()
    errored = [m for m in rec if isinstance(m, BusWriterMessage.Errored)]
    assert [m.id for m in errored] == [0]
    assert errored[0].why.errno == errno.ENOSPC
    assert "image is larger than the drive" in str(errored[0].why)
    why = failures.failure(errored[0].why, small.path)
    assert why.cause is Cause.TOO_SMALL
    assert why.text == f"{small.path}: image is larger than the drive"
    assert result[0].bytes_written == MIB and result[1].ok
    assert BusWriterMessage.Completed(1) in rec and BusWriterMessage.Completed(0) not in rec
    assert big.read(len(image)) == image


def test_verify_reads_the_device_back(loop_factory: Callable[..., Any],
                                      opened: Callable[[BlockDevice], BlockDevice]) -> None:
    loops = [loop_factory(MIB, fill=PATTERN) for _ in range(2)]
    image = data(512 * 1500 + 77)
    writers = [opened(open_for_writing(OpenSpec(lp.path, lp.size))) for lp in loops]
    BusWriter(io.BytesIO(image), writers, lambda m: None, lambda: False).bucket_size(
        64 << 10).write()
    for w in writers:
        w.close()
    bad = 512 * 1000 + 3
    with open(loops[1].backing, "r+b") as f:  # the drive loses one bit
        f.seek(bad)
        f.write(bytes([image[bad] ^ 1]))
    readers = [opened(open_for_reading(OpenSpec(lp.path, lp.size))) for lp in loops]
    rec: list[Any] = []
    verdicts = BusVerifier(io.BytesIO(image), readers, rec.append, lambda: False).bucket_size(
        64 << 10).verify()
    assert verdicts == [True, False]
    assert [m for m in rec if isinstance(m, BusVerifierMessage.Invalid)] == [
        BusVerifierMessage.Invalid(1, bad)]
    reads = [m.bytes_read for m in rec if isinstance(m, BusVerifierMessage.Read) and m.id == 0]
    assert reads[-1] == len(image)


def test_busy_message_suggests_unmount_only_when_mounted() -> None:
    mounted = failures.busy_message("/dev/sdb", ["/media/u/STICK"])
    assert mounted == ("/dev/sdb: the drive is busy: mounted at /media/u/STICK; unmount it or "
                       "use --unmount")
    held = failures.busy_message("/dev/sdb", [])
    assert "--unmount" not in held and "`fuser -v /dev/sdb*`" in held


def test_a_cause_comes_from_the_failure_s_type_not_its_words() -> None:
    stalled = failures.failure(Stalled("stalled: no progress for 2 s"), "/dev/sdb")
    assert stalled.cause is Cause.STALLED
    assert stalled.text == "/dev/sdb: stalled: no progress for 2 s"
    # The same words from elsewhere (a timeout of another kind) are no stall of the drive's.
    timeout = failures.failure(OSError(errno.ETIMEDOUT, "stalled: no progress"), "/dev/sdb")
    assert timeout.cause is Cause.ERROR
    larger = failures.failure(OSError(errno.ENOSPC, "image is larger than the drive"), "/dev/null")
    assert larger.cause is Cause.NO_SPACE
    assert failures.failure(TooSmall(), "/dev/null").cause is Cause.TOO_SMALL
