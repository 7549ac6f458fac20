"""Hostile servers, second review of URLs: answers that change between two requests, encodings
on the wire, an end check that finds another version, credentials in URLs that do not parse.

A raw server (tests/webserver.py's RawServer) sends exactly the bytes a test gives: chunked
bodies cut in a chunk, encodings the client did not ask for.  Flashes run the command against
real loop devices and check their bytes, the exit status and the JSON events.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import Loop, popsicle_cmd
from test_remote import PATTERN, flash, of, untouched
from webserver import RawRequest, RawRoute, RawServer, answer, chunk, raw_serving, wait_for

MiB = 1 << 20
#: A disk image's start: an MBR with one partition, then random bytes.
IMAGE = (b"\0" * 446 + bytes([0x80, 0, 2, 0, 0x0C, 0, 0x20, 0, 0, 8, 0, 0, 0, 0x20, 0, 0])
         + b"\0" * 48 + b"\x55\xaa" + os.urandom(2 * MiB - 512))


@pytest.fixture
def raw() -> Iterator[RawServer]:
    with raw_serving() as server:
        yield server


def test_a_body_started_over_with_other_bytes_is_never_written(
        raw: RawServer, loop_factory: Callable[..., Loop]) -> None:
    """No validators, no length: the first answer is cut inside the start read to judge the
    image, and the server starts over with a login page (a captive portal).  That page was
    never judged: it must not be written as the image, nor end ok."""
    portal = (b"<html><head><title>Wi-Fi login</title></head><body>"
              + b"<p>please log in</p>" * 20000 + b"</body></html>")

    def image(req: RawRequest) -> tuple[bytes, bool]:
        head = answer("200 OK", {"Content-Type": "application/octet-stream",
                                 "Transfer-Encoding": "chunked"})
        if req.n == 1:  # a chunk of 1 MiB announced, 100 bytes of it sent
            return head + chunk(IMAGE[:8192]) + b"100000\r\n" + IMAGE[8192:8292], True
        return head + chunk(portal) + b"0\r\n\r\n", False

    raw.routes["/os.img"] = image
    drive = loop_factory(4 * MiB, fill=PATTERN)
    code, events, _ = flash(raw.url("/os.img"), drive, extra=("--no-probe",))
    (result,) = of(events, "result")
    assert (code, result["status"], result["cause"]) == (1, "failed", "source"), result
    assert ("the server started the file over with other bytes than it first sent"
            in result["error"]), result
    assert untouched(drive)


def _plain(body: bytes, **headers: str) -> RawRoute:
    """A whole body with its length and these headers, every time (no Range)."""
    def route(req: RawRequest) -> tuple[bytes, bool]:
        return answer("200 OK", {"Content-Length": str(len(body)), "ETag": '"v1"',
                                 **{k.replace("_", "-"): v for k, v in headers.items()}},
                      body), False
    return route


def test_an_image_encoded_on_the_wire_is_refused_before_anything_is_written(
        raw: RawServer, loop_factory: Callable[..., Loop]) -> None:
    """Content-Encoding: br although identity was asked for: the bytes are brotli, not the
    image's, and nothing decodes them; they were written and verified ok."""
    raw.routes["/os.img"] = _plain(os.urandom(MiB), Content_Encoding="br")
    drive = loop_factory(4 * MiB, fill=PATTERN)
    code, events, err = flash(raw.url("/os.img"), drive, extra=("--no-probe",))
    assert code == 2, events
    assert ("/os.img: the server sent it encoded (Content-Encoding: br) though it was asked "
            "for the file as it is (Accept-Encoding: identity)") in err, err
    assert untouched(drive)


def test_a_gzip_file_sent_with_content_encoding_gzip_is_still_the_file(
        raw: RawServer, loop_factory: Callable[..., Loop]) -> None:
    """A server that says gzip for a .gz file sends the file's own bytes: flashed as ever."""
    raw.routes["/os.img.gz"] = _plain(gzip.compress(IMAGE, 1), Content_Encoding="gzip")
    drive = loop_factory(4 * MiB, fill=PATTERN)
    code, events, _ = flash(raw.url("/os.img.gz"), drive, extra=("--no-probe",))
    assert code == 0, events
    assert drive.read(len(IMAGE)) == IMAGE


