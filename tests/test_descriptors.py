"""Every descriptor is released at the end of its drive's job, failed or not (issue 13).

Before, a failed drive's descriptor stayed parked on /dev/null until exit (100 failures left 106
descriptors open), so a long ``watch`` session reached the 1024 limit.  A late write of an
abandoned thread must still never reach another drive: that is BlockDevice.close's business,
tested here with a thread blocked inside a call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Loop, needs_root

from popsicle_py.blockdev import BlockDevice, OpenSpec
from popsicle_py.events import Status
from popsicle_py.flash import FlashJob, FlashOptions, VerifyJob, open_targets
from popsicle_py.images import open_image

pytestmark = needs_root


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Target:
    def __init__(self, loop: Loop) -> None:
        self.path, self.size, self.logical_block_size = loop.path, loop.size, 512


def test_failed_and_verified_drives_leave_no_descriptor_behind(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(os.urandom(1 << 20))
    read_only = loop_factory(2 << 20, read_only=True)  # every write fails (EPERM)
    good = loop_factory(2 << 20)
    img = open_image(str(image))
    options = FlashOptions(bucket_size=1 << 20, probe=None)
    FlashJob(img, open_targets([Target(read_only)]), options, lambda e: None,
             lambda: False).run()  # warm up: imports, caches, threads' first use
    before = open_fds()
    for _ in range(30):
        summary = FlashJob(img, open_targets([Target(read_only), Target(good)]), options,
                           lambda e: None, lambda: False).run()
        assert [r.status for r in summary.results] == [Status.FAILED, Status.OK]
        VerifyJob(img, open_targets([Target(good)], for_writing=False), lambda e: None,
                  lambda: False).run()
    assert open_fds() <= before, f"{open_fds() - before} descriptors left open"


def test_a_close_during_a_call_lets_the_drive_go_and_frees_the_number_after(
        loop_factory: Callable[..., Loop]) -> None:
    loop = loop_factory(1 << 20)
    device = BlockDevice(os.open(loop.path, os.O_RDWR), OpenSpec(loop.path, loop.size), False)
    fd = device.fd
    entered, release = threading.Event(), threading.Event()
    real = os.pwrite
    result: list[Any] = []

    def slow_pwrite(f: int, data: Any, offset: int) -> int:
        if f == fd and not release.is_set():
            entered.set()
            release.wait(10)
        return real(f, data, offset)

    os.pwrite = slow_pwrite  # type: ignore[assignment]
    try:
        writer = threading.Thread(target=lambda: result.append(device.write(b"x" * 512)))
        writer.start()
        assert entered.wait(10)
        device.close()  # while the call is in flight
        assert device.closed and os.readlink(f"/proc/self/fd/{fd}") == "/dev/null"
        release.set()
        writer.join(10)
        assert not writer.is_alive()
        # The number is free now, and the late write went to /dev/null, not to the drive.
        assert not os.path.exists(f"/proc/self/fd/{fd}") or \
            os.readlink(f"/proc/self/fd/{fd}") != "/dev/null"
        assert loop.read(512) == bytes(512)
    finally:
        os.pwrite = real
