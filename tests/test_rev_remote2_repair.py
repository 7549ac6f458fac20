"""A repair of a drive flashed from a URL, without a spill file, downloads the image again:
when that second answer is not the first one's bytes, the drive fails naming the image (cause
``source``), not as a failing drive, and never ends ok.

The drive is made to need a repair by flipping one of its bytes as verification begins
(tests/test_write_less.py's Corrupter); the server answers the repair's request with another
version, or with other bytes under the same ETag.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import cast

import pytest
from conftest import Loop
from test_write_less import Corrupter
from webserver import RawRequest, Served, WebServer, answer, raw_serving, serving

from popsicle_py import events, remote
from popsicle_py.blockdev import OpenSpec, open_for_writing
from popsicle_py.flash import FlashJob, FlashOptions
from popsicle_py.protocols import Source
from popsicle_py.remote import HttpSettings

MiB = 1 << 20
FAST = HttpSettings(connect_timeout=2, read_timeout=2, retries=1, backoff=0.01, outage=0)
DATA = os.urandom(6 * MiB)


@pytest.fixture
def web() -> Iterator[WebServer]:
    with serving() as server:
        yield server


def _flash_repairing(url: str, loops: list[Loop], settings: HttpSettings = FAST,
                     stall_timeout: float = 60) -> events.Summary:
    """Flash ``url`` (no spill file: a repair reads the URL again); the first drive's byte at
    3 MiB + 5 is flipped once as its verification begins."""
    image = cast(Source, remote.open_url(url, settings=settings, no_checksum=True).image)
    devices = [open_for_writing(OpenSpec(d.path, d.size)) for d in loops]
    Corrupter(loops[0], 3 * MiB + 5, times=1).arm(devices[0])
    return FlashJob(image, devices, FlashOptions(bucket_size=MiB, repair_attempts=1,
                                                 spill_dir=None, stall_timeout=stall_timeout),
                    lambda event: None, lambda: False).run()


@pytest.mark.parametrize(("later", "said"), [
    (Served(DATA, etag='"v2"'), "reading the image again for this drive failed (from byte "
                                "3145728): {url} changed on the server since it was first "
                                "read"),
    (Served(os.urandom(len(DATA))), "the image changed while it was read: bytes "
                                    "3145728-4194303, read again for this drive, differ"),
], ids=["another-version", "other-bytes-same-etag"])
def test_a_repair_that_reads_other_bytes_fails_the_drive_naming_the_image(
        web: WebServer, loop_factory: Callable[..., Loop], later: Served, said: str) -> None:
    web.add("/os.img", Served(DATA, later=later))  # the second request: the end check
    loops = [loop_factory(8 * MiB) for _ in range(2)]
    first, second = _flash_repairing(web.url("/os.img"), loops).results
    assert (first.status, first.cause) == ("failed", "source"), first
    assert said.format(url=web.url("/os.img")) in (first.error or ""), first
    assert "may be failing" not in (first.error or ""), first
    assert loops[0].read(4096) != DATA[:4096]  # no bootable head left
    assert second.status == "ok" and loops[1].read(len(DATA)) == DATA


def test_a_repair_reads_only_the_bytes_it_rewrites(
        web: WebServer, loop_factory: Callable[..., Loop]) -> None:
    """A raw image's repair asks for its bucket alone (a Range), not the whole image again up
    to it: near the end of a large image that took as long as the download, and the drive
    waited all that time."""
    web.add("/os.img", Served(DATA))
    loops = [loop_factory(8 * MiB) for _ in range(2)]
    first, second = _flash_repairing(web.url("/os.img"), loops).results
    assert (first.status, first.repaired, second.status) == ("ok", 1, "ok"), first
    assert loops[0].read(len(DATA)) == DATA
    assert [r.range for r in web.requests_for("/os.img")][2:] == [f"bytes={3 * MiB}-"
                                                                  f"{4 * MiB - 1}"]


def test_a_repair_whose_download_hangs_is_the_images_stall_not_the_drives(
        loop_factory: Callable[..., Loop]) -> None:
    """The server answers the download and its end check, then nothing: the repair's read
    hangs.  The drive was failed as stalled ("no progress", cause stalled), a sound drive
    blamed for the server."""
    released = threading.Event()

    def route(req: RawRequest) -> tuple[bytes, bool]:
        if req.n == 1:
            return answer("200 OK", {"ETag": '"v1"', "Content-Length": str(len(DATA))},
                          DATA), False
        if req.n == 2:  # the end check: nothing follows
            return answer("416 Range Not Satisfiable", {"ETag": '"v1"', "Content-Length": "0",
                                                        "Content-Range": f"bytes */{len(DATA)}"
                                                        }), False
        released.wait(30)
        return b"", True

    slow = HttpSettings(connect_timeout=2, read_timeout=20, retries=0, backoff=0.01, outage=0)
    with raw_serving() as raw:
        raw.routes["/os.img"] = route
        loops = [loop_factory(8 * MiB) for _ in range(2)]
        try:
            first, second = _flash_repairing(raw.url("/os.img"), loops, settings=slow,
                                             stall_timeout=2).results
        finally:
            released.set()
    assert (first.status, first.cause) == ("failed", "source"), first
    assert "reading the image stalled" in (first.error or ""), first
    assert second.status == "ok"
