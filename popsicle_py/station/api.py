"""The station's HTTP API and page, as an aiohttp application.

    GET  /                              the page (its assets: /static/app.js, /static/style.css)
    GET  /api/slots                     the page's state as JSON
    GET  /api/stream                    that state as Server-Sent Events (what the page reads)
    GET  /api/events                    the events as NDJSON, each with its "slot"
    GET  /api/records[?batch=B][&format=csv]    the journal (503 when it cannot be read)
    POST /api/slots/{label}/identify    read that slot's drive a few seconds, highlight it
                                        (409: the drive the slot shows is gone)
    POST /api/stop                      finish the drives being written, take no new one
    GET  /metrics                       Prometheus' text format

Every POST needs ``Authorization: Bearer TOKEN``.  Only the page's own three assets are
served; request bodies are bounded (:data:`MAX_BODY`) and so is the time of every request
that is not a stream (:data:`REQUEST_SECONDS`).  On a loopback address, a request whose
``Host`` names anything else is answered 421: a web page of another site whose name was
pointed at 127.0.0.1 (DNS rebinding) reads no journal, serials or operator names.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web
from prometheus_client import CollectorRegistry

from popsicle_py.engine.supervisor import keep_signals_for_main_thread
from popsicle_py.identity import MediaIdentity
from popsicle_py.station import journal as journal_mod
from popsicle_py.station import metrics
from popsicle_py.station.hub import EventClient, Hub
from popsicle_py.station.identify import IDENTIFY_SECONDS, gone, read_for

MAX_BODY = 4096
REQUEST_SECONDS = 10.0
#: How often a page gets a new state at most (its events are merged in between).
PAGE_INTERVAL = 0.1
#: A comment line keeps an idle stream open through proxies, and finds dead clients.
KEEPALIVE_SECONDS = 15.0
ASSETS = {"/": ("index.html", "text/html"), "/static/app.js": ("app.js", "text/javascript"),
          "/static/style.css": ("style.css", "text/css")}
STREAMS = ("/api/stream", "/api/events")
_STREAM_HEADERS = {"/api/stream": {"Content-Type": "text/event-stream",
                                   "Cache-Control": "no-cache"},
                   "/api/events": {"Content-Type": "application/x-ndjson",
                                   "Cache-Control": "no-cache"}}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Station:
    """What the handlers need: the hub (board, clients), the token, the journal, the stop."""

    hub: Hub
    token: str
    journal_path: str
    drain: threading.Event
    identify_seconds: float = IDENTIFY_SECONDS
    #: Called by ``POST /api/stop`` once ``drain`` is set: before any drive can be written
    #: (a download, a decompression), the station's preparation is abandoned at once.
    on_stop: Callable[[], None] | None = None
    #: Served on a loopback address: only requests addressed to a loopback name are answered.
    loopback: bool = False


#: What the application holds, typed (aiohttp's AppKey: string keys are deprecated there).
STATION_KEY = web.AppKey("station", Station)
ASSETS_KEY = web.AppKey("assets", dict[str, bytes])
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
TASKS_KEY = web.AppKey("tasks", set[asyncio.Future[None]])
READERS_KEY = web.AppKey("readers", dict[str, threading.Thread])


def _assets() -> dict[str, bytes]:
    folder = resources.files("popsicle_py.station") / "static"
    return {name: (folder / name).read_bytes() for name, _ in ASSETS.values()}


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The token for every POST; a time limit for every request but the streams."""
    station: Station = request.app[STATION_KEY]
    host = request.headers.get("Host")
    if station.loopback and host is not None and not addressed_locally(host):
        return web.json_response({"error": f"this station answers only at a loopback address "
                                  f"(localhost, 127.0.0.1, [::1]), not at {host[:100]!r}"},
                                 status=421)
    if request.method not in ("GET", "HEAD"):
        # The token first: a body is read only for a client that may post one.
        if not _authorized(request.headers.get("Authorization", ""), station.token):
            return web.json_response({"error": "a POST needs Authorization: Bearer TOKEN "
                                      "(the station printed it, and keeps it in its token "
                                      "file)"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        try:
            await asyncio.wait_for(request.read(), REQUEST_SECONDS)  # bounded: MAX_BODY
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": f"a body of at most {MAX_BODY} bytes"},
                                     status=413)
        except asyncio.TimeoutError:
            return web.json_response({"error": "timed out"}, status=408)
        except ConnectionError:  # the client went away mid-body: nobody to answer
            return web.Response(status=400)
    if request.path in STREAMS:
        if request.method == "HEAD":  # the headers alone: a stream's body never ends
            return web.Response(headers=_STREAM_HEADERS[request.path])
        return await handler(request)
    try:
        return await asyncio.wait_for(handler(request), REQUEST_SECONDS)
    except asyncio.TimeoutError:
        return web.json_response({"error": "timed out"}, status=503)


def addressed_locally(host: str) -> bool:
    """Whether a ``Host`` header names this machine's loopback: ``localhost`` (and its
    subdomains), a loopback address, with or without a port."""
    name = host.strip()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _authorized(given: str, token: str) -> bool:
    """``Bearer TOKEN``, compared in constant time; a header that is not text never matches."""
    try:
        raw = given.encode("utf-8", "surrogateescape")  # bytes that are not UTF-8 come so
    except UnicodeError:
        return False
    return hmac.compare_digest(raw, f"Bearer {token}".encode())


async def _asset(request: web.Request) -> web.Response:
    name, kind = ASSETS[request.path]
    return web.Response(body=request.app[ASSETS_KEY][name], content_type=kind,
                        headers={"Cache-Control": "no-cache"})


async def _slots(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATION_KEY].hub.snapshot())