def test_a_checksum_file_compressed_on_the_wire_is_still_checked(
        raw: RawServer, loop_factory: Callable[..., Loop]) -> None:
    """SHA256SUMS gzip-encoded on the wire: read as it came it listed nothing, and the
    published checksum was silently not checked (a wrong download flashed ok)."""
    sums = f"{hashlib.sha256(b'another file').hexdigest()}  os.img\n".encode()
    raw.routes["/os.img"] = _plain(IMAGE)
    raw.routes["/SHA256SUMS"] = _plain(gzip.compress(sums), Content_Encoding="gzip",
                                       Content_Type="text/plain")
    drive = loop_factory(4 * MiB, fill=PATTERN)
    code, events, _ = flash(raw.url("/os.img"), drive, extra=("--no-probe",))
    (result,) = of(events, "result")
    assert (code, result["status"], result["cause"]) == (1, "failed", "source"), result
    assert "checksum mismatch" in result["error"], result
    assert drive.head_is_safe(IMAGE, PATTERN)


def _replaced(first: RawRoute, then: RawRoute) -> RawRoute:
    """``first`` for the first request, ``then`` from the second on (the file replaced)."""
    return lambda req: first(req) if req.n == 1 else then(req)


def test_a_file_replaced_as_its_download_ends_is_not_called_truncated(
        raw: RawServer, loop_factory: Callable[..., Loop]) -> None:
    """The download was whole (its length as announced, its published checksum matched) when
    the file was replaced by a longer one: the end check's answer is the new version, and
    every drive failed with "the file is longer; refusing a truncated image"."""
    newer = IMAGE + os.urandom(MiB)
    raw.routes["/os.img"] = _replaced(_plain(IMAGE), _plain(newer, ETag='"v2"'))
    raw.routes["/SHA256SUMS"] = _plain(f"{hashlib.sha256(IMAGE).hexdigest()}  os.img\n".encode())
    drive = loop_factory(4 * MiB, fill=PATTERN)
    code, events, _ = flash(raw.url("/os.img"), drive, extra=("--no-probe",))
    (result,) = of(events, "result")
    assert (code, result["status"]) == (0, "ok"), result
    assert drive.read(len(IMAGE)) == IMAGE


def test_a_file_replaced_as_a_download_without_length_ends_says_so(
        raw: RawServer, loop_factory: Callable[..., Loop]) -> None:
    """Without a length or a checksum the end check is all that shows the body was whole: a
    new version there fails every drive, saying what happened (not "the connection closed":
    the chunked body ended as it should)."""
    def first(req: RawRequest) -> tuple[bytes, bool]:
        return answer("200 OK", {"ETag": '"v1"', "Transfer-Encoding": "chunked"},
                      chunk(IMAGE) + b"0\r\n\r\n"), False

    raw.routes["/os.img"] = _replaced(first, _plain(IMAGE + os.urandom(MiB), ETag='"v2"'))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    code, events, _ = flash(raw.url("/os.img"), drive, extra=("--no-probe",))
    (result,) = of(events, "result")
    assert (code, result["status"], result["cause"]) == (1, "failed", "source"), result
    assert "/os.img changed on the server as its download ended" in result["error"], result
    assert drive.head_is_safe(IMAGE, PATTERN)


@pytest.mark.parametrize("url", [
    "http://user:pa/S3CRET@127.0.0.1:1/os.img",  # a / in the password, not written %2F
    "http://user:S3C#RET@127.0.0.1:1/os.img",
    "ftp://user:S3CRET@127.0.0.1/os.img",
])
def test_a_password_in_a_url_that_cannot_be_used_is_never_shown(
        url: str, loop_factory: Callable[..., Loop]) -> None:
    drive = loop_factory(4 * MiB, fill=PATTERN)
    code, events, err = flash(url, drive)
    assert code == 2, events
    assert "S3C" not in err + str(events), err
    assert "127.0.0.1" in err, err
    assert untouched(drive)


