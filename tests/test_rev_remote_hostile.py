"""Hostile web servers: answers tests/webserver.py cannot give, written byte by byte.

Each case is a function that gets the request's bytes and the socket, and answers as a broken
or hostile server would: a body without a length cut short, a redirect to another scheme,
headers too large, credentials in the URL.  Flashes run the command against real loop devices.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, needs_root, popsicle_cmd

MiB = 1 << 20
PATTERN = 0x5A
ENV = {"POPSICLE_PY_HTTP_TIMEOUT": "3", "POPSICLE_PY_HTTP_RETRIES": "1",
       "POPSICLE_PY_HTTP_BACKOFF": "0.01", "POPSICLE_PY_HTTP_OUTAGE": "0"}
Answer = Callable[[bytes, socket.socket], None]


class RawServer:
    """Answers each connection's request with ``answer(request, conn)``; 404 for any path
    but the image's (no SHA256SUMS and the like unless ``sums`` is given)."""

    def __init__(self, answer: Answer, sums: bytes | None = None) -> None:
        self.answer, self.sums = answer, sums
        self.sums_answer: Answer | None = None  # answers SHA256SUMS instead, when set
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self, path: str = "/disk.img", userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                got = conn.recv(65536)
                if not got:
                    return
                request += got
            self.requests.append(request)
            try:
                if request.startswith(b"GET /disk.img "):
                    self.answer(request, conn)
                elif request.startswith(b"GET /SHA256SUMS ") and self.sums_answer is not None:
                    self.sums_answer(request, conn)
                elif request.startswith(b"GET /SHA256SUMS ") and self.sums is not None:
                    send(conn, "200 OK", [("Content-Length", str(len(self.sums)))], self.sums)
                else:
                    send(conn, "404 Not Found", [("Content-Length", "0")])
            except OSError:
                pass

    def close(self) -> None:
        # Wakes the accepting thread first: a closed descriptor's number is soon another
        # test's listener, which that thread would then serve.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def send(conn: socket.socket, status: str, headers: list[tuple[str, str]],
         body: bytes = b"") -> None:
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
    conn.shutdown(socket.SHUT_RDWR)  # a clean end (FIN): what a finished body looks like


def asked_range(request: bytes) -> int | None:
    m = re.search(rb"\r\nRange: bytes=(\d+)-", request)
    return int(m[1]) if m else None


@pytest.fixture
def image() -> bytes:
    data = bytearray(os.urandom(3 * MiB))
    data[510:512] = b"\x55\xaa"  # an MBR's signature: a disk image, no note about it
    return bytes(data)


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    made: list[RawServer] = []

    def start(answer: Answer, sums: bytes | None = None) -> RawServer:
        made.append(RawServer(answer, sums))
        return made[-1]

    yield start
    for server in made:
        server.close()


def flash(url: str, drive: Loop, *extra: str) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run([*popsicle_cmd(), "flash", url, drive.path, "--yes", "--json",
                           *extra], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120, env={**os.environ, **ENV})
    assert "Traceback" not in proc.stderr, proc.stderr
    events = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return proc.returncode, events, proc.stderr


def refusal_after_retries(err: str) -> str:
    """The refusal's one line, after a line for each attempt that failed before it."""
    *retries, last = err.splitlines()
    assert all(re.fullmatch(r"popsicle-py: .*; trying again \(attempt \d+ of \d+\)", line)
               for line in retries), err
    return last


def untouched(drive: Loop) -> bool:
    return drive.read(MiB) == bytes([PATTERN]) * MiB


# ----------------------------------------------------------------------------------------------
# A body without a length, cut short


@needs_root
def test_a_body_without_a_length_cut_short_is_never_ok(
        serve: Callable[..., RawServer], image: bytes,
        loop_factory: Callable[..., Loop]) -> None:
    """No Content-Length, no chunked framing: the connection's close ends the body, and a cut
    looks like the end.  The server does answer Range requests: asked what follows, it shows
    the file is longer, so every drive fails, none bootable."""
    def answer(request: bytes, conn: socket.socket) -> None:
        start = asked_range(request)
        if start is None:  # the body, cut at 2 MiB with a clean close
            send(conn, "200 OK", [("ETag", '"v1"')], image[: 2 * MiB])
        else:
            size = len(image)
            send(conn, "206 Partial Content",
                 [("ETag", '"v1"'), ("Content-Length", str(size - start)),
                  ("Content-Range", f"bytes {start}-{size - 1}/{size}")], image[start:])

    server = serve(answer)
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, events, err = flash(server.url(), drive)
    assert rc == 1, err
    result = events[-1]["results"][0]
    assert result["status"] == "failed"
    assert result["error"] == (f"{drive.path}: {server.url()}: the connection closed at byte "
                               f"{2 * MiB} but the file is longer (the server gave no length); "
                               "refusing a truncated image")
    assert untouched(drive)


