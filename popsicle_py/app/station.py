"""The station use case: ``watch``'s session with slots, a web page, an HTTP API, a journal.

:func:`prepare_station` makes every check of ``watch`` (it prepares one), then loads the
slot map, opens and locks the journal (one station per journal), reads or makes the token
and binds the listening socket: any problem is a :class:`Refused` (exit 2) before a drive
is touched.  ``run(view, cancel)``
recovers the journal (rows a crash left in flight become ``interrupted``), starts the web
server, and runs the session with the slot map as its admission rule and the page's stop as
its drain.  :func:`learn_slots` makes a slot map; :func:`read_records` exports the journal.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from popsicle_py import events, files
from popsicle_py import watch as watch_mod
from popsicle_py.app.confirm import Confirmation
from popsicle_py.app.station_requests import LearnRequest, StationRequest
from popsicle_py.app.watch import PreparedWatch, prepare_watch
from popsicle_py.certify.writer import Place
from popsicle_py.drives import Drive
from popsicle_py.errors import EXIT_OK, Refused
from popsicle_py.events import JsonObject
from popsicle_py.images.stillness import ImageChanged
from popsicle_py.pacing import Clock
from popsicle_py.ports import port_path_of
from popsicle_py.signals import Cancellation, say_on_stderr
from popsicle_py.station import hook as hook_mod
from popsicle_py.station import journal as journal_mod
from popsicle_py.station import slots as slots_mod
from popsicle_py.station.api import Station
from popsicle_py.station.board import Board
from popsicle_py.station.hook import Hook
from popsicle_py.station.hub import Hub
from popsicle_py.station.recorder import Recorder, Tagger
from popsicle_py.station.server import (
    Server,
    ServerError,
    bind,
    is_loopback,
    parse_listen,
    raise_descriptor_limit,
    read_token,
    url_of,
)
from popsicle_py.station.view import StationView, Terminal

__all__ = ["LearnRequest", "PreparedStation", "StationRequest", "learn_slots",
           "prepare_station", "read_records"]


def image_sha256(path: str, stall_timeout: float | None = None) -> str:
    """The image file's SHA-256, for the records and the page.

    Read on a thread of its own (as a checksum is): an image on a hung disk or network
    share holds neither Ctrl-C nor the station for good; less than 1 MiB in
    ``stall_timeout`` seconds, or a read error, is a refusal (exit 2, nothing written).
    """
    from popsicle_py.engine.watched import WorkStalled, watched
    from popsicle_py.failures import hung_check

    digest = hashlib.sha256()
    read = [0]

    def work(clock: Clock, stopped: Callable[[], bool]) -> str:
        with open(path, "rb") as f:
            while not stopped() and (chunk := f.read(1 << 20)):
                digest.update(chunk)
                read[0] += len(chunk)
                clock.advance(len(chunk))
        return digest.hexdigest()

    try:
        found = watched(work, cancel=None, stall_timeout=stall_timeout, name="image-sha256",
                        hung_note=hung_check(path, "a read of the image for its SHA-256"))
    except WorkStalled as exc:
        raise Refused([f"{path} stopped answering while its SHA-256 was computed: "
                       + (f"no data for {exc.limit:g} s (is the disk or network share it "
                          "is on hung?)" if not exc.moved
                          else f"only {exc.moved // 1024} KiB in {exc.limit:g} s")]) from None
    except OSError as exc:
        raise Refused([f"{path} could not be read for its SHA-256 (at byte {read[0]}): "
                       f"{exc.strerror or exc}"]) from None
    return found or ""


class EarlyStop:
    """A stop before the station took its first drive abandons what it is doing.

    Downloading the image or decompressing it listens to the cancellation, not to the
    drain: ``POST /api/stop`` then requests the cancellation, so that the step ends at once
    rather than when it is done.  Once a drive has been taken a stop only drains (the drives
    being written are finished).  :meth:`stop` runs on the server's loop, :meth:`take` on
    the session's thread (the admission rule, last): the lock orders the two.
    """

    def __init__(self, drain: threading.Event, cancel: Cancellation) -> None:
        self.drain, self.cancel = drain, cancel
        self._lock = threading.Lock()
        self._taken = False
        self.cancelled = False  # the stop ended the preparation (no drive was ever taken)
        self._said = False

    def stop(self) -> None:
        with self._lock:
            if not self._taken and not self.cancel():
                self.cancelled = True
                self.cancel.request()
            if not self._said:  # the terminal's operator learns why the station ends
                self._said = True
                say_on_stderr("stop asked for (POST /api/stop): " + (
                    "no drive is being written, ending now" if self.cancelled
                    else "the drives being written are finished, no new one is taken"))

    def take(self) -> bool:
        """A drive is about to be taken: False once a stop came (it is refused)."""
        with self._lock:
            if self.drain.is_set():
                return False
            self._taken = True
            return True


class PreparedStation:
    """A station that passed every check; :meth:`run` serves and writes until stopped."""

    def __init__(self, request: StationRequest, watch: PreparedWatch,
                 slot_map: slots_mod.SlotMap | None, sock: socket.socket, token: str,
                 token_file: str, token_made: bool, journal_path: str, sha256: str,
                 hook: list[str] | None = None, lock: int | None = None) -> None:
        self.request = request
        self.watch = watch
        self.slot_map = slot_map
        self.sock = sock
        self.url = url_of(sock)
        self.token, self.token_file, self.token_made = token, token_file, token_made
        self.journal_path = journal_path
        self.lock = lock  # the journal's, held until close(): one station per journal
        self.sha256 = sha256
        self.hook = hook
        self.name = request.name or socket.gethostname()
        self.exit_status = 0
        self.drain = threading.Event()
        certificates = watch.certificates
        if certificates is not None:  # who, where, which slot (the port's, without a map)
            certificates.place = Place(self.name, request.batch or None,
                                       request.operator or None,
                                       slot_map.label_of if slot_map is not None
                                       else lambda port: port)
            if not watch.image.compressed:  # the file's digest is the image's
                certificates.image_sha256 = certificates.image_sha256 or sha256 or None

    @property
    def notes(self) -> tuple[str, ...]:
        return self.watch.notes

    @property
    def confirmation(self) -> Confirmation:
        c = self.watch.confirmation
        where = (f"only the {len(self.slot_map.slots)} ports of the slot map "
                 f"({', '.join(self.slot_map.labels)})" if self.slot_map is not None
                 else "every eligible USB/SD drive (no slot map)")
        return Confirmation(f"Station {self.name}: {c.title.split(': ', 1)[-1]}", c.rows,
                            c.notes, c.question, watch=True,
                            warning=f"Drives plugged in from now on are overwritten: {where}.")

    def __enter__(self) -> PreparedStation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.watch.close()
        self.sock.close()
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def admit(self, hub: Hub, tagger: Tagger,
              early: EarlyStop | None = None) -> Callable[[Drive, int], str | None]:
        """The session's admission rule: a drive on a port of the map (or none at all), in a
        slot no other drive holds, and no stop asked for meanwhile."""
        slot_map = self.slot_map

        def admit(drive: Drive, seq: int) -> str | None:
            port = port_path_of(drive)
            if slot_map is not None and slot_map.label_of(port) is None:
                return (f"not in a slot: port {port} is not in the slot map" if port
                        else "not in a slot: not on a USB port")
            if drive.size > 0:  # a card reader's empty slot holds no slot of ours
                why = tagger.take(port, drive.path)
                if why is not None:
                    return why
            if early is not None and not early.take():
                return "stopping: no new drive is written"
            hub.admitted[seq] = drive.identity  # its tile's, for identify
            return None

        return admit

    def run(self, terminal: Terminal, cancel: Cancellation) -> events.Summary:
        """Serve the page and the API, write the drives; ``terminal`` shows each event with
        its slot.  :attr:`exit_status`: 0 after a stop (the API, or a signal while no drive is
        being written), 128 + signal when a signal cut a drive short, else as ``watch``."""
        request, watch = self.request, self.watch
        still = watch.source.still  # taken as the image was opened, before its SHA-256
        if still is not None:
            try:
                still()
            except ImageChanged as exc:  # at the confirmation, say: the digest is another's
                raise Refused([f"{watch.image.path} changed since its SHA-256 was read "
                               f"({exc.how}): start again; nothing was written"]) from None
        journal = journal_mod.Journal(self.journal_path, station=self.name,
                                      session=uuid.uuid4().hex, batch=request.batch,
                                      operator=request.operator)
        try:
            recovered = journal.recover()
            counters = journal_mod.counts(journal.db, request.batch)
            before = journal_mod.last_seq(journal.db, request.batch)  # the batch goes on
            image = watch.image
            board = Board.with_slots(
                self.slot_map.labels if self.slot_map is not None else (),
                image={"name": os.path.basename(image.path), "path": image.path,
                       "size": image.size, "sha256": self.sha256},
                station={"name": self.name, "id": uuid.uuid4().hex, "started": time.time(),
                         "batch": request.batch, "operator": request.operator},
                # The counters are the batch's, so is the target: --count more than it had.
                target=None if request.watch.count is None
                else counters["total"] + request.watch.count,
                counters=counters, verify=request.watch.verify)
            hub = Hub(board)
            early = EarlyStop(self.drain, cancel)
            server = Server(Station(hub, self.token, self.journal_path, self.drain,
                                    on_stop=early.stop, loopback=is_loopback(self.sock)),
                            self.sock)
            try:
                server.start()
            except ServerError as exc:
                raise Refused([str(exc)]) from None
            hook = None
            if self.hook is not None:
                def warn(line: str) -> None:  # from a hook's thread: the page, and stderr
                    hub.post(events.Note(line), None)
                    say_on_stderr(line)

                hook = Hook(self.hook, warn)
            tagger = Tagger(self.slot_map)
            station_view = StationView(tagger, Recorder(
                journal, image.path, self.sha256, request.watch.verify), hub, terminal, hook)
            try:
                for note in self.start_notes(recovered, before):
                    terminal.handle(events.Note(note), None)
                if watch.personaliser is not None and self.slot_map is not None:
                    watch.personaliser.slot_of = self.slot_map.label_of  # {slot}: the label
                hooks = watch_mod.WatchOptions(admit=self.admit(hub, tagger, early),
                                               drain=self.drain,
                                               first_seq=before + 1, still=still)
                summary = watch.run(station_view, cancel, hooks=hooks)
                if hook is not None:
                    hook.join(cancel, say_on_stderr)
            finally:
                server.stop()
        finally:
            journal.close()
        # Stopped (the API, or a signal) with no drive cut short: a station's normal end, 0;
        # the drives that failed are in the journal.  A drive cancelled: 128 + signal.  The
        # API's stop before any drive was taken cancelled the preparation: 0 as well.
        stopped = (((self.drain.is_set() or cancel()) and not summary.cancelled)
                   or early.cancelled)
        self.exit_status = EXIT_OK if stopped else watch.exit_status
        return summary

    def start_notes(self, recovered: int, before: int = 0) -> list[str]:
        notes = [f"station {self.name}: {self.url}",
                 f"token for POST requests: {self.token} (in {self.token_file})"]
        if not is_loopback(self.sock):
            notes.append("listening beyond this machine: anyone on the network reads the "
                         "page; POST requests still need the token")
        if recovered:
            notes.append(f"journal: {recovered} drive(s) left in flight by the last run are "
                         "recorded interrupted")
        if before:
            batch = f"batch {self.request.batch}" if self.request.batch else "the unnamed batch"
            notes.append(f"journal: {batch} goes on: the next drive is seq {before + 1}")
        return notes


def prepare_station(request: StationRequest) -> PreparedStation:
    """Every check of watch, then the slot map, the journal, the token, the socket."""
    raise_descriptor_limit()
    slot_map = None
    if request.slots is not None:
        try:
            slot_map = slots_mod.load(request.slots)
        except slots_mod.SlotMapError as exc:
            raise Refused([str(exc)]) from None
    try:
        hook = hook_mod.parse(request.hook) if request.hook is not None else None
    except hook_mod.HookError as exc:
        raise Refused([str(exc)]) from None
    journal_path = request.journal or journal_mod.default_path()
    token_file = request.token_file or os.path.join(
        os.path.dirname(os.path.abspath(journal_path)), "station.token")
    try:
        journal_mod.connect(journal_path, create=True).close()
        lock = journal_mod.hold(journal_path)  # this station's until it is closed
    except journal_mod.JournalError as exc:
        raise Refused([str(exc)]) from None
    try:
        return _prepare(request, slot_map, hook, journal_path, token_file, lock)
    except BaseException:
        os.close(lock)
        raise


def _prepare(request: StationRequest, slot_map: slots_mod.SlotMap | None,
             hook: list[str] | None, journal_path: str, token_file: str,
             lock: int) -> PreparedStation:
    try:
        host, port = parse_listen(request.listen)
        token, made = read_token(token_file)
    except ServerError as exc:
        raise Refused([str(exc)]) from None
    watch = prepare_watch(request.watch)
    try:
        sock = bind(host, port)
    except ServerError as exc:
        watch.close()
        raise Refused([str(exc)]) from None
    checksum = watch.source.checksum
    try:
        if checksum is not None and checksum.algo == "sha256":
            sha256 = checksum.hexdigest.lower()
        elif watch.source.local:
            sha256 = image_sha256(watch.image.path, request.watch.stall_timeout)
        else:
            sha256 = ""
    except BaseException:
        sock.close()
        watch.close()
        raise
    return PreparedStation(request, watch, slot_map, sock, token, token_file, made,
                           journal_path, sha256, hook, lock)


def learn_slots(request: LearnRequest, say: Callable[[str], None],
                cancel: Callable[[], bool]) -> slots_mod.SlotMap | None:
    """Ask for a stick in each slot in turn and write the map; None when cancelled.

    Nothing is opened: a stick's port is read from sysfs as it appears.
    """
    from popsicle_py.drives import udev_hint
    from popsicle_py.station.learn import learn

    note = udev_hint()  # without udevd no stick is ever seen: say so, never wait in silence
    if note is not None:
        say(note)
    found = learn(request.labels, say, cancel)
    if found is None:
        return None
    slot_map = slots_mod.SlotMap(tuple(found))
    tmp = f"{request.path}.tmp"
    try:
        with files.create_regular(tmp) as f:
            f.write(slots_mod.dump(found).encode())
        os.replace(tmp, request.path)
    except OSError as exc:
        raise Refused([f"{request.path}: {exc.strerror or exc}"]) from None
    return slot_map


def read_records(path: str | None, batch: str | None) -> list[JsonObject]:
    try:
        return journal_mod.read_records(path or journal_mod.default_path(), batch)
    except journal_mod.JournalError as exc:
        raise Refused([str(exc)]) from None
