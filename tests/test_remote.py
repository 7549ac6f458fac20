"""Images from the web: resume, checksums as published, cache, and every way a download fails.

A threaded web server on 127.0.0.1 (tests/webserver.py) drops, stalls, ignores Range, changes
the file or lies about its length on demand.  The download stream is read directly for the
protocol cases; flashes run the command against real loop devices and check their bytes, the
exit status and the JSON events.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import signal
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import Loop, needs_root, popsicle_cmd
from loopdev import tiny_tmpfs
from test_watch import WATCHING, C, D, needs_testbed, watch
from webserver import Served, WebServer, self_signed, serving, wait_for

from popsicle_py import remote
from popsicle_py.cache import Cache, cache_root, cache_wanted
from popsicle_py.engine.head import HEAD as ENGINE_HEAD
from popsicle_py.images import ImageError
from popsicle_py.images.stillness import ImageChanged
from popsicle_py.remote import HttpSettings, Validator

MiB = 1 << 20
SIZE = 3 * MiB + 333  # not a multiple of the bucket size nor of 512
PATTERN = 0x5A
FAST = HttpSettings(connect_timeout=2, read_timeout=0.5, retries=2, backoff=0.01, outage=0)
FAST_ENV = {"POPSICLE_PY_HTTP_TIMEOUT": "1", "POPSICLE_PY_HTTP_RETRIES": "2",
            "POPSICLE_PY_HTTP_BACKOFF": "0.01", "POPSICLE_PY_HTTP_OUTAGE": "0"}


@pytest.fixture
def web() -> Iterator[WebServer]:
    with serving() as server:
        yield server


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE)


def read_url(url: str, **kw: Any) -> bytes:
    opened = remote.open_url(url, settings=FAST, **kw)
    with opened.image.open() as stream:
        return stream.read()  # type: ignore[no-any-return]


def zipped(data: bytes, method: int) -> bytes:
    """A zip file holding ``data`` as disk.img."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as z:
        z.writestr("disk.img", data)
    return out.getvalue()


def sums(data: bytes, name: str) -> Served:
    return Served(f"{hashlib.sha256(data).hexdigest()}  {name}\n".encode(), etag='"s"')


# ----------------------------------------------------------------------------------------------
# Pure decisions


def test_headers_are_read_as_the_rfcs_say() -> None:
    assert remote.parse_content_range("bytes 100-199/200") == (100, 199, 200)
    assert remote.parse_content_range("bytes 100-199/*") == (100, 199, None)
    assert remote.parse_content_range("items 1-2/3") is None
    assert Validator('"a"', "date").if_range == '"a"'
    assert Validator('W/"a"', "date").if_range == "date"  # weak ETags are not for If-Range
    assert Validator('"a"', None).contradicts(Validator('"b"', None))
    assert not Validator('"a"', "d1").contradicts(Validator('W/"a"', "d2"))
    assert not Validator(None, None).contradicts(Validator('"b"', None))
    assert remote.looks_like_html(b"  <!DOCTYPE html><html>", None)
    assert remote.looks_like_html(b"Not found", "text/html; charset=utf-8")
    assert not remote.looks_like_html(b"\0\0\0\xeb", "text/html")
    assert remote.is_url("HTTPS://example.org/x.img") and not remote.is_url("/tmp/x.img")


