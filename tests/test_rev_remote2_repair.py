"""A repair of a drive flashed from a URL, without a spill file, downloads the image again:
when that second answer is not the first one's bytes, the drive fails naming the image (cause
``source``), not as a failing drive, and never ends ok.

The drive is made to need a repair by flipping one of its bytes as verification begins
(tests/test_write_less.py's Corrupter); the server answers the repair's request with another
version, or with other bytes under the same ETag.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import cast

import pytest
from conftest import Loop
from test_write_less import Corrupter
from webserver import Served, WebServer, serving

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


def _flash_repairing(url: str, loops: list[Loop]) -> events.Summary:
    """Flash ``url`` (no spill file: a repair reads the URL again); the first drive's byte at
    3 MiB + 5 is flipped once as its verification begins."""
    image = cast(Source, remote.open_url(url, settings=FAST, no_checksum=True).image)
    devices = [open_for_writing(OpenSpec(d.path, d.size)) for d in loops]
    Corrupter(loops[0], 3 * MiB + 5, times=1).arm(devices[0])
    return FlashJob(image, devices, FlashOptions(bucket_size=MiB, repair_attempts=1,
                                                 spill_dir=None),
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