def test_an_end_check_answered_with_the_whole_file_is_no_truncation(
        raw: RawServer, loop_factory: Callable[..., Loop]) -> None:
    """A server that answers every Range with a 206 of the whole file ("bytes 0-N/N+1")
    says the file is N+1 bytes long, which the body was: every drive failed with "the file is
    longer; refusing a truncated image"."""
    whole = answer("206 Partial Content", {"ETag": '"v1"', "Content-Length": str(len(IMAGE)),
                                           "Content-Range": f"bytes 0-{len(IMAGE) - 1}/"
                                                            f"{len(IMAGE)}"}, IMAGE)
    raw.routes["/os.img"] = _replaced(_plain(IMAGE), lambda req: (whole, False))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    code, events, _ = flash(raw.url("/os.img"), drive, extra=("--no-probe",))
    (result,) = of(events, "result")
    assert (code, result["status"]) == (0, "ok"), result
    assert drive.read(len(IMAGE)) == IMAGE


def test_an_end_check_never_answered_waits_no_longer_than_the_stall_timeout(
        raw: RawServer, loop_factory: Callable[..., Loop]) -> None:
    """The body came whole; the request for what follows it gets no answer.  It waited out
    the read timeout (30 s here), silently, whatever --stall-timeout said."""
    released = threading.Event()

    def silent(req: RawRequest) -> tuple[bytes, bool]:
        released.wait(60)
        return b"", True

    raw.routes["/os.img"] = _replaced(_plain(IMAGE), silent)
    drive = loop_factory(4 * MiB, fill=PATTERN)
    began = time.monotonic()
    try:
        code, events, _ = flash(raw.url("/os.img"), drive,
                                extra=("--no-probe", "--stall-timeout", "2"),
                                env={"POPSICLE_PY_HTTP_TIMEOUT": "30"})
    finally:
        released.set()
    assert time.monotonic() - began < 15
    (result,) = of(events, "result")
    assert (code, result["status"]) == (0, "ok"), result
    assert drive.read(len(IMAGE)) == IMAGE