def test_cache_location_and_default_follow_xdg_and_the_environment() -> None:
    assert cache_root({"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == Path("/c/popsicle-py")
    assert cache_root({"XDG_CACHE_HOME": "rel", "HOME": "/h"}) == Path("/h/.cache/popsicle-py")
    assert cache_wanted(None, {"POPSICLE_PY_CACHE": "1"})
    assert not cache_wanted(False, {"POPSICLE_PY_CACHE": "1"})
    assert not cache_wanted(None, {})
    assert HttpSettings.from_env({"POPSICLE_PY_HTTP_RETRIES": "7"}).retries == 7
    with pytest.raises(ImageError):
        HttpSettings.from_env({"POPSICLE_PY_HTTP_TIMEOUT": "soon"})


# ----------------------------------------------------------------------------------------------
# The download stream, against the server


def test_a_dropped_connection_resumes_from_the_byte_reached_with_if_range(
        web: WebServer, data: bytes) -> None:
    web.add("/disk.img", Served(data, drop_at=[MiB, 2 * MiB + 7]))
    assert read_url(web.url("/disk.img")) == data
    body = [r for r in web.requests_for("/disk.img") if r.range != f"bytes={SIZE}-"]
    assert [(r.range, r.if_range) for r in body] == [
        (None, None), (f"bytes={MiB}-", '"v1"'), (f"bytes={2 * MiB + 7}-", '"v1"')]


def test_a_connection_dropped_in_the_first_bytes_resumes_from_there(
        web: WebServer, data: bytes) -> None:
    """Cut at byte 1000, inside the 4 KiB read to recognise the image: what came is kept and
    the rest asked for by Range, as for a drop further in.  (Before: the probe's second read
    raised, and the image was refused with urllib3's words.)"""
    web.add("/disk.img", Served(data, drop_at=[1000]))
    assert read_url(web.url("/disk.img")) == data
    body = [r for r in web.requests_for("/disk.img") if r.range != f"bytes={SIZE}-"]
    assert [(r.range, r.if_range) for r in body][-1] == ("bytes=1000-", '"v1"')


def test_a_stalled_connection_resumes_after_the_read_timeout(web: WebServer, data: bytes) -> None:
    web.add("/disk.img", Served(data, stall_at=[MiB + 5]))
    started = time.monotonic()
    assert read_url(web.url("/disk.img")) == data
    assert time.monotonic() - started < 10
    resume = web.requests_for("/disk.img")[1]  # from the very byte reached
    assert resume.range == f"bytes={MiB + 5}-" and resume.if_range == '"v1"'


def test_a_server_ignoring_range_starts_over_while_nothing_was_used(
        web: WebServer, data: bytes) -> None:
    # The connection stalls right after the bytes read to recognise the image.
    web.add("/disk.img", Served(data, stall_at=[4096], ignore_range=True))
    assert read_url(web.url("/disk.img")) == data


def test_a_server_ignoring_range_fails_clearly_once_bytes_were_used(
        web: WebServer, data: bytes) -> None:
    web.add("/disk.img", Served(data, drop_at=[MiB], ignore_range=True))
    with pytest.raises(ImageError, match=r"lost at byte 1048576 and the server cannot resume "
                                         r"\(it ignores Range requests\)"):
        read_url(web.url("/disk.img"))


@pytest.mark.parametrize("validator", ["etag", "last_modified"])
def test_a_file_changed_on_the_server_is_never_stitched(web: WebServer, data: bytes,
                                                        validator: str) -> None:
    other = os.urandom(SIZE)
    if validator == "etag":
        new = Served(other, etag='"v2"')
    else:
        new = Served(other, etag=None, last_modified="Wed, 02 Dec 2026 10:00:00 GMT")
    web.add("/disk.img", Served(data, drop_at=[MiB], later=new,
                                etag='"v1"' if validator == "etag" else None))
    with pytest.raises(ImageError, match="changed on the server during the download"):
        read_url(web.url("/disk.img"))


def a_mirror_dropping_validators(data: bytes, other: bytes, validator: str) -> Served:
    """The first answer carries ETag (or only Last-Modified) and is cut at 1 MiB; the resume
    gets a 206 at the right place with neither validator and another version's bytes (a
    mirror behind the same name that ignores If-Range)."""
    return Served(data, drop_at=[MiB], etag='"v1"' if validator == "etag" else None,
                  later=Served(other, etag=None, last_modified=None, ignore_if_range=True))


@pytest.mark.parametrize("validator", ["etag", "last_modified"])
def test_a_resume_answered_without_the_files_validator_is_not_stitched(
        web: WebServer, data: bytes, validator: str) -> None:
    web.add("/disk.img", a_mirror_dropping_validators(data, os.urandom(SIZE), validator))
    which = "ETag" if validator == "etag" else "Last-Modified"
    with pytest.raises(ImageError, match=rf"resume at byte {MiB} without the file's {which}, "
                                         "so nothing shows the rest is of the same version; "
                                         "not stitching two versions together"):
        read_url(web.url("/disk.img"))


def test_a_resume_without_validators_is_taken_when_a_checksum_judges_it(
        web: WebServer, data: bytes) -> None:
    sha = hashlib.sha256(data).hexdigest()
    web.add("/same.img", a_mirror_dropping_validators(data, data, "etag"))
    assert read_url(web.url("/same.img"), sha256=sha) == data  # the checksum says it is one
    web.add("/other.img", a_mirror_dropping_validators(data, os.urandom(SIZE), "etag"))
    with pytest.raises(ImageError, match="checksum mismatch"):
        read_url(web.url("/other.img"), sha256=sha)


def test_a_server_without_validators_is_not_resumed_blindly(web: WebServer, data: bytes
                                                            ) -> None:
    # Nothing tells the new version apart: a Range request would stitch the two together.
    other = os.urandom(SIZE)
    web.add("/disk.img", Served(data, drop_at=[MiB], etag=None, last_modified=None,
                                later=Served(other, etag=None, last_modified=None)))
    with pytest.raises(ImageError, match="gives no ETag or Last-Modified, so a resumed "
                                         "download could mix two versions"):
        read_url(web.url("/disk.img"))
    assert all(r.range is None for r in web.requests_for("/disk.img"))


def test_a_server_without_validators_is_resumed_when_a_checksum_judges_it(
        web: WebServer, data: bytes) -> None:
    web.add("/disk.img", Served(data, drop_at=[MiB], etag=None, last_modified=None))
    sha = hashlib.sha256(data).hexdigest()
    assert read_url(web.url("/disk.img"), sha256=sha) == data
    web.add("/new.img", Served(data, drop_at=[MiB], etag=None, last_modified=None,
                               later=Served(os.urandom(SIZE), etag=None, last_modified=None)))
    with pytest.raises(ImageError, match="checksum mismatch"):
        read_url(web.url("/new.img"), sha256=sha)


def test_a_server_without_validators_starts_over_while_nothing_was_used(
        web: WebServer, data: bytes) -> None:
    web.add("/disk.img", Served(data, stall_at=[4096], etag=None, last_modified=None))
    assert read_url(web.url("/disk.img")) == data


def test_a_content_length_longer_than_the_body_is_caught(web: WebServer, data: bytes) -> None:
    web.add("/disk.img", Served(data, claim=SIZE + 1000))
    with pytest.raises(ImageError, match=rf"announced {SIZE + 1000} bytes \(Content-Length\) "
                                         rf"but the file ends at byte {SIZE}"):
        read_url(web.url("/disk.img"))


def test_a_content_length_shorter_than_the_file_is_caught(web: WebServer, data: bytes) -> None:
    web.add("/disk.img", Served(data, claim=SIZE - 1000))
    with pytest.raises(ImageError, match=rf"announced {SIZE - 1000} bytes \(Content-Length\) "
                                         "but the file is longer"):
        read_url(web.url("/disk.img"))


def test_retries_end_with_a_clear_error(web: WebServer, data: bytes) -> None:
    web.add("/disk.img", Served(data, drop_at=[MiB], later=Served(status=503)))
    with pytest.raises(ImageError, match=rf"download failed at byte {MiB} of {SIZE} after 3 "
                                         "attempts: HTTP 503"):
        read_url(web.url("/disk.img"))


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d, compresslevel=1),
    "xz": lambda d: lzma.compress(d, preset=0),
    "bzip2": lambda d: bz2.compress(d, compresslevel=1),
    "zstd": lambda d: zstandard.ZstdCompressor(level=1).compress(d),
}


