"""A web server on 127.0.0.1 with knobs for every way a download goes wrong.

Threaded ``http.server`` speaking HTTP/1.1 (keep-alive, Range, If-Range), serving bytes from
memory or from a file.  Each :class:`Served` file can drop the connection at given offsets,
stall there, ignore Range, lie about its length, or turn into another version after its first
request, answer a resume without its validators, or trickle a byte at a time; every request is
logged so a test can assert what the client asked for.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Served:
    """One file and its misbehaviours."""

    data: bytes = b""
    file: Path | None = None  # served from disk instead (large bench images)
    etag: str | None = '"v1"'
    last_modified: str | None = "Tue, 01 Dec 2026 10:00:00 GMT"
    content_type: str = "application/octet-stream"
    drop_at: list[int] = field(default_factory=list)  # close the connection here, once each
    stall_at: list[int] = field(default_factory=list)  # stop sending here, once each
    ignore_range: bool = False
    claim: int | None = None  # the Content-Length announced for the whole file
    later: Served | None = None  # served from the second request on (the file changed)
    status: int | None = None  # answer this status instead
    empty_206: bool = False  # a Range past the end gets an empty 206, not 416 (some servers)
    refuse_from: int | None = None  # a Range from here on gets 503 (a server that broke)
    ignore_if_range: bool = False  # a Range is served whatever If-Range says (a bad mirror)
    trickle_at: int | None = None  # from here on, one byte per trickle_every seconds
    trickle_every: float = 0.2

    @property
    def size(self) -> int:
        return self.file.stat().st_size if self.file is not None else len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        if self.file is None:
            return self.data[offset : offset + length]
        with open(self.file, "rb") as f:
            f.seek(offset)
            return f.read(length)


@dataclass
class Request:
    path: str
    range: str | None
    if_range: str | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, Served] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[Request] = []
        self.seen: dict[str, int] = {}
        self.release = threading.Event()  # ends every stall
        self.lock = threading.Lock()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-body is what these tests do


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_error(405)

    def do_GET(self) -> None:
        srv = self.server
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.requests.append(Request(path, self.headers.get("Range"),
                                        self.headers.get("If-Range")))
            count = srv.seen.get(path, 0)
            srv.seen[path] = count + 1
        if path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        served = srv.files.get(path)
        if served is not None and served.later is not None and count >= 1:
            served = served.later
        if served is None or served.status is not None:
            status = 404 if served is None or served.status is None else served.status
            body = f"<html><body>error {status}</body></html>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self._send(served)

    def _send(self, f: Served) -> None:
        size = f.size
        start = 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        partial = False
        if rng and not f.ignore_range:
            m = _RANGE.fullmatch(rng.strip())
            fresh = f.ignore_if_range or if_range is None or if_range in (f.etag,
                                                                          f.last_modified)
            if m and fresh:
                start = int(m[1])
                if f.refuse_from is not None and start >= f.refuse_from:
                    self.send_error(503)
                    return
                if start >= size and f.empty_206:
                    self.send_response(206)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                partial = True
        announced = f.claim if f.claim is not None and not partial else size - start
        self.send_response(206 if partial else 200)
        self.send_header("Content-Type", f.content_type)
        self.send_header("Accept-Ranges", "none" if f.ignore_range else "bytes")
        self.send_header("Content-Length", str(announced))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        if f.etag:
            self.send_header("ETag", f.etag)
        if f.last_modified:
            self.send_header("Last-Modified", f.last_modified)
        if f.claim is not None and not partial:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        pos = start
        try:
            while pos < size:
                if f.trickle_at is not None and pos >= f.trickle_at:
                    self.wfile.write(f.read(pos, 1))
                    self.wfile.flush()
                    pos += 1
                    if self.server.release.wait(f.trickle_every):  # the server closes
                        self._hang_up()
                        return
                    continue
                stop = size
                trickle = () if f.trickle_at is None else (f.trickle_at,)
                for cut in (*f.drop_at, *f.stall_at, *trickle):
                    if pos < cut < stop:
                        stop = cut
                while pos < stop:
                    chunk = f.read(pos, min(256 << 10, stop - pos))
                    self.wfile.write(chunk)
                    pos += len(chunk)
                if pos in f.drop_at:
                    f.drop_at.remove(pos)
                    self._hang_up()
                    return
                if pos in f.stall_at:
                    f.stall_at.remove(pos)
                    self.wfile.flush()
                    self.server.release.wait(60)
                    self._hang_up()
                    return
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True

    def _hang_up(self) -> None:
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class WebServer:
    """A running server: ``add(path, Served)``, ``url(path)``, ``requests``."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self._srv = _Server()
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self._srv.socket = ctx.wrap_socket(self._srv.socket, server_side=True)
            self.scheme = "https"
        self.port = self._srv.server_address[1]
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()

    def add(self, path: str, served: Served) -> Served:
        self._srv.files[path] = served
        return served

    def redirect(self, path: str, to: str) -> None:
        self._srv.redirects[path] = to

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> list[Request]:
        return list(self._srv.requests)

    def requests_for(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def close(self) -> None:
        self._srv.release.set()
        self._srv.shutdown()
        self._srv.server_close()


@contextlib.contextmanager
def serving(tls: tuple[Path, Path] | None = None) -> Iterator[WebServer]:
    server = WebServer(tls)
    try:
        yield server
    finally:
        server.close()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no system trusts (made with openssl)."""
    import subprocess

    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@dataclass
class RawRequest:
    """One request to a :class:`RawServer`: its path, headers (lower-case names) and its
    number among the requests for that path (1 for the first)."""

    path: str
    headers: dict[str, str]
    n: int
    #: Sends at once (a route that sends part of its answer, then stalls).
    send: Callable[[bytes], None]


#: What a raw route answers: the bytes to send, and whether to close the connection after.
RawRoute = Callable[[RawRequest], tuple[bytes, bool]]


class RawServer:
    """A server that sends exactly the bytes a route gives (status line and headers too):
    chunked bodies cut short, encodings on the wire, anything ``http.server`` would fix."""

    def __init__(self) -> None:
        self.routes: dict[str, RawRoute] = {}
        self.requests: list[RawRequest] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn, conn.makefile("rb") as f:
            while line := f.readline().decode("latin1").strip():
                headers = {}
                while header := f.readline().decode("latin1").strip():
                    name, _, value = header.partition(":")
                    headers[name.strip().lower()] = value.strip()
                path = line.split()[1]
                n = 1 + sum(r.path == path for r in self.requests)
                self.requests.append(RawRequest(path, headers, n, conn.sendall))
                route = self.routes.get(path)
                data, close = (route(self.requests[-1]) if route is not None else
                               (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", False))
                conn.sendall(data)
                if close:
                    conn.shutdown(socket.SHUT_RDWR)
                    return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._sock.close()


@contextlib.contextmanager
def raw_serving() -> Iterator[RawServer]:
    server = RawServer()
    try:
        yield server
    finally:
        server.close()


def answer(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """A status line, headers and a body, as sent."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.1 {status}\r\n{lines}\r\n".encode("latin1") + body


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    """Poll ``predicate()`` until true (no fixed sleeps in tests)."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


__all__ = ["RawRequest", "RawRoute", "RawServer", "Served", "WebServer", "answer", "chunk",
           "raw_serving", "self_signed", "serving", "wait_for"]
