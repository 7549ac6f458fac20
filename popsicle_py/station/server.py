"""The station's web server: aiohttp on its own event loop, in one thread beside the session.

The socket is bound when the station is prepared (a port in use is a refusal, exit 2, before
any drive is written); the loop starts with the session and stops after it, once the last
events reached the pages.  The token is read from its file, or made (0600) when missing.

Anyone who reaches ``--listen`` may connect (the page needs no token): connections beyond
:func:`connection_cap` are answered 503 and closed at once, so that clients never take the
descriptors the drives need; and what goes wrong in the server (a malformed request, a
client gone) is said in one line, once, never as a traceback per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import secrets
import socket
import threading
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from popsicle_py import files
from popsicle_py.signals import say_on_stderr
from popsicle_py.station.api import PAGE_INTERVAL, Station, make_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8737
#: A token file is a line; anything larger is not one.
MAX_TOKEN_FILE = 4096
#: Connections served at once, at most (a page holds one or two).
MAX_CONNECTIONS = 256
#: Descriptors left to the drives, the journal and the rest when the limit is low.
RESERVED_DESCRIPTORS = 256
#: Connections asyncio accepts in one go before it runs anything else: those beyond the cap
#: hold a descriptor each until their 503 is sent, so they are reserved for too.
ACCEPT_BURST = 128
_BUSY_BODY = b'{"error": "too many connections to this station; try again later"}\n'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Retry-After: 5\r\nConnection: close\r\nContent-Length: "
         + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class ServerError(Exception):
    """The server cannot start; one line for the user (exit 2, nothing written)."""


#: What --listen takes, as said when it is given something else.
LISTEN_FORMS = "HOST:PORT, HOST, PORT, :PORT, [IPv6] or [IPv6]:PORT"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``PORT`` (on the default host), ``:PORT``, ``[v6]`` or
    ``[v6]:PORT``; ServerError, one line, for anything else."""
    def refuse(why: str) -> ServerError:
        return ServerError(f"--listen {text or repr(text)}: {why} (give {LISTEN_FORMS})")

    if text.isascii() and text.isdigit():  # a bare port: "--listen 0", "--listen 8080"
        host, port_text = DEFAULT_HOST, text
    elif text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise refuse("an IPv6 address goes in brackets, the port after them")
        host, port_text = inside, rest[1:] if rest else str(DEFAULT_PORT)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise refuse(f"{host or 'nothing'} in brackets is no IPv6 address") from None
    elif text.count(":") > 1:
        raise refuse("an IPv6 address goes in brackets")
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = str(DEFAULT_PORT)
        host = host or DEFAULT_HOST
        if not text or any(c.isspace() or c in "[]/" for c in host):
            raise refuse("not a host name or address")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise refuse("the port must be a number from 0 to 65535")
    return host, int(port_text)


def bind(host: str, port: int) -> socket.socket:
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerError(f"--listen {shown}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ServerError(f"--listen {shown}: {exc.strerror or exc}") from None
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
        token = files.read_regular(path, MAX_TOKEN_FILE).decode("utf-8").strip()
        if not token:
            raise ServerError(f"--token-file {path}: the file is empty")
        return token, False
    except FileNotFoundError:
        pass
    except OSError as exc:  # a FIFO, a device, a huge file too: one line, nothing waits
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


def raise_descriptor_limit() -> None:
    """The soft limit of open descriptors up to the hard one: a station holds a few per drive
    and one per page, and a service's soft limit (often 1024) is the hard one's default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def connection_cap() -> int:
    """How many connections are served at once: :data:`MAX_CONNECTIONS`, fewer when the
    descriptor limit would leave less than :data:`RESERVED_DESCRIPTORS` to the drives once
    a burst of :data:`ACCEPT_BURST` connections beyond the cap is being answered."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, soft - RESERVED_DESCRIPTORS - ACCEPT_BURST))


class _Busy(asyncio.Protocol):
    """A connection beyond the cap: 503, closed at once (the descriptor is freed)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted from its creation to its end (counting
    aiohttp's own list would miss the connections accepted in the same burst)."""

    def __init__(self, inner: asyncio.Protocol, server: Server) -> None:
        self.inner = inner
        self.server = server
        server.open_connections += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open_connections -= 1
        self.inner.connection_lost(exc)


class _OnceEach:
    """What the web server's parts log, as one line the first time each thing is said.

    aiohttp logs a traceback for every request it cannot parse, and asyncio one for every
    failed accept(): any client could fill the log.  A malformed request is the client's own
    (its 400 tells it): not said at all.  With --debug, everything goes to the log as is.
    """

    def __init__(self) -> None:
        self.said: set[str] = set()

    def say(self, text: str) -> None:
        line = " ".join(text.split())
        if line not in self.said:
            self.said.add(line)
            say_on_stderr(f"web server: {line}")

    def logger(self) -> logging.Logger:
        owner = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                exc = record.exc_info[1] if record.exc_info else None
                if logging.getLogger().isEnabledFor(logging.DEBUG):
                    logging.getLogger("popsicle_py.station.http").handle(record)
                elif record.levelno >= logging.WARNING and not isinstance(
                        exc, HttpProcessingError):
                    owner.say(f"{record.getMessage()}: {exc}" if exc is not None
                              else record.getMessage())

        logger = logging.Logger("popsicle_py.station.http")  # no parent: only this handler
        logger.addHandler(Handler())
        return logger

    def loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            loop.default_exception_handler(context)
            return
        exc = context.get("exception")
        self.say(f"{context.get('message', 'error')}: {exc}" if exc is not None
                 else str(context.get("message", "error")))


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
        self._listener: asyncio.AbstractServer | None = None
        self._quiet = _OnceEach()
        self.cap = connection_cap()
        self.open_connections = 0
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
        self.loop.run_until_complete(self._cancel_the_rest())
        self.loop.close()

    async def _start(self) -> None:
        self.loop.set_exception_handler(self._quiet.loop_error)
        self.station.hub.attach(self.loop)
        app = make_app(self.station)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     keepalive_timeout=15, max_line_size=4096,
                                     max_field_size=4096, shutdown_timeout=1.0,
                                     logger=self._quiet.logger())
        await self._runner.setup()
        served = self._runner.server
        assert served is not None

        def connection() -> asyncio.BaseProtocol:
            if self.open_connections >= self.cap:
                return _Busy()
            return _Counted(served(), self)

        self._listener = await self.loop.create_server(connection, sock=self.sock)

    async def _cleanup(self) -> None:
        hub = self.station.hub
        hub.notify()
        await asyncio.sleep(2 * PAGE_INTERVAL)  # the pages get the last state
        hub.closing = True
        hub.notify()
        for client in list(hub.clients):
            client.wake.set()
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    async def _cancel_the_rest() -> None:
        """What a connection still runs (a body never sent in full) ends with the loop."""
        rest = asyncio.all_tasks() - {asyncio.current_task()}
        for task in rest:
            task.cancel()
        if rest:
            await asyncio.wait(rest, timeout=1.0)

    def stop(self) -> None:
        """Deliver what is queued, end the streams, close the socket (from any thread)."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