@pytest.mark.parametrize("fmt", sorted(COMPRESSORS))
def test_compressed_bodies_are_decoded_by_magic_bytes_and_resumed(
        web: WebServer, data: bytes, fmt: str) -> None:
    body = COMPRESSORS[fmt](data)
    web.add("/disk.img", Served(body, drop_at=[len(body) // 2]))  # named .img: magic decides
    opened = remote.open_url(web.url("/disk.img"), settings=FAST)
    assert opened.image.format == fmt
    with opened.image.open() as stream:
        assert stream.read() == data


def test_a_truncated_compressed_body_is_an_error_not_a_short_image(web: WebServer,
                                                                     data: bytes) -> None:
    body = gzip.compress(data)
    web.add("/disk.img.gz", Served(body[: len(body) // 2]))
    with pytest.raises(ImageError, match="truncated"):
        read_url(web.url("/disk.img.gz"))


def test_published_sums_are_found_beside_the_url_or_where_it_redirected(
        web: WebServer, data: bytes) -> None:
    web.add("/pub/disk-1.2.img", Served(data))
    web.add("/pub/SHA256SUMS", sums(data, "disk-1.2.img"))
    web.redirect("/latest.img", "/pub/disk-1.2.img")
    opened = remote.open_url(web.url("/latest.img"), settings=FAST)
    image = opened.image
    assert isinstance(image, remote.RemoteImage)
    assert image.expected is not None and image.expected.source == web.url("/pub/SHA256SUMS")
    with image.open() as stream:
        assert stream.read() == data
        assert stream.hasher.hexdigest() == image.expected.hexdigest  # type: ignore[attr-defined]
    web.add("/other.img", Served(data))
    web.add("/other.img.sha512", Served(
        f"{hashlib.sha512(data).hexdigest()}  other.img\n".encode()))
    assert remote.open_url(web.url("/other.img"), settings=FAST).image.expected.algo == "sha512"  # type: ignore[union-attr]


def test_a_wrong_published_checksum_makes_the_stream_fail_at_its_end(
        web: WebServer, data: bytes) -> None:
    web.add("/disk.img", Served(data))
    web.add("/disk.img.sha256", sums(b"something else", "disk.img"))
    opened = remote.open_url(web.url("/disk.img"), settings=FAST)
    with opened.image.open() as stream:
        got = 0
        while got < SIZE:  # every byte arrives ...
            got += len(stream.read(SIZE - got))
        with pytest.raises(ImageError, match=r"checksum mismatch for .*disk\.img"):
            stream.read(1)  # ... but the end is never reported


class _Tap:
    """The engine's checksum tap contract (main's images.ChecksumTap): wrap(raw) hashes reads."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()

    def wrap(self, raw: Any) -> Any:
        tap = self

        class Hashing(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, buffer: Any) -> int:
                n = raw.readinto(buffer)
                tap.hasher.update(memoryview(buffer)[:n])
                return int(n)

        return Hashing()


def test_an_engine_tap_sees_the_bytes_as_published_and_repairs_read_again(
        web: WebServer, data: bytes) -> None:
    body = gzip.compress(data, compresslevel=1)
    web.add("/disk.img.gz", Served(body, drop_at=[len(body) // 2]))
    image = remote.open_url(web.url("/disk.img.gz"), settings=FAST).image
    tap = _Tap()
    with image.open(tap) as stream:  # type: ignore[arg-type]  # a test double of a tap
        assert stream.read() == data
    assert tap.hasher.hexdigest() == hashlib.sha256(body).hexdigest()
    assert image.read_at(MiB + 3, 100) == data[MiB + 3 : MiB + 103]  # type: ignore[union-attr]
    web.add("/disk.img.gz", Served(body, etag='"v2"'))
    # An OSError: the engine says the image failed, not the drive it repairs.
    with pytest.raises(OSError, match="changed on the server since it was first read"):
        image.read_at(0, 10)  # type: ignore[union-attr]
    web.add("/disk.img.gz", Served(gzip.compress(os.urandom(SIZE), compresslevel=1),
                                   etag=None, last_modified=None))
    with pytest.raises(OSError, match="answered again without the file's ETag, so nothing "
                                      "shows it is the version first read"):
        image.read_at(0, 10)  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------------
# End to end: the command, real loop devices


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120
        ) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run([*popsicle_cmd(), *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout,
                          env={**os.environ, **FAST_ENV, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return proc.returncode, lines, proc.stderr


def flash(url: str, *drives: Loop, extra: tuple[str, ...] = (),
          env: dict[str, str] | None = None, timeout: float = 120
          ) -> tuple[int, list[dict[str, Any]], str]:
    return run("flash", url, *(d.path for d in drives), "--yes", "--json", "--bucket-size",
               "1M", *extra, env=env, timeout=timeout)


def of(events: list[dict[str, Any]], kind: str, **fields: Any) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind
            and all(e.get(k) == v for k, v in fields.items())]


def untouched(drive: Loop) -> bool:
    """Nothing written at all: what it held before."""
    return drive.read(MiB) == bytes([PATTERN]) * MiB


HEAD = ENGINE_HEAD  # the image's first bytes, written last: what makes a drive bootable


def not_bootable(drive: Loop, image: bytes) -> bool:
    """No part of the image's head is on the drive: it holds what it held before, or the random
    stamp that holds the head's place while the rest is written and verified."""
    head = drive.read(HEAD)
    if any(head[i : i + 4096] == image[i : i + 4096] for i in range(0, HEAD, 4096)):
        return False
    return head == bytes([PATTERN]) * HEAD or len(set(head)) > 200


@needs_root
def test_flash_of_a_url_survives_drops_and_checks_the_published_sums(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop]) -> None:
    web.add("/disk.img", Served(data, drop_at=[MiB + 100, 2 * MiB]))
    web.add("/SHA256SUMS", sums(data, "disk.img"))
    drives = [loop_factory(4 * MiB, fill=PATTERN) for _ in range(2)]
    rc, events, err = flash(web.url("/disk.img"), *drives)
    assert rc == 0, err
    assert all(d.read(SIZE) == data for d in drives)
    assert events[-1]["event"] == "summary" and events[-1]["ok"]
    assert of(events, "phase", device=None, phase="downloading")
    last = of(events, "progress", device=None, phase="downloading")[-1]
    assert (last["bytes"], last["total"]) == (SIZE, SIZE)
    assert len([e for e in of(events, "note") if "resuming" in e["text"]]) == 2
    assert any("sha256 from " + web.url("/SHA256SUMS") in e["text"] for e in of(events, "note"))
    rc, events, err = run("verify", web.url("/disk.img"), *(d.path for d in drives), "--json")
    assert rc == 0, err
    assert [r["status"] for r in events[-1]["results"]] == ["ok", "ok"]


@needs_root
def test_flash_of_a_compressed_url_behind_a_redirect(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop]) -> None:
    body = lzma.compress(data, preset=0)
    web.add("/mirror/disk.img.xz", Served(body, drop_at=[len(body) // 3]))
    web.redirect("/download", "/mirror/disk.img.xz")
    web.add("/mirror/SHA256SUMS", sums(body, "disk.img.xz"))  # of the file as published
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, events, err = flash(web.url("/download"), drive)
    assert rc == 0, err
    assert drive.read(SIZE) == data
    assert events[0]["format"] == "xz" if events[0]["event"] == "start" else True
    resumed = [r for r in web.requests_for("/mirror/disk.img.xz") if r.range]
    assert resumed and resumed[0].range == f"bytes={len(body) // 3}-"


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[WebServer, Path]]:
    cert, key = self_signed(tmp_path)
    with serving(tls=(cert, key)) as server:
        yield server, cert


BAD = {
    "404": ("/missing.img", r"/missing.img: not found \(HTTP 404 Not Found\)"),
    "410": ("/gone.img", r"/gone.img: gone from the server \(HTTP 410 Gone\)"),
    "loop": ("/a", r"/a: too many redirects \(a redirect loop\?\)"),
    "html": ("/page", r"/page is an HTML page, not a disk image"),
    "html-200-as-octets": ("/page2", r"/page2 is an HTML page, not a disk image"),
    "empty": ("/empty", r"/empty is empty"),
    "malformed": ("MALFORMED", r"http://\[::1: not a valid URL \(Invalid IPv6 URL\)"),
}


@needs_root
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_urls_are_refused_in_one_line_with_nothing_written(
        web: WebServer, case: str, loop_factory: Callable[..., Loop]) -> None:
    web.add("/gone.img", Served(status=410))
    web.redirect("/a", "/b")
    web.redirect("/b", "/a")
    web.add("/page", Served(b"<html><body>Download will start soon</body></html>",
                            content_type="text/html"))
    web.add("/page2", Served(b"\n<!DOCTYPE html>\n<html>Error 500</html>"))
    web.add("/empty", Served(b""))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    path, message = BAD[case]
    rc, events, err = flash("http://[::1" if path == "MALFORMED" else web.url(path), drive)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("popsicle-py: "), err
    assert re.search(message, lines[0]), lines[0]
    assert events[-1] == {"event": "summary", "ok": False, "results": []}
    assert untouched(drive)


@needs_root
def test_a_server_trickling_its_first_bytes_is_refused_on_time(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop]) -> None:
    """The probe reads 4 KiB to judge the image: a byte every 0.2 s resets every read
    timeout, so those bytes must come within the read timeout as a whole."""
    web.add("/disk.img", Served(data, trickle_at=100))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, _, err = flash(web.url("/disk.img"), drive, timeout=60)
    assert rc == 2, err
    assert err.strip() == (f"popsicle-py: {web.url('/disk.img')}: the server sent less than "
                           "4096 bytes in 1 s (stalled); nothing was written"), err
    assert untouched(drive)


@needs_root
def test_a_self_signed_certificate_is_refused_and_trusted_when_told(
        tls: tuple[WebServer, Path], data: bytes, loop_factory: Callable[..., Loop]) -> None:
    server, cert = tls
    server.add("/disk.img", Served(data))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, _, err = flash(server.url("/disk.img"), drive)
    assert rc == 2
    assert "TLS certificate of 127.0.0.1 is not trusted (self-signed certificate)" in err
    assert len(err.strip().splitlines()) == 1
    assert untouched(drive)
    rc, _, err = flash(server.url("/disk.img"), drive, env={"SSL_CERT_FILE": str(cert)})
    assert rc == 0, err
    assert drive.read(SIZE) == data


@needs_root
@pytest.mark.parametrize("problem", ["checksum", "changed", "short", "long", "range"])
def test_a_download_failing_mid_flash_fails_every_drive_before_its_first_bucket(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop], problem: str) -> None:
    served = Served(data)
    if problem == "checksum":
        web.add("/SHA256SUMS", sums(data[:-1] + b"!", "disk.img"))
        why = "checksum mismatch for " + web.url("/disk.img")
    elif problem == "changed":
        served = Served(data, drop_at=[2 * MiB], later=Served(os.urandom(SIZE), etag='"v2"'))
        why = "changed on the server during the download"
    elif problem == "short":
        served = Served(data, claim=SIZE + 4096)
        why = f"announced {SIZE + 4096} bytes (Content-Length) but the file ends at byte {SIZE}"
    elif problem == "long":
        served = Served(data, claim=SIZE - 4096)
        why = "but the file is longer; refusing a truncated image"
    else:
        served = Served(data, drop_at=[2 * MiB], ignore_range=True)
        why = "the server cannot resume (it ignores Range requests)"
    web.add("/disk.img", served)
    drives = [loop_factory(4 * MiB, fill=PATTERN) for _ in range(2)]
    rc, events, err = flash(web.url("/disk.img"), *drives)
    assert rc == 1, err
    results = events[-1]["results"]
    assert [r["status"] for r in results] == ["failed", "failed"]
    assert all(why in r["error"] for r in results), results
    for d in drives:
        assert not_bootable(d, data), "the image's head was written from a bad download"


@needs_root
def test_a_resume_from_a_mirror_dropping_validators_fails_the_drive_unstitched(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop]) -> None:
    """The review's case: v1 then v2 on the drive, reported ok."""
    other = os.urandom(SIZE)
    web.add("/disk.img", Served(data, drop_at=[2 * MiB],
                                later=Served(other, etag=None, last_modified=None,
                                             ignore_if_range=True)))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, events, err = flash(web.url("/disk.img"), drive, extra=("--no-checksum",))
    assert rc == 1, err
    (result,) = events[-1]["results"]
    assert (result["status"], result["cause"]) == ("failed", "source"), result
    assert (f"the server answered the resume at byte {2 * MiB} without the file's ETag"
            in result["error"]), result
    assert not_bootable(drive, data)
    assert drive.read(MiB, 2 * MiB) != other[2 * MiB : 3 * MiB]


@needs_root
def test_a_trickling_download_is_a_stall_resumed_then_a_failure(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop]) -> None:
    """A byte every 0.2 s resets every read timeout: less than 1 MiB in --stall-timeout is a
    stall of the connection, resumed with Range; after the attempts every drive fails."""
    web.add("/disk.img", Served(data, trickle_at=MiB + 5))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, events, err = flash(web.url("/disk.img"), drive, extra=("--stall-timeout", "2"),
                            env={"POPSICLE_PY_HTTP_TIMEOUT": "5"}, timeout=90)
    assert rc == 1, err
    (result,) = events[-1]["results"]
    assert (result["status"], result["cause"]) == ("failed", "source"), result
    assert re.search(r"download failed at byte \d+ of \d+ after 3 attempts: stalled: less "
                     r"than 1 MiB came in 2 s$", result["error"]), result
    resumes = [r.range for r in web.requests_for("/disk.img") if r.range]
    assert len(resumes) == 2 and all(int(r[6:-1]) > MiB for r in resumes), resumes
    assert len(of(events, "download", state="resuming")) == 2
    assert not_bootable(drive, data)


@needs_root
def test_a_trickling_zip_download_is_refused_in_the_stall_timeout_given(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop]) -> None:
    """A zip is downloaded whole before any drive is opened: the same rule, with the run's
    --stall-timeout, and nothing written."""
    web.add("/disk.zip", Served(zipped(data, zipfile.ZIP_STORED), trickle_at=MiB))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, _, err = flash(web.url("/disk.zip"), drive, extra=("--stall-timeout", "2"),
                       env={"POPSICLE_PY_HTTP_TIMEOUT": "5"}, timeout=60)
    assert rc == 2, err
    assert re.fullmatch(rf"popsicle-py: {re.escape(web.url('/disk.zip'))}: download failed at "
                        rf"byte \d+ of \d+ after 3 attempts: stalled: less than 1 MiB came "
                        r"in 2 s", err.strip()), err
    assert untouched(drive)


@needs_root
def test_sha256_and_checksum_options_apply_to_urls(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop]) -> None:
    web.add("/disk.img", Served(data))
    web.add("/SHA256SUMS", sums(b"not this one", "disk.img"))  # the option wins
    drive = loop_factory(4 * MiB, fill=PATTERN)
    good = hashlib.sha256(data).hexdigest()
    rc, _, err = flash(web.url("/disk.img"), drive, extra=("--sha256", good))
    assert rc == 0, err
    assert drive.read(SIZE) == data
    other = loop_factory(4 * MiB, fill=PATTERN)
    rc, events, _ = flash(web.url("/disk.img"), other,
                          extra=("--checksum", "sha512:" + hashlib.sha512(b"x").hexdigest()))
    assert rc == 1
    assert "checksum mismatch" in events[-1]["results"][0]["error"]
    assert not_bootable(other, data)