async def _stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the whole state at each change (a page that missed some states
    needs only the last); ``retry`` makes the browser reconnect after a restart."""
    hub: Hub = request.app[STATION_KEY].hub
    response = web.StreamResponse(headers=_STREAM_HEADERS[request.path])
    await response.prepare(request)
    with contextlib.suppress(ConnectionResetError):  # the page went away: its stream ends
        await _send_states(hub, response)
    return response


async def _send_states(hub: Hub, response: web.StreamResponse) -> None:
    await response.write(b"retry: 1000\n\n")
    sent = -1
    while not hub.closing:
        changed = hub.changed
        if hub.board.version != sent:
            sent = hub.board.version
            data = json.dumps(hub.snapshot(), separators=(",", ":"))
            await response.write(f"event: state\ndata: {data}\n\n".encode())
            await asyncio.sleep(PAGE_INTERVAL)
            continue
        if changed is None:
            break
        try:
            await asyncio.wait_for(changed.wait(), KEEPALIVE_SECONDS)
        except asyncio.TimeoutError:
            await response.write(b": keepalive\n\n")


async def _events(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[STATION_KEY].hub
    response = web.StreamResponse(headers=_STREAM_HEADERS[request.path])
    await response.prepare(request)
    client = EventClient()
    hub.clients.add(client)
    try:
        while not hub.closing and not client.overflowed:
            while client.lines:
                await response.write(client.lines.popleft()[1])
            client.wake.clear()
            try:
                await asyncio.wait_for(client.wake.wait(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                await response.write(b"\n")
    except ConnectionResetError:  # the client went away
        pass
    finally:
        hub.clients.discard(client)
    return response


async def _records(request: web.Request) -> web.Response:
    station: Station = request.app[STATION_KEY]
    batch = request.query.get("batch")
    try:
        found = await asyncio.to_thread(journal_mod.read_records, station.journal_path, batch)
    except journal_mod.JournalError as exc:  # moved, replaced, damaged: the station goes on
        return web.json_response({"error": str(exc)}, status=503)
    if request.query.get("format") == "csv":
        return web.Response(text=journal_mod.to_csv(found), content_type="text/csv")
    return web.json_response(found)


async def _identify(request: web.Request) -> web.Response:
    station: Station = request.app[STATION_KEY]
    hub, label = station.hub, request.match_info["label"]
    tile = hub.board.tiles.get(label)
    if tile is None:
        return web.json_response({"error": f"no slot {label!r}"}, status=404)
    device, expected = tile.device, tile.identity
    reading = (device is not None and not tile.busy and not tile.powered_off
               and tile.state != "empty")
    if reading and device is not None:
        # Its /dev name may be another stick's by now (pulled, another one in): never read
        # that one.  Read from sysfs, off the loop (udev's database for the serial).
        why = await asyncio.to_thread(gone, device, expected)
        if why is not None:
            return web.json_response({"error": f"slot {label}: the drive it shows "
                                      f"({device}) is gone: {why}", "slot": label},
                                     status=409)
        _start_reading(request.app[READERS_KEY], device, expected, station.identify_seconds)
    tile.identify = True
    hub.board.version += 1
    hub.notify()
    seconds = station.identify_seconds

    async def identify() -> None:
        try:  # the highlight ends after the identify time, whatever the read does
            await asyncio.sleep(seconds)
        finally:
            current = hub.board.tiles.get(label)
            if current is not None:
                current.identify = False
            hub.board.version += 1
            hub.notify()

    tasks: set[asyncio.Future[None]] = request.app[TASKS_KEY]
    task = asyncio.ensure_future(identify())
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return web.json_response({"slot": label, "reading": reading, "seconds": seconds},
                             status=202)


def _start_reading(readers: dict[str, threading.Thread], device: str,
                   expected: MediaIdentity | None, seconds: float) -> None:
    """Read ``device`` for ``seconds`` on a thread of its own, one per drive at a time.

    A daemon thread, waited for by nobody: a drive whose reads never return (a dying stick)
    keeps neither the page nor the station's end waiting.
    """
    reader = readers.get(device)
    if reader is not None and reader.is_alive():
        return  # still reading (or stuck on) this drive: one more would only pile up

    def read() -> None:
        keep_signals_for_main_thread()  # stuck in a read, it must not take Ctrl-C or SIGTERM
        with contextlib.suppress(OSError):  # a drive pulled meanwhile: the highlight says
            read_for(device, expected, seconds)

    readers[device] = threading.Thread(target=read, name="popsicle-station-identify",
                                       daemon=True)
    readers[device].start()


async def _cancel_tasks(app: web.Application) -> None:
    tasks = app[TASKS_KEY]
    for task in list(tasks):
        task.cancel()


async def _stop(request: web.Request) -> web.Response:
    station: Station = request.app[STATION_KEY]
    station.drain.set()
    if station.on_stop is not None:
        station.on_stop()
    station.hub.board.stopping = True
    station.hub.board.version += 1
    station.hub.notify()
    return web.json_response({"stopping": True}, status=202)


async def _metrics(request: web.Request) -> web.Response:
    body = metrics.render(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; "
                                            "charset=utf-8"})


def make_app(station: Station) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_guard])
    app[STATION_KEY] = station
    app[ASSETS_KEY] = _assets()
    app[REGISTRY_KEY] = metrics.registry_for(station.hub.board)
    app[TASKS_KEY] = set()
    app[READERS_KEY] = {}
    app.on_cleanup.append(_cancel_tasks)
    for path in ASSETS:
        app.router.add_get(path, _asset)
    app.router.add_get("/api/slots", _slots)
    app.router.add_get("/api/stream", _stream)
    app.router.add_get("/api/events", _events)
    app.router.add_get("/api/records", _records)
    app.router.add_post("/api/slots/{label}/identify", _identify)
    app.router.add_post("/api/stop", _stop)
    app.router.add_get("/metrics", _metrics)
    return app
