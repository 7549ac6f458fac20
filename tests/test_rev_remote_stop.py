"""A stop while a download's connection is stalled: the shell (or the station) is back at once.

A server sends the start of a body, then neither sends more nor closes: the client's read
waits for the socket's read timeout (60 s here).  A stop must not wait for it: the download
being copied whole (a zip, watch, the station) is abandoned within a couple of seconds.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Loop, needs_root, popsicle_cmd
from station_rig import Rig
from test_watch import needs_testbed
from webserver import wait_for

MiB = 1 << 20


class StallingServer:
    """The first GET gets a 200 and the first ``sent`` bytes of ``body``, then the connection
    closes (a drop: what the image's first look read ends there).  The resume (a Range from
    there) gets ``sent`` bytes more, then the connection stays open and silent.  ``stalled``
    is set once the client has read every byte of it (its kernel holds none unread)."""

    def __init__(self, body: bytes, sent: int) -> None:
        self.body, self.sent = body, sent
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stalled = threading.Event()
        self.done = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/disk.zip"

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            got = conn.recv(4096)
            if not got:
                return
            request += got
        if not request.startswith(b"GET /disk.zip "):  # no SHA256SUMS and the like
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            conn.close()
            return
        size = len(self.body)
        m = re.search(rb"Range: bytes=(\d+)-", request)
        start = int(m[1]) if m else 0
        status = "206 Partial Content" if m else "200 OK"
        span = f"Content-Range: bytes {start}-{size - 1}/{size}\r\n" if m else ""
        head = (f"HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {size - start}\r\n{span}ETag: \"v1\"\r\n\r\n").encode()
        try:
            conn.sendall(head + self.body[start : start + self.sent])
        except OSError:
            return
        if not m:
            conn.shutdown(socket.SHUT_RDWR)
            return
        client_port = conn.getpeername()[1]
        wait_for(lambda: _read_by_client(self.port, client_port), timeout=30)
        self.stalled.set()
        self.done.wait(120)

    def close(self) -> None:
        self.done.set()
        # Wakes the accepting thread first: a closed descriptor's number is soon another
        # test's listener, which that thread would then serve.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            conn.close()


def _read_by_client(server_port: int, client_port: int) -> bool:
    """Nothing sent is waiting, in either kernel, for the client to read it."""
    queues = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        tx, rx = (int(x, 16) for x in fields[4].split(":"))
        queues[(local, remote)] = (tx, rx)
    server = queues.get((server_port, client_port))
    client = queues.get((client_port, server_port))
    return server is not None and client is not None and server[0] == 0 and client[1] == 0


@pytest.fixture
def zip_body() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("disk.img", os.urandom(3 * MiB))
    return out.getvalue()


@pytest.fixture
def stalling(zip_body: bytes) -> Iterator[StallingServer]:
    server = StallingServer(zip_body, 256 << 10)
    try:
        yield server
    finally:
        server.close()


@needs_root
def test_ctrl_c_while_a_zip_download_is_stalled_gives_the_shell_back_at_once(
        stalling: StallingServer, loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A zip at a URL is downloaded whole first: Ctrl-C there is `cancelled` (130) within a
    couple of seconds, not when the socket's 60 s read timeout ends; nothing is written and
    the private copy is removed."""
    drive = loop_factory(4 * MiB, fill=0x5A)
    proc = subprocess.Popen([*popsicle_cmd(), "flash", stalling.url(), drive.path,
                             "--yes", "--json"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, "POPSICLE_PY_HTTP_TIMEOUT": "60",
                                 "TMPDIR": str(tmp_path)})
    try:
        assert stalling.stalled.wait(60)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - started
        assert proc.returncode == 130, err
        assert took < 3, f"the shell came back {took:.1f} s after Ctrl-C"
        assert "Traceback" not in err
        assert "resuming" not in err
        assert drive.read(MiB) == bytes([0x5A]) * MiB
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("popsicle")] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_testbed
@pytest.mark.umockdev
def test_station_stop_while_the_download_is_stalled_ends_it_at_once(
        stalling: StallingServer, tmp_path: Path) -> None:
    """The station downloads a URL whole first: a stop while its connection is silent ends
    the station with 0 within a couple of seconds."""
    with Rig(tmp_path / "rig") as rig:
        rig.start([stalling.url(), "--yes", "--journal", str(tmp_path / "j.sqlite"),
                   "--listen", "127.0.0.1:0", "--no-power-off"],
                  env={"TMPDIR": str(tmp_path), "POPSICLE_PY_HTTP_TIMEOUT": "60"},
                  watching=False)
        assert stalling.stalled.wait(60)
        assert rig.post("/api/stop") == (202, {"stopping": True})
        started = time.monotonic()
        assert rig.wait_exit(timeout=90) == 0
        took = time.monotonic() - started
        assert took < 3, f"the station ended {took:.1f} s after the stop"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("popsicle")] == []


@needs_root
def test_ctrl_c_while_a_cached_download_streams_leaves_nothing_in_the_cache(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """flash --cache of a URL, Ctrl-C while its connection is silent: the shell is back with
    130, and the cache holds no partial download (it would stay until `cache clean`, as
    large as what arrived, one per try)."""
    from webserver import Served, serving

    data = os.urandom(3 * MiB)
    drive = loop_factory(4 * MiB, fill=0x5A)
    home = tmp_path / "home"
    with serving() as web:
        web.add("/disk.img", Served(data, stall_at=[2 * MiB]))
        proc = subprocess.Popen([*popsicle_cmd(), "flash", web.url("/disk.img"), drive.path,
                                 "--yes", "--json", "--cache", "--bucket-size", "1M"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL,
                                env={**os.environ, "POPSICLE_PY_HTTP_TIMEOUT": "60",
                                     "XDG_CACHE_HOME": str(home)})
        try:
            # Once the drive holds what came before the silence, the download waits on it.
            wait_for(lambda: drive.read(MiB, MiB) == data[MiB : 2 * MiB], timeout=60)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 130, err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert list((home / "popsicle-py").iterdir()) == []