@needs_root
def test_the_cache_serves_the_second_flash_and_is_listed_and_cleaned(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    body = gzip.compress(data, compresslevel=1)
    web.add("/disk.img.gz", Served(body))
    web.add("/SHA256SUMS", sums(body, "disk.img.gz"))
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    first, second = (loop_factory(4 * MiB, fill=PATTERN) for _ in range(2))
    rc, _, err = flash(web.url("/disk.img.gz"), first, extra=("--cache",), env=env)
    assert rc == 0, err
    (entry,) = Cache(tmp_path / "xdg" / "popsicle-py").entries()
    assert entry.url == web.url("/disk.img.gz") and entry.path.read_bytes() == body
    before = len(web.requests_for("/disk.img.gz"))
    rc, events, err = flash(web.url("/disk.img.gz"), second,
                            env={**env, "POPSICLE_PY_CACHE": "1"})
    assert rc == 0, err
    assert second.read(SIZE) == data
    assert len(web.requests_for("/disk.img.gz")) == before + 1  # the probe only
    assert not of(events, "phase", device=None, phase="downloading")
    assert any("using the cached download" in e["text"] for e in of(events, "note"))
    assert of(events, "phase", device=None, phase="checksum")  # the copy is checked again
    listed = json.loads(subprocess.run([*popsicle_cmd(), "cache", "list", "--json"],
                                       capture_output=True, text=True, check=True,
                                       env={**os.environ, **env}).stdout)
    assert [e["url"] for e in listed] == [web.url("/disk.img.gz")]
    out = subprocess.run([*popsicle_cmd(), "cache", "clean"], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout
    assert out.startswith("removed 1 cached download, ")
    assert Cache(tmp_path / "xdg" / "popsicle-py").entries() == []


@needs_root
def test_a_changed_file_is_not_served_from_the_cache(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "POPSICLE_PY_CACHE": "1"}
    web.add("/disk.img", Served(os.urandom(SIZE), etag='"old"'))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    assert flash(web.url("/disk.img"), drive, env=env)[0] == 0
    web.add("/disk.img", Served(data, etag='"new"'))
    rc, events, err = flash(web.url("/disk.img"), drive, env=env)
    assert rc == 0, err
    assert drive.read(SIZE) == data
    assert of(events, "phase", device=None, phase="downloading")


@needs_root
def test_a_cached_copy_damaged_since_is_refused_and_must_hold_still(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """No checksum is published: the entry's own record of its bytes checks the copy."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "POPSICLE_PY_CACHE": "1"}
    web.add("/disk.img", Served(data))
    first, second = (loop_factory(4 * MiB, fill=PATTERN) for _ in range(2))
    assert flash(web.url("/disk.img"), first, env=env)[0] == 0
    (entry,) = Cache(tmp_path / "xdg" / "popsicle-py").entries()
    with open(entry.path, "r+b") as f:  # damaged in place, the same size
        f.seek(MiB)
        f.write(b"rot!")
    rc, _, err = flash(web.url("/disk.img"), second, env=env)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "the cache's record of " + web.url("/disk.img") in lines[0], err
    assert untouched(second)
    image = remote.open_url(web.url("/disk.img"), settings=FAST,
                            cache=Cache(tmp_path / "xdg" / "popsicle-py"))
    assert image.still is not None
    image.still()
    with open(entry.path, "r+b") as f:
        f.write(b"x")
    with pytest.raises(ImageChanged, match=r"changed while it was read \(it was written to\)"):
        image.still()


@needs_root
def test_a_cache_that_cannot_be_made_is_skipped_with_a_note(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    # The cache is an extra for flash: a cache directory that cannot be made never fails a drive.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    web.add("/disk.img.gz", Served(gzip.compress(data, compresslevel=1)))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, events, err = flash(web.url("/disk.img.gz"), drive, extra=("--cache",),
                            env={"XDG_CACHE_HOME": str(blocker)})
    assert rc == 0, err
    assert drive.read(SIZE) == data
    assert any(n["text"] == f"not caching {web.url('/disk.img.gz')}: {blocker}/popsicle-py: "
               "Not a directory; the flash goes on" for n in of(events, "note")), events


@needs_root
def test_a_cache_whose_disk_fills_up_is_dropped_and_the_flash_goes_on(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path, "1m") as small:
        web.add("/disk.img", Served(data))
        drive = loop_factory(4 * MiB, fill=PATTERN)
        rc, events, err = flash(web.url("/disk.img"), drive, extra=("--cache",),
                                env={"XDG_CACHE_HOME": str(small)})
        left = list((small / "popsicle-py").iterdir())
    assert rc == 0, err
    assert drive.read(SIZE) == data
    assert any(n["text"] == f"not caching {web.url('/disk.img')}: {small}/popsicle-py: No "
               "space left on device; the flash goes on" for n in of(events, "note")), events
    assert left == [], "the partial cache entry was left behind"


@needs_root
def test_a_download_copy_that_is_needed_and_cannot_be_kept_is_one_line(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    # A zip is read from a downloaded copy: with no room for it, nothing is written and the
    # line says where the room was missing.
    web.add("/disk.zip", Served(zipped(data, zipfile.ZIP_STORED)))
    with tiny_tmpfs(tmp_path, "1m") as small:
        drive = loop_factory(4 * MiB, fill=PATTERN)
        rc, events, err = flash(web.url("/disk.zip"), drive, env={"TMPDIR": str(small)})
        left = list(small.iterdir())
    assert rc == 2, err
    assert err.strip() == (f"popsicle-py: cannot keep the download of {web.url('/disk.zip')} "
                           f"in {small}: No space left on device"), err
    assert events[-1] == {"event": "summary", "ok": False, "results": []}
    assert untouched(drive)
    assert left == []


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Two signing keys; ``good`` is in the keyring the user names, ``other`` is not.

    gpg starts an agent per home that outlives the test run: each is stopped at the end.
    """
    base = tmp_path_factory.mktemp("gpg")
    out: dict[str, Path] = {}
    for name in ("good", "other"):
        home = base / name
        home.mkdir(mode=0o700)
        env = {**os.environ, "GNUPGHOME": str(home)}
        subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
                        f"{name}@popsicle.test", "ed25519", "sign", "never"],
                       check=True, capture_output=True, env=env)
        keyring = base / f"{name}.gpg"
        keyring.write_bytes(subprocess.run(["gpg", "--batch", "--export"], check=True,
                                           capture_output=True, env=env).stdout)
        out[name] = home
        out[name + "-keyring"] = keyring
    yield out
    for name in ("good", "other"):
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], check=False, capture_output=True,
                       env={**os.environ, "GNUPGHOME": str(out[name])})


