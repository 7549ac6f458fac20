"""``erase --discard`` of a drive that cannot discard (``discard_max_bytes`` 0: many USB
bridges): the drive was probed, then failed with "/dev/sdb: Operation not supported" (exit 1),
which said neither what was not supported nor what to do.  The kernel says so beforehand:
refused now (exit 2, nothing written), in words that name ``--zero``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root, popsicle_cmd
from loopdev import Loop

from popsicle_py import erase
from popsicle_py.blockdev import OpenSpec, open_for_writing

MiB = 1 << 20
PATTERN = 0x5A

pytestmark = needs_root


LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81


@pytest.fixture
def no_discard() -> Iterator[Loop]:
    """A loop device that cannot discard, at an index of its own, removed after: the queue
    limit set to 0 outlives a detach (and cannot be set back), so on a /dev/loopN that
    ``losetup -f`` hands out it would disable discard for the tests that get it next."""
    backing = Path("/dev/shm") / f"popsicle-test-{uuid.uuid4().hex[:8]}.img"
    backing.write_bytes(bytes([PATTERN]) * 64 * MiB)
    control = os.open("/dev/loop-control", os.O_RDWR)
    index = next(i for i in range(512, 4096) if not os.path.exists(f"/sys/block/loop{i}"))
    fcntl.ioctl(control, LOOP_CTL_ADD, index)
    try:
        path = f"/dev/loop{index}"
        subprocess.run(["losetup", path, str(backing)], check=True)
        try:
            Path(f"/sys/block/loop{index}/queue/discard_max_bytes").write_text("0\n")
            yield Loop(path, backing, 64 * MiB)
        finally:
            subprocess.run(["losetup", "-d", path], check=True)
    finally:
        for _ in range(50):  # the detach lets go of the device a moment later
            try:
                fcntl.ioctl(control, LOOP_CTL_REMOVE, index)
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.1)
        os.close(control)
        backing.unlink()


def test_discard_on_a_drive_that_cannot_is_refused_before_writing(no_discard: Loop) -> None:
    result = subprocess.run([*popsicle_cmd(), "erase", no_discard.path, "--yes", "--discard"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"popsicle-py: {no_discard.path}: the drive does not support "
                             "discarding (BLKDISCARD): use --zero instead\n")
    assert no_discard.read() == bytes([PATTERN]) * no_discard.size


def test_the_drive_refusing_it_anyway_is_said_in_the_same_words(no_discard: Loop) -> None:
    device = open_for_writing(OpenSpec(no_discard.path, no_discard.size))
    try:
        with pytest.raises(OSError) as caught:
            erase.discard(device, no_discard.size)
    finally:
        device.close()
    assert caught.value.errno == errno.EOPNOTSUPP
    assert caught.value.strerror == ("the drive does not support discarding (BLKDISCARD): use "
                                     "--zero instead")