@needs_root
def test_a_body_without_a_length_nothing_can_check_says_so(
        serve: Callable[..., RawServer], image: bytes,
        loop_factory: Callable[..., Loop]) -> None:
    """A server without lengths that ignores Range cannot show a cut: the flash is written as
    it came, with a note that nothing shows it complete."""
    def answer(request: bytes, conn: socket.socket) -> None:
        send(conn, "200 OK", [("ETag", '"v1"')], image)

    server = serve(answer)
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, events, err = flash(server.url(), drive)
    assert rc == 0, err
    assert drive.read(len(image)) == image
    notes = [e["text"] for e in events if e["event"] == "note"]
    assert (f"{server.url()}: the server gave no length and no checksum was found: nothing "
            "shows that the download is complete") in notes


# ----------------------------------------------------------------------------------------------
# Credentials in the URL


def guarded(body: bytes, user: str, password: str) -> Answer:
    """A server that answers only with the right Basic credentials (else 401)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()

    def answer(request: bytes, conn: socket.socket) -> None:
        if f"\r\nAuthorization: Basic {token}\r\n".encode() not in request:
            send(conn, "401 Unauthorized", [("WWW-Authenticate", 'Basic realm="x"'),
                                            ("Content-Length", "0")])
            return
        send(conn, "200 OK", [("ETag", '"v1"'), ("Content-Length", str(len(body)))], body)

    return answer


@needs_root
def test_credentials_in_a_url_are_sent_and_never_shown(
        serve: Callable[..., RawServer], image: bytes,
        loop_factory: Callable[..., Loop]) -> None:
    """``http://user:password@host/...``: the password goes to the server (Basic), and no
    message or event shows it (the URL is named without it)."""
    server = serve(guarded(image, "me@home", "p:ss w0rd"))
    url = server.url(userinfo="me%40home:p%3Ass%20w0rd@")
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, events, err = flash(url, drive)
    assert rc == 0, err
    assert drive.read(len(image)) == image
    shown = json.dumps(events) + err
    assert "w0rd" not in shown and "me%40home" not in shown
    assert events[0]["image"] == server.url()


@needs_root
def test_credentials_are_kept_from_a_redirect_elsewhere_and_the_refusal_says_so(
        serve: Callable[..., RawServer], image: bytes,
        loop_factory: Callable[..., Loop]) -> None:
    """A redirect to the same host on another port (as http:// to https:// is): the password
    is not sent there (as curl does), and the 401 that follows said only "access refused",
    which read as a wrong password."""
    target = serve(guarded(image, "me", "secret"))
    first = serve(redirect_to(target.url()))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, _, err = flash(first.url(userinfo="me:secret@"), drive)
    assert rc == 2, err
    assert refusal_after_retries(err) == (
        f"popsicle-py: {first.url()}: access refused (HTTP 401 Unauthorized) at {target.url()}, "
        "where it was redirected: the URL's user and password go to its own scheme, host and "
        "port only; give that URL")
    assert b"Authorization" not in b"".join(target.requests)
    assert untouched(drive)


def zipped(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("disk.img", data)
    return out.getvalue()


@needs_root
@pytest.mark.parametrize("packed", [False, True], ids=["streamed", "zip"])
def test_a_refusal_of_a_url_with_credentials_does_not_show_them(
        serve: Callable[..., RawServer], loop_factory: Callable[..., Loop],
        packed: bool) -> None:
    """Not a disk image (text): refused in one line naming the URL without its password,
    judged from its start, or (a zip) once downloaded."""
    text = b'{"error": "quota exceeded"}\n' * 200
    server = serve(guarded(zipped(text) if packed else text, "me", "secret"))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, _, err = flash(server.url(userinfo="me:secret@"), drive)
    assert rc == 2, err
    assert err.startswith(f"popsicle-py: {server.url()} ")
    assert "secret" not in err
    assert untouched(drive)


# ----------------------------------------------------------------------------------------------
# Published checksums


@needs_root
@pytest.mark.parametrize("line", ["{short}  disk.img", "SHA256 (disk.img) = {short}",
                                  "{digest}0  disk.img"], ids=["gnu", "bsd", "long"])
def test_a_sums_file_listing_the_image_without_a_usable_checksum_is_refused(
        serve: Callable[..., RawServer], image: bytes, loop_factory: Callable[..., Loop],
        tmp_path: Path, line: str) -> None:
    """A SHA256SUMS that names the image with a digest cut short or mangled does list it:
    refused in one line (exit 2, nothing written), not flashed unchecked.  So for a file."""
    digest = hashlib.sha256(image).hexdigest()
    sums = (line.format(short=digest[:40], digest=digest) + "\r\n").encode()

    def answer(request: bytes, conn: socket.socket) -> None:
        send(conn, "200 OK", [("ETag", '"v1"'), ("Content-Length", str(len(image)))], image)

    server = serve(answer, sums=sums)
    (tmp_path / "disk.img").write_bytes(image)
    (tmp_path / "SHA256SUMS").write_bytes(sums)
    for where, name in ((server.url(), server.url("/SHA256SUMS")),
                        (str(tmp_path / "disk.img"), str(tmp_path / "SHA256SUMS"))):
        drive = loop_factory(4 * MiB, fill=PATTERN)
        rc, _, err = flash(where, drive)
        assert rc == 2, err
        assert err == (f"popsicle-py: checksum file {name} lists disk.img without a usable "
                       "sha256 checksum (cut short or mangled)\n")
        assert untouched(drive)


# ----------------------------------------------------------------------------------------------
# Answers that are not what HTTP allows, in one line each


def redirect_to(location: str) -> Answer:
    def answer(request: bytes, conn: socket.socket) -> None:
        send(conn, "302 Found", [("Location", location), ("Content-Length", "0")])

    return answer


def huge_header(request: bytes, conn: socket.socket) -> None:
    send(conn, "200 OK", [("X-Junk", "a" * 70000), ("Content-Length", "4096")], bytes(4096))


def many_headers(request: bytes, conn: socket.socket) -> None:
    send(conn, "200 OK", [*((f"X-H{i}", "a") for i in range(150)),
                          ("Content-Length", "4096")], bytes(4096))


@needs_root
@pytest.mark.parametrize(("answer", "said"), [
    (redirect_to("file:///etc/passwd"), "redirected to an address that is not an http:// or "
                                        "https:// URL; nothing was downloaded"),
    (redirect_to("ftp://127.0.0.1/disk.img"), "redirected to an address that is not an "
                                              "http:// or https:// URL; nothing was downloaded"),
    (huge_header, "the server's answer is malformed: got more than 65536 bytes when reading "
                  "header line"),
    (many_headers, "the server's answer is malformed: got more than 100 headers"),
], ids=["file", "ftp", "huge-header", "many-headers"])
def test_answers_outside_http_are_one_line_saying_what_happened(
        serve: Callable[..., RawServer], loop_factory: Callable[..., Loop],
        answer: Answer, said: str) -> None:
    server = serve(answer)
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, _, err = flash(server.url(), drive)
    assert rc == 2, err
    assert refusal_after_retries(err) == f"popsicle-py: {server.url()}: {said}"
    assert untouched(drive)


@needs_root
def test_a_url_without_a_host_is_said_to_be_one(loop_factory: Callable[..., Loop]) -> None:
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, _, err = flash("http:///disk.img", drive)
    assert (rc, err) == (2, "popsicle-py: http:///disk.img: not a valid URL (no host)\n")


# ----------------------------------------------------------------------------------------------
# A zip at a URL: downloaded to a private copy first, named by its URL


@needs_root
def test_a_zip_url_is_named_by_its_url_not_its_private_copy(
        serve: Callable[..., RawServer], image: bytes,
        loop_factory: Callable[..., Loop]) -> None:
    """The start of the run (JSON `start`, the human `image ... -> DRIVE` line) names the URL,
    for flash and verify: the private copy is an implementation detail, removed at the end."""
    body = zipped(image)

    def answer(request: bytes, conn: socket.socket) -> None:
        send(conn, "200 OK", [("ETag", '"v1"'), ("Content-Length", str(len(body)))], body)

    server = serve(answer)
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, events, err = flash(server.url(), drive)
    assert rc == 0, err
    assert [e["image"] for e in events if e["event"] == "start"] == [server.url()]
    for command in ("flash", "verify"):
        args = ("--yes",) if command == "flash" else ()
        proc = subprocess.run([*popsicle_cmd(), command, server.url(), drive.path, *args],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=120, env={**os.environ, **ENV})
        assert proc.returncode == 0, proc.stderr
        assert f"image {server.url()} (3 MiB) -> {drive.path}\n" in proc.stdout, proc.stdout
        assert "popsicle-py-download" not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------
# Signatures that are not signatures


@needs_root
@pytest.mark.skipif(shutil.which("gpgv") is None, reason="needs gpgv")
def test_a_signature_file_that_is_no_signature_is_said_to_be_one(
        image: bytes, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A SHA256SUMS.gpg of junk: refused (exit 2, nothing written) with gpgv's reason, not
    with the tail of its advice ("should be the first file given on the command line")."""
    sums = f"{hashlib.sha256(image).hexdigest()}  disk.img\n".encode()
    (tmp_path / "disk.img").write_bytes(image)
    (tmp_path / "SHA256SUMS").write_bytes(sums)
    (tmp_path / "SHA256SUMS.gpg").write_bytes(b"<html>not found</html>\n")
    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(os.urandom(64))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    rc, _, err = flash(str(tmp_path / "disk.img"), drive, "--keyring", str(keyring))
    assert rc == 2, err
    assert err == (f"popsicle-py: the signature of {tmp_path}/SHA256SUMS does not verify with "
                   f"{keyring}: no valid OpenPGP data found.\n")
    assert untouched(drive)


# ----------------------------------------------------------------------------------------------
# A checksum file that trickles


@needs_root
def test_a_trickling_checksum_file_is_refused_within_the_read_timeout(
        image: bytes, loop_factory: Callable[..., Loop]) -> None:
    """SHA256SUMS at a byte a second keeps every read timeout (3 s here) alive: it is refused
    once the timeout passed without 1 MiB of it (the whole file), nothing written, instead of
    holding the run for as long as the server likes (75 s here; hours for a larger file)."""
    body = f"{hashlib.sha256(image).hexdigest()}  disk.img\n".encode()
    stop = threading.Event()

    def trickle(request: bytes, conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        for byte in body:
            conn.sendall(bytes([byte]))
            if stop.wait(1):
                return

    def answer(request: bytes, conn: socket.socket) -> None:
        send(conn, "200 OK", [("ETag", '"v1"'), ("Content-Length", str(len(image)))], image)

    server = RawServer(answer, sums=b"")
    server.sums_answer = trickle
    drive = loop_factory(4 * MiB, fill=PATTERN)
    try:
        started = time.monotonic()
        rc, _, err = flash(server.url(), drive)
        took = time.monotonic() - started
    finally:
        stop.set()
        server.close()
    assert rc == 2, err
    assert err == (f"popsicle-py: checksum file {server.url('/SHA256SUMS')}: stalled: less "
                   "than 1 MiB came in 3 s; nothing was written\n")
    assert took < 15
    assert untouched(drive)


@needs_root
def test_headers_that_trickle_are_a_timeout_not_a_hang(
        loop_factory: Callable[..., Loop]) -> None:
    """A server sending its headers a byte at a time keeps every read timeout (3 s) alive:
    each attempt ends once the headers did not all come within it, and the image is refused
    ("did not answer in time", exit 2) after the retries, not when the server is done."""
    stop = threading.Event()

    def trickle(request: bytes, conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 2000 + b"\r\n\r\n"
        for byte in head:
            conn.sendall(bytes([byte]))
            if stop.wait(0.1):
                return

    server = RawServer(trickle)
    drive = loop_factory(4 * MiB, fill=PATTERN)
    try:
        started = time.monotonic()
        rc, _, err = flash(server.url(), drive)
        took = time.monotonic() - started
    finally:
        stop.set()
        server.close()
    assert rc == 2, err
    assert refusal_after_retries(err) == (f"popsicle-py: {server.url()}: 127.0.0.1 did not "
                                          "answer in time")
    assert took < 20
    assert untouched(drive)


# ----------------------------------------------------------------------------------------------
# A resume the server never answers


@needs_root
def test_resumes_never_answered_give_up_after_the_documented_attempts(
        image: bytes, loop_factory: Callable[..., Loop]) -> None:
    """The body is cut at 1 MiB, and the server takes every resume and never answers it.
    README: after POPSICLE_PY_HTTP_RETRIES failed resumes in a row every drive fails; each
    resume is one attempt of the read timeout (1 s here), not itself retried as many times
    (3 resumes of 4 attempts: 16 s and more, instead of about 4)."""
    stop = threading.Event()

    def answer(request: bytes, conn: socket.socket) -> None:
        if asked_range(request) is not None:
            stop.wait(60)  # taken, never answered
            return
        head = (f"HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: {len(image)}\r\n\r\n")
        conn.sendall(head.encode() + image[:MiB])
        conn.shutdown(socket.SHUT_RDWR)

    server = RawServer(answer)
    drive = loop_factory(4 * MiB, fill=PATTERN)
    try:
        started = time.monotonic()
        proc = subprocess.run([*popsicle_cmd(), "flash", server.url(), drive.path, "--yes",
                               "--json"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120,
                              env={**os.environ, "POPSICLE_PY_HTTP_TIMEOUT": "1",
                                   "POPSICLE_PY_HTTP_RETRIES": "3",
                                   "POPSICLE_PY_HTTP_BACKOFF": "0.01",
                                   "POPSICLE_PY_HTTP_OUTAGE": "0"})
        took = time.monotonic() - started
    finally:
        stop.set()
        server.close()
    assert proc.returncode == 1, proc.stderr
    result = [json.loads(x) for x in proc.stdout.splitlines()][-1]["results"][0]
    assert result["error"] == (f"{drive.path}: {server.url()}: download failed at byte {MiB} "
                               f"of {len(image)} after 4 attempts: 127.0.0.1 did not answer "
                               "in time")
    assert took < 10, f"{took:.1f} s"
    assert untouched(drive)


@needs_root
def test_each_attempt_the_server_does_not_answer_is_said(
        loop_factory: Callable[..., Loop]) -> None:
    """A server that takes the connection and never answers: each attempt waits the read
    timeout (30 s by default, 6 of them), and nothing was said until the last one failed,
    which looked like a hang.  Each failed attempt is now said on stderr as it happens."""
    stop = threading.Event()

    def answer(request: bytes, conn: socket.socket) -> None:
        stop.wait(60)  # taken, never answered

    server = RawServer(answer)
    drive = loop_factory(4 * MiB, fill=PATTERN)
    try:
        proc = subprocess.run([*popsicle_cmd(), "flash", server.url(), drive.path, "--yes"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=60, env={**os.environ, "POPSICLE_PY_HTTP_TIMEOUT": "1",
                                               "POPSICLE_PY_HTTP_RETRIES": "2",
                                               "POPSICLE_PY_HTTP_BACKOFF": "0.01"})
    finally:
        stop.set()
        server.close()
    said = f"popsicle-py: {server.url()}: 127.0.0.1 did not answer in time"
    assert proc.stderr.splitlines() == [f"{said}; trying again (attempt 2 of 3)",
                                        f"{said}; trying again (attempt 3 of 3)", said]
    assert proc.returncode == 2
    assert untouched(drive)


@needs_root
def test_a_server_down_for_a_while_mid_download_is_waited_out(
        image: bytes, loop_factory: Callable[..., Loop]) -> None:
    """The connection drops at 1 MiB and the server answers 503 for 2 s (a restart): each
    resume is one attempt, and 1 failed attempt in a row was enough to fail every drive,
    in a fraction of a second.  Failures must also have lasted POPSICLE_PY_HTTP_OUTAGE (4 s
    here) before the download gives up: the drive is written, ok."""
    back_at: list[float] = []

    def answer(request: bytes, conn: socket.socket) -> None:
        at = asked_range(request)
        if at is None:
            conn.sendall(f"HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: {len(image)}"
                         "\r\n\r\n".encode() + image[:MiB])
            back_at.append(time.monotonic() + 2)
            conn.shutdown(socket.SHUT_RDWR)
        elif time.monotonic() < back_at[0]:
            send(conn, "503 Service Unavailable", [("Content-Length", "0")])
        else:
            send(conn, "206 Partial Content", [
                ("ETag", '"v1"'), ("Content-Length", str(len(image) - at)),
                ("Content-Range", f"bytes {at}-{len(image) - 1}/{len(image)}")], image[at:])

    server = RawServer(answer)
    drive = loop_factory(4 * MiB, fill=PATTERN)
    try:
        proc = subprocess.run([*popsicle_cmd(), "flash", server.url(), drive.path, "--yes",
                               "--no-checksum"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60,
                              env={**os.environ, **ENV, "POPSICLE_PY_HTTP_BACKOFF": "0.2",
                                   "POPSICLE_PY_HTTP_OUTAGE": "4"})
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert drive.read(len(image)) == image


def test_a_connection_error_to_an_ipv6_host_keeps_its_cause_whole() -> None:
    """The cause follows the connection's name, whose host may hold colons (an IPv6 literal
    with a zone): not cut at the host's last colon ("1%lo' ([Errno -2] ...")."""
    from urllib3.connection import HTTPConnection
    from urllib3.exceptions import NameResolutionError

    from popsicle_py.remote import transport_message

    error = NameResolutionError("::1%lo", HTTPConnection("::1%lo", 80),
                                socket.gaierror(-2, "Name or service not known"))
    assert transport_message("http://[::1%25lo]/disk.img", error) == (
        "http://[::1%25lo]/disk.img: cannot connect to ::1%25lo: Failed to resolve '::1%lo' "
        "([Errno -2] Name or service not known)")