def sign(home: Path, text: bytes) -> bytes:
    return subprocess.run(["gpg", "--batch", "--detach-sign", "-o", "-"], input=text,
                          check=True, capture_output=True,
                          env={**os.environ, "GNUPGHOME": str(home)}).stdout


@needs_root
def test_keyring_trusts_a_sums_file_only_with_a_good_signature(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop],
        keys: dict[str, Path]) -> None:
    listing = f"{hashlib.sha256(data).hexdigest()}  disk.img\n".encode()
    web.add("/disk.img", Served(data))
    web.add("/SHA256SUMS", Served(listing))
    keyring = str(keys["good-keyring"])
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, _, err = flash(web.url("/disk.img"), drive, extra=("--keyring", keyring))
    assert rc == 2 and "no signature next to " + web.url("/SHA256SUMS") in err
    web.add("/SHA256SUMS.gpg", Served(sign(keys["other"], listing)))
    rc, _, err = flash(web.url("/disk.img"), drive, extra=("--keyring", keyring))
    assert rc == 2 and "does not verify with" in err and len(err.strip().splitlines()) == 1
    assert untouched(drive)
    web.add("/SHA256SUMS.gpg", Served(sign(keys["good"], listing)))
    rc, events, err = flash(web.url("/disk.img"), drive, extra=("--keyring", keyring))
    assert rc == 0, err
    assert drive.read(SIZE) == data
    assert any(e["text"].startswith("signature ok: " + web.url("/SHA256SUMS.gpg"))
               for e in of(events, "note"))
    web.add("/SHA256SUMS", Served(listing.replace(b"disk.img", b"disk.img\n" + b"0" * 64
                                                  + b"  other.img")))
    rc, _, err = flash(web.url("/disk.img"), drive, extra=("--keyring", keyring))
    assert rc == 2 and "does not verify" in err  # tampered after signing