def test_watch_resumes_a_stalled_download_within_its_stall_timeout(raw: RawServer) -> None:
    """``watch URL --stall-timeout 2``: the download's stall rule was the default's, whatever
    the option said (the read timeout, 30 s here, passed before the resume)."""
    released = threading.Event()

    def route(req: RawRequest) -> tuple[bytes, bool]:
        if req.n > 1:
            return _plain(IMAGE)(req)
        req.send(answer("200 OK", {"ETag": '"v1"', "Content-Length": str(len(IMAGE))},
                        IMAGE[:MiB]))
        released.wait(60)  # then silence
        return b"", True

    raw.routes["/os.img"] = route
    proc = subprocess.Popen([*popsicle_cmd(), "watch", raw.url("/os.img"), "--yes", "--json",
                             "--stall-timeout", "2", "--count", "1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "POPSICLE_PY_HTTP_TIMEOUT": "30"})
    began = time.monotonic()
    try:
        wait_for(lambda: sum(r.path == "/os.img" for r in raw.requests) >= 2
                 or proc.poll() is not None, timeout=40)
        resumed = time.monotonic() - began
    finally:
        released.set()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert resumed < 10, (out, err)
    assert "less than 1 MiB came in 2 s" in out, out


def test_a_retry_after_of_an_hour_is_not_waited_out(
        raw: RawServer, loop_factory: Callable[..., Loop]) -> None:
    """503 with "Retry-After: 3600": urllib3 slept an hour before each attempt, silent."""
    raw.routes["/os.img"] = lambda req: (answer("503 Service Unavailable", {
        "Retry-After": "3600", "Content-Length": "0"}), False)
    drive = loop_factory(4 * MiB, fill=PATTERN)
    began = time.monotonic()
    code, _, err = flash(raw.url("/os.img"), drive, env={"POPSICLE_PY_HTTP_RETRIES": "1"},
                         timeout=40)
    assert time.monotonic() - began < 25
    assert code == 2 and "/os.img: the server answered HTTP 503" in err, err
    assert untouched(drive)


def test_a_resume_never_answered_is_a_stall_of_the_stall_timeout(
        raw: RawServer, loop_factory: Callable[..., Loop]) -> None:
    """The body is cut; the requests to resume it get no answer.  Each waited the read
    timeout (30 s here), not --stall-timeout, before it counted as a failed attempt."""
    released = threading.Event()

    def route(req: RawRequest) -> tuple[bytes, bool]:
        if req.n == 1:  # half the body announced whole, then the connection closes
            return answer("200 OK", {"ETag": '"v1"', "Content-Length": str(len(IMAGE))},
                          IMAGE[:MiB]), True
        released.wait(60)
        return b"", True

    raw.routes["/os.img"] = route
    drive = loop_factory(4 * MiB, fill=PATTERN)
    began = time.monotonic()
    try:
        code, events, _ = flash(raw.url("/os.img"), drive,
                                extra=("--no-probe", "--stall-timeout", "2"),
                                env={"POPSICLE_PY_HTTP_TIMEOUT": "30",
                                     "POPSICLE_PY_HTTP_RETRIES": "1"}, timeout=90)
    finally:
        released.set()
    assert time.monotonic() - began < 20
    (result,) = of(events, "result")
    assert (code, result["status"], result["cause"]) == (1, "failed", "source"), result
    assert "download failed at byte" in result["error"], result
    assert drive.head_is_safe(IMAGE, PATTERN)


def test_a_password_a_redirect_gives_is_never_shown(
        raw: RawServer, loop_factory: Callable[..., Loop]) -> None:
    """A redirect to ``http://user:password@mirror/...``: the checksum found beside it was
    named with the password in the notes (the JSON events, a station's journal)."""
    raw.routes["/a/os.img"] = lambda req: (answer("302 Found", {
        "Location": f"http://mirror:S3CRET@127.0.0.1:{raw.port}/m/os.img",
        "Content-Length": "0"}), False)
    raw.routes["/m/os.img"] = _plain(IMAGE)
    raw.routes["/m/SHA256SUMS"] = _plain(f"{hashlib.sha256(IMAGE).hexdigest()}  os.img\n"
                                         .encode())
    drive = loop_factory(4 * MiB, fill=PATTERN)
    code, events, err = flash(raw.url("/a/os.img"), drive, extra=("--no-probe",))
    assert code == 0, err
    assert f"checksum: sha256 from {raw.url('/m/SHA256SUMS')}" in str(events), events
    assert "S3CRET" not in err + str(events)


def test_a_resume_answered_encoded_on_the_wire_is_never_stitched_in(
        raw: RawServer, loop_factory: Callable[..., Loop]) -> None:
    """A chunked body (no length) is cut; the resume's 206 comes gzip-encoded (a proxy that
    compresses some answers): its bytes were written after the first ones, and the flash
    ended ok with a note, though the server's Content-Range said how long the file is."""
    size = len(IMAGE)

    def route(req: RawRequest) -> tuple[bytes, bool]:
        if req.n == 1:  # a chunk of 1 MiB announced, 10 bytes of it sent
            return answer("200 OK", {"ETag": '"v1"', "Transfer-Encoding": "chunked"},
                          chunk(IMAGE[:MiB]) + b"100000\r\n" + IMAGE[MiB : MiB + 10]), True
        start = int(req.headers["range"].removeprefix("bytes=").split("-")[0])
        if start >= size:
            return answer("416 Range Not Satisfiable", {
                "ETag": '"v1"', "Content-Range": f"bytes */{size}", "Content-Length": "0"}), False
        body = gzip.compress(IMAGE[start:], 1)
        return answer("206 Partial Content", {
            "ETag": '"v1"', "Content-Encoding": "gzip", "Content-Length": str(len(body)),
            "Content-Range": f"bytes {start}-{size - 1}/{size}"}, body), False

    raw.routes["/os.img"] = route
    drive = loop_factory(4 * MiB, fill=PATTERN)
    code, events, _ = flash(raw.url("/os.img"), drive, extra=("--no-probe",))
    (result,) = of(events, "result")
    assert (code, result["status"], result["cause"]) == (1, "failed", "source"), result
    assert "the server answered the resume at byte 1048586 with Content-Encoding gzip" \
        in result["error"], result
    assert drive.head_is_safe(IMAGE, PATTERN)
