"""The station's web server: aiohttp on its own event loop, in one thread beside the session.

The socket is bound when the station is prepared (a port in use is a refusal, exit 2, before
any drive is written); the loop starts with the session and stops after it, once the last
events reached the pages.  The token is read from its file, or made (0600) when missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import socket
import threading

from aiohttp import web

from popsicle_py.station.api import PAGE_INTERVAL, Station, make_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8737


class ServerError(Exception):
    """The server cannot start; one line for the user (exit 2, nothing written)."""


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT``, ``HOST`` or ``:PORT``; ServerError if not."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, str(DEFAULT_PORT)
    host = host.strip("[]") or DEFAULT_HOST
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ServerError(f"--listen {text}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerError(f"--listen {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ServerError(f"--listen {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ipaddress.ip_address(host).is_unspecified:
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def read_token(path: str) -> tuple[str, bool]:
    """The token in ``path``; a new random one written there (0600) when it is missing.
    Returns (token, made)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ServerError(f"--token-file {path}: the file is empty")
        return token, False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ServerError(f"--token-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ServerError(f"--token-file {path}: not UTF-8 text") from None
    token = secrets.token_urlsafe(24)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    except OSError as exc:
        raise ServerError(f"--token-file {path}: {exc.strerror or exc}") from None
    return token, True


class Server:
    """Runs the app on ``sock`` in a thread until :meth:`stop`."""

    def __init__(self, station: Station, sock: socket.socket) -> None:
        self.station = station
        self.sock = sock
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="popsicle-station-http",
                                        daemon=True)
        self._runner: web.AppRunner | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            raise ServerError(f"the web server did not start: {self.error}")

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # said by start(), on the caller's thread
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._cleanup())
        self.loop.close()

    async def _start(self) -> None:
        self.station.hub.attach(self.loop)
        app = make_app(self.station)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     keepalive_timeout=15, max_line_size=4096,
                                     max_field_size=4096, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, self.sock).start()

    async def _cleanup(self) -> None:
        hub = self.station.hub
        hub.notify()
        await asyncio.sleep(2 * PAGE_INTERVAL)  # the pages get the last state
        hub.closing = True
        hub.notify()
        for client in list(hub.clients):
            client.wake.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        """Deliver what is queued, end the streams, close the socket (from any thread)."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