@needs_root
def test_a_zip_url_is_downloaded_first_then_written(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    web.add("/disk.zip", Served(zipped(data, zipfile.ZIP_DEFLATED)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, _, err = flash(web.url("/disk.zip"), drive, env={"TMPDIR": str(scratch)})
    assert rc == 0, err
    assert drive.read(SIZE) == data
    assert list(scratch.iterdir()) == [], "the private copy was left behind"
    rc, events, err = run("verify", web.url("/disk.zip"), drive.path, "--json",
                          env={"TMPDIR": str(scratch)})
    assert rc == 0, err  # downloaded first, as flash does
    assert [r["status"] for r in events[-1]["results"]] == ["ok"]
    assert list(scratch.iterdir()) == []


@needs_root
def test_a_zip_urls_errors_name_the_url_not_its_private_copy(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    web.add("/empty.zip", Served(zipped(b"", zipfile.ZIP_STORED)))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, _, err = flash(web.url("/empty.zip"), drive, env={"TMPDIR": str(scratch)})
    assert rc == 2, err
    assert err.strip() == (f"popsicle-py: {web.url('/empty.zip')} (inside its zip layer) is "
                           "empty"), err
    assert untouched(drive)
    body = bytearray(zipped(data, zipfile.ZIP_STORED))
    body[MiB] ^= 0xFF  # in the member's data: its CRC fails at its end
    web.add("/bad.zip", Served(bytes(body)))
    rc, events, err = flash(web.url("/bad.zip"), drive, env={"TMPDIR": str(scratch)})
    assert rc == 1, err
    (result,) = events[-1]["results"]
    assert result["error"].startswith(f"{drive.path}: {web.url('/bad.zip')} is corrupt or "
                                      "truncated"), result
    assert "popsicle-py-download" not in result["error"] + err, result
    assert not_bootable(drive, data)
    assert list(scratch.iterdir()) == []


@needs_root
def test_a_download_resumed_is_no_stall_of_the_image(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop]) -> None:
    """The download judges its own connection (read timeouts, less than 1 MiB in
    --stall-timeout, resumes): the image's stall rule leaves it alone."""
    web.add("/disk.img", Served(data, stall_at=[2 * MiB]))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, events, err = flash(web.url("/disk.img"), drive, extra=("--stall-timeout", "1"),
                            env={"POPSICLE_PY_HTTP_TIMEOUT": "2"})
    assert rc == 0, err
    assert drive.read(SIZE) == data
    assert of(events, "download", state="resuming")


@needs_root
def test_ctrl_c_during_a_stalled_download_gives_the_shell_back(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop]) -> None:
    # The signal lands once the drive holds all that arrived before the stall (the order is
    # made certain: the worst case, not a race): what is promised is no image head on it.
    web.add("/disk.img", Served(data, stall_at=[2 * MiB]))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    proc = subprocess.Popen([*popsicle_cmd(), "flash", web.url("/disk.img"), drive.path,
                             "--yes", "--json", "--bucket-size", "1M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL,
                            env={**os.environ, "POPSICLE_PY_HTTP_TIMEOUT": "60"})
    try:
        wait_for(lambda: drive.read(2 * MiB - HEAD, HEAD) == data[HEAD : 2 * MiB], timeout=60)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, err = proc.communicate(timeout=15)
        assert time.monotonic() - started < 5
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert not_bootable(drive, data)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_testbed
@pytest.mark.umockdev
def test_watch_of_a_url_downloads_once_and_writes_every_drive_from_the_copy(
        web: WebServer, data: bytes, tmp_path: Path) -> None:
    body = gzip.compress(data, compresslevel=1)
    web.add("/disk.img.gz", Served(body, drop_at=[len(body) // 2]))
    web.add("/SHA256SUMS", sums(body, "disk.img.gz"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = watch(tmp_path, [web.url("/disk.img.gz"), "--yes", "--count", "2"],
                   [WATCHING, {"add": C.description}, {"add": D.description}],
                   read=(C.dev, D.dev), env={"TMPDIR": str(scratch), **FAST_ENV})
    assert result.rc == 0, result.stderr
    assert len(result.of("phase", device=None, phase="downloading")) == 1
    bodies = [r for r in web.requests_for("/disk.img.gz") if r.range is None]
    assert len(bodies) == 1, "the image was downloaded more than once"
    for stick in (C, D):
        assert result.files[stick.dev][:SIZE] == data
    assert list(scratch.iterdir()) == [], "the downloaded copy was left behind"


@needs_root
def test_keyring_also_guards_a_local_sums_file(
        data: bytes, loop_factory: Callable[..., Loop], keys: dict[str, Path],
        tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    listing = f"{hashlib.sha256(data).hexdigest()}  disk.img\n".encode()
    (tmp_path / "SHA256SUMS").write_bytes(listing)
    (tmp_path / "SHA256SUMS.sign").write_bytes(sign(keys["other"], listing))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    keyring = str(keys["good-keyring"])
    rc, _, err = flash(str(image), drive, extra=("--keyring", keyring))
    assert rc == 2 and "does not verify with" in err
    assert untouched(drive)
    (tmp_path / "SHA256SUMS.sign").write_bytes(sign(keys["good"], listing))
    rc, _, err = flash(str(image), drive, extra=("--keyring", keyring))
    assert rc == 0, err
    assert drive.read(SIZE) == data
    rc, _, err = flash(str(image), drive, extra=("--keyring", keyring, "--sha256", "0" * 64))
    assert rc == 2 and "none is used here" in err


# ----------------------------------------------------------------------------------------------
# A URL is judged like a file: "not a disk image" before any drive is opened (review s11, 2)

_PAGE = (b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
         b"<center><h1>404 Not Found</h1></center>\r\n</body>\r\n</html>\r\n")
_S3 = b'{"error":"NoSuchKey","message":"The specified key does not exist."}\n'

#: path: (body, the one line that refuses it, whether --force writes it anyway)
NOT_IMAGES: dict[str, tuple[Callable[[], bytes], str, bool]] = {
    "/nf.txt": (lambda: b"Not Found\n",
                r'/nf\.txt is a text file, not a disk image: the download may have failed '
                r'\(it begins "Not Found"\); --force writes it anyway$', True),
    "/err.json": (lambda: _S3, r"/err\.json is JSON data, not a disk image: .*; --force writes "
                               r"it anyway$", True),
    "/page.html.gz": (lambda: gzip.compress(_PAGE),
                      r'/page\.html\.gz is an HTML page \("404 Not Found"\), not a disk image',
                      True),
    "/disk.qcow2": (lambda: b"QFI\xfb\x00\x00\x00\x03" + os.urandom(MiB),
                    r"/disk\.qcow2 is a QEMU qcow2 image, not a raw disk image: convert it "
                    r"with `qemu-img convert -O raw`; --force writes it anyway$", True),
    "/rand.img.xz": (lambda: os.urandom(2 * MiB),
                     r"/rand\.img\.xz has a \.xz name but holds a raw image, and no disk image "
                     r"signature either: it looks damaged; download it again \(not written, "
                     r"even with --force\)$", False),
    "/small.img": (lambda: os.urandom(100),
                   r"/small\.img is only 100 bytes, smaller than one 512-byte sector", True),
    "/empty.img.gz": (lambda: gzip.compress(b""),
                      r"/empty\.img\.gz \(inside its gzip layer\) is empty$", False),
}


@needs_root
@pytest.mark.parametrize("path", sorted(NOT_IMAGES))
def test_a_url_that_is_not_a_disk_image_is_refused_as_a_file_is(
        web: WebServer, path: str, loop_factory: Callable[..., Loop]) -> None:
    body, line, forced = NOT_IMAGES[path]
    web.add(path, Served(body()))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, events, err = flash(web.url(path), drive, extra=("--no-checksum",))
    assert rc == 2, err
    [shown] = err.strip().splitlines()
    assert shown.startswith(f"popsicle-py: {web.url(path)}") and re.search(line, shown), shown
    assert events[-1] == {"event": "summary", "ok": False, "results": []}
    assert untouched(drive)
    rc, _, err = flash(web.url(path), drive, extra=("--no-checksum", "--force"))
    assert (rc == 0) == forced, err
    if not forced:
        assert untouched(drive)


@needs_root
def test_a_url_named_xz_holding_a_raw_image_says_so(
        web: WebServer, data: bytes, loop_factory: Callable[..., Loop]) -> None:
    image = bytearray(data)
    image[510:512] = b"\x55\xaa"
    web.add("/disk.img.xz", Served(bytes(image)))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    proc = subprocess.run([*popsicle_cmd(), "flash", web.url("/disk.img.xz"), drive.path,
                           "--yes", "--no-checksum"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, env={**os.environ, **FAST_ENV})
    assert proc.returncode == 0, proc.stderr
    assert (f"{web.url('/disk.img.xz')} has a .xz name but holds a raw image; using it as a "
            "raw image") in proc.stdout, proc.stdout
    assert drive.read(SIZE) == bytes(image)


@needs_root
def test_refusal_advice_for_a_url_names_a_file_a_command_can_take(
        web: WebServer, loop_factory: Callable[..., Loop]) -> None:
    sparse = bytes.fromhex("3aff26ed0100000001c000000c000000") + bytes(4096)
    web.add("/sp.simg.gz", Served(gzip.compress(sparse)))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, _, err = flash(web.url("/sp.simg.gz"), drive)
    assert rc == 2, err
    assert err.strip().splitlines() == [
        f"popsicle-py: {web.url('/sp.simg.gz')} (inside its gzip layer) is an Android sparse "
        "image, which is not a raw disk image: convert it with `simg2img FILE image.img` and "
        "write image.img (or flash it with fastboot), where FILE is what "
        f"{web.url('/sp.simg.gz')}'s gzip layer holds, decompressed into a file"]
    assert untouched(drive)


def test_the_start_read_to_judge_a_url_is_served_again(web: WebServer, data: bytes) -> None:
    """The sample (more than the probe's first read) is the download's first bytes, from the
    same answer; a drop while it is read leaves it unjudged, resumed from the byte reached."""
    web.add("/disk.img", Served(data))
    opened = remote.open_url(web.url("/disk.img"), settings=FAST, no_checksum=True)
    assert isinstance(opened.image, remote.RemoteImage)
    assert opened.image.sample.head == data[:72 << 10]
    with opened.image.open() as stream:
        assert stream.read() == data
    end = f"bytes={SIZE}-"  # the check that nothing follows the body
    assert [r.range for r in web.requests_for("/disk.img") if r.range != end] == [None]

    web.add("/cut.img", Served(data, drop_at=[20000]))
    opened = remote.open_url(web.url("/cut.img"), settings=FAST, no_checksum=True)
    assert isinstance(opened.image, remote.RemoteImage)
    assert opened.image.sample.head is None  # too little to judge: left to the download
    with opened.image.open() as stream:
        assert stream.read() == data
    assert [r.range for r in web.requests_for("/cut.img")
            if r.range != end] == [None, "bytes=20000-"]


@needs_root
def test_a_url_zip_holding_text_is_refused_once_downloaded(
        web: WebServer, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A zip is downloaded whole before it is read: judged then, still before any drive."""
    web.add("/textm.zip", Served(zipped(b"Not Found\n" * 100, zipfile.ZIP_DEFLATED)))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rc, _, err = flash(web.url("/textm.zip"), drive, extra=("--no-checksum",),
                            env={"TMPDIR": str(scratch)})
    assert rc == 2, err
    assert err.strip().splitlines() == [
        f"popsicle-py: {web.url('/textm.zip')} is a text file, not a disk image: the download "
        'may have failed (it begins "Not Found"); --force writes it anyway']
    assert untouched(drive)
    assert list(scratch.iterdir()) == [], "the downloaded copy was left behind"
