"""Third review of URLs.  A weak ETag (``W/"..."``) promises the same meaning, not the same
bytes (RFC 9110 8.8.1): a resumed download must never stitch another version's bytes on
because its weak ETag matched.

The threaded web server of tests/webserver.py cuts the first answer and serves the file's
next version, under the same weak ETag, from the second request on; no Last-Modified.
A raw server (RawServer) sends a plain image compressed on the wire.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Callable, Iterator

import pytest
from conftest import Loop, needs_root
from test_remote import PATTERN, SIZE, flash, not_bootable, read_url, untouched
from test_rev_remote2_hostile import _plain
from webserver import Served, WebServer, raw_serving, serving

from popsicle_py.images import ImageError

MiB = 1 << 20
WEAK = 'W/"5f3c-1b0a"'


@pytest.fixture
def web() -> Iterator[WebServer]:
    with serving() as server:
        yield server


def weak_only(data: bytes, later: bytes, **cut: list[int]) -> Served:
    return Served(data, etag=WEAK, last_modified=None, **cut,
                  later=Served(later, etag=WEAK, last_modified=None))


def test_a_resume_under_a_matching_weak_etag_is_not_stitched(web: WebServer) -> None:
    data, other = os.urandom(SIZE), os.urandom(SIZE)
    web.add("/disk.img", weak_only(data, other, drop_at=[MiB]))
    with pytest.raises(ImageError, match=r"gives only a weak ETag \(W/: the same meaning, "
                                         r"not the same bytes\) and no Last-Modified, so a "
                                         "resumed download could mix two versions"):
        read_url(web.url("/disk.img"))


def test_a_weak_etag_download_is_resumed_when_a_checksum_judges_it(web: WebServer) -> None:
    data = os.urandom(SIZE)
    sha = hashlib.sha256(data).hexdigest()
    web.add("/same.img", weak_only(data, data, drop_at=[MiB]))
    assert read_url(web.url("/same.img"), sha256=sha) == data
    web.add("/other.img", weak_only(data, os.urandom(SIZE), drop_at=[MiB]))
    with pytest.raises(ImageError, match="checksum mismatch"):
        read_url(web.url("/other.img"), sha256=sha)


def test_a_weak_etag_download_starts_over_while_nothing_was_used(web: WebServer) -> None:
    data = os.urandom(SIZE)
    web.add("/disk.img", weak_only(data, data, stall_at=[4096]))
    assert read_url(web.url("/disk.img")) == data
    # Started over from byte 0; only the end check asks for what follows the body.
    assert [r.range for r in web.requests_for("/disk.img")] == [None, None, f"bytes={SIZE}-"]


@needs_root
def test_a_flash_resumed_under_a_weak_etag_onto_another_version_fails_the_drive(
        web: WebServer, loop_factory: Callable[..., Loop]) -> None:
    """What the user saw before: the first 2 MiB of one version and the rest of the next on
    the drive, verified against the same mixed download, exit 0."""
    data, other = os.urandom(SIZE), os.urandom(SIZE)
    web.add("/disk.img", weak_only(data, other, drop_at=[2 * MiB]))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, events, err = flash(web.url("/disk.img"), drive, extra=("--no-checksum",))
    assert rc == 1, err
    (result,) = events[-1]["results"]
    assert (result["status"], result["cause"]) == ("failed", "source"), result
    assert "gives only a weak ETag" in result["error"], result
    assert not_bootable(drive, data)
    assert drive.read(MiB, 2 * MiB) != other[2 * MiB : 3 * MiB]


@needs_root
def test_a_plain_image_gzip_encoded_on_the_wire_is_refused_not_blamed_on_its_checksum(
        loop_factory: Callable[..., Loop]) -> None:
    """``disk.img`` sent with ``Content-Encoding: gzip`` (a server compressing on the way
    although identity was asked for): taken as a .gz file, decoded and written, then failed
    "checksum mismatch" after the whole write, the published checksum compared with the
    wire's bytes.  The bytes are not the file's: refused before anything is written."""
    image = os.urandom(2 * MiB)
    sums = f"{hashlib.sha256(image).hexdigest()}  os.img\n".encode()
    with raw_serving() as raw:
        raw.routes["/os.img"] = _plain(gzip.compress(image, 1), Content_Encoding="gzip")
        raw.routes["/SHA256SUMS"] = _plain(sums, Content_Type="text/plain")
        drive = loop_factory(4 * MiB, fill=PATTERN)
        code, _, err = flash(raw.url("/os.img"), drive, extra=("--no-probe",))
    assert code == 2, err
    assert ("/os.img: the server sent it encoded (Content-Encoding: gzip) though it was "
            "asked for the file as it is (Accept-Encoding: identity)") in err, err
    assert untouched(drive)
