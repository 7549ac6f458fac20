"""The station's parts without a testbed: the slot map, the hub between the session's thread
and the server's loop, the board, and the refusals (exit 2, one line, nothing written)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import json
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import popsicle_cmd

from popsicle_py import events
from popsicle_py.station import slots
from popsicle_py.station.board import Board
from popsicle_py.station.hub import Hub

MiB = 1 << 20


def test_a_slot_map_reads_back_what_it_wrote_in_order() -> None:
    written = [slots.Slot("10", "1-1.4"), slots.Slot("2", "1-1.2"), slots.Slot("A3", "3-2")]
    read = slots.parse(slots.dump(written))
    assert list(read.slots) == written
    assert read.labels == ("10", "2", "A3")
    assert read.label_of("1-1.2") == "2" and read.label_of("1-9") is None
    assert read.label_of(None) is None


@pytest.mark.parametrize(("text", "words"), [
    ("", "no [[slot]] entries"),
    ("[[slot]]\nlabel = 'a b'\nport = '1-2'\n", "the label must be"),
    ("[[slot]]\nlabel = '1'\nport = 'sdb'\n", "the port must be a USB port path"),
    ("[[slot]]\nlabel = '1'\nport = '1-2'\n[[slot]]\nlabel = '1'\nport = '1-3'\n",
     "the label '1' is used twice"),
    ("[[slot]]\nlabel = '1'\nport = '1-2'\n[[slot]]\nlabel = '2'\nport = '1-2'\n",
     "slots 1 and 2 have the same port 1-2"),
    ("[[slot]\n", "not valid TOML"),
])
def test_a_bad_slot_map_says_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(slots.SlotMapError, match=words.replace("[", r"\[")):
        slots.parse(text)


def test_learn_labels() -> None:
    assert slots.learn_labels(3, None) == ("1", "2", "3")
    assert slots.learn_labels(None, "A1, A2,B1") == ("A1", "A2", "B1")
    with pytest.raises(slots.SlotMapError):
        slots.learn_labels(None, None)
    with pytest.raises(slots.SlotMapError, match="twice"):
        slots.learn_labels(None, "A,A")


def _board() -> Board:
    return Board.with_slots(("1", "2"), image={"name": "x", "size": 1, "sha256": ""},
                            station={"name": "s", "id": "i", "started": 0.0})


def test_the_hub_never_waits_and_merges_progress_but_drops_no_result() -> None:
    """The session's thread posts while the loop is busy (not running at all here): the
    queue holds one progress per drive plus every other event, and each post is quick."""
    hub = Hub(_board())
    loop = asyncio.new_event_loop()
    try:
        hub.attach(loop)
        info = events.DriveInfo(1, "1-1")
        hub.post(events.DriveAdded("/dev/sdb", "stick", MiB, True, None, info), "1")
        hub.post(events.Phase("/dev/sdb", events.Step.WRITING), "1")
        slowest = 0.0
        for n in range(20000):
            start = time.perf_counter()
            hub.post(events.Progress("/dev/sdb", events.Step.WRITING, n, 20000), "1")
            slowest = max(slowest, time.perf_counter() - start)
        hub.post(events.Result(events.DriveResult("/dev/sdb", events.Status.OK, MiB,
                                                  verified=True)), "1")
        assert len(hub._pending) == 4  # added, phase, one progress, result
        assert slowest < 0.05
        loop.call_soon(loop.stop)
        loop.run_forever()  # the flush scheduled by the first post
    finally:
        loop.close()
    state = hub.board.snapshot(time.monotonic())
    assert state["slots"][0]["state"] == "done" and state["counters"]["ok"] == 1
    # The loop closed: a post still returns (the drives go on without the page).
    hub.post(events.Note("late"), None)


def test_posting_from_many_threads_keeps_each_drives_order() -> None:
    hub = Hub(_board())
    loop = asyncio.new_event_loop()
    hub.attach(loop)
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        def drive(n: int) -> None:
            device = f"/dev/sd{chr(98 + n)}"
            hub.post(events.DriveAdded(device, "s", MiB, True, None,
                                       events.DriveInfo(n, f"1-{n}")), str(n % 2 + 1))
            for step in (events.Step.WRITING, events.Step.VERIFYING):
                hub.post(events.Phase(device, step), str(n % 2 + 1))
                for k in range(500):
                    hub.post(events.Progress(device, step, k, 500), str(n % 2 + 1))
        threads = [threading.Thread(target=drive, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = threading.Event()
        loop.call_soon_threadsafe(done.set)
        assert done.wait(5)
        states = {s["label"]: s["state"] for s in hub.board.snapshot(0)["slots"]}
        assert states == {"1": "verifying", "2": "verifying"}
    finally:
        loop.call_soon_threadsafe(loop.stop)


def _station(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    image = tmp_path / "image.img"
    image.write_bytes(b"\0" * MiB)
    return subprocess.run([*popsicle_cmd(), "station", str(image), "--yes", "--journal",
                           str(tmp_path / "j.sqlite"), *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, check=False)


def test_a_bad_slot_map_is_refused_before_anything(tmp_path: Path) -> None:
    bad = tmp_path / "slots.toml"
    bad.write_text("[[slot]]\nlabel = '1'\nport = 'usb'\n")
    done = _station(tmp_path, "--slots", str(bad))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"popsicle-py: --slots {bad}: slot 1: the port must be a USB port path such as "
        "1-1.2 (got 'usb')"]
    assert done.stdout == ""


def test_a_port_in_use_or_a_bad_listen_is_refused(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _station(tmp_path, "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().endswith(f"--listen 127.0.0.1:{port}: Address already in use")
    done = _station(tmp_path, "--listen", "127.0.0.1:http")
    assert done.returncode == 2
    assert "the port must be a number" in done.stderr
    done = _station(tmp_path, "--listen", "::1")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == ("popsicle-py: --listen ::1: an IPv6 address goes in brackets "
                           "(give HOST:PORT, HOST, PORT, :PORT, [IPv6] or [IPv6]:PORT)\n")


@pytest.mark.parametrize("text, wanted", [
    ("0", ("127.0.0.1", 0)), ("8080", ("127.0.0.1", 8080)), (":9", ("127.0.0.1", 9)),
    ("[::1]", ("::1", 8737)), ("[::1]:0", ("::1", 0)), ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("localhost", ("localhost", 8737)), ("127.0.0.1:0", ("127.0.0.1", 0))])
def test_listen_takes_a_port_a_host_or_both(text: str, wanted: tuple[str, int]) -> None:
    from popsicle_py.station.server import parse_listen

    assert parse_listen(text) == wanted


@pytest.mark.parametrize("text, why", [
    ("::1", "an IPv6 address goes in brackets"), ("[::1", "in brackets, the port after"),
    ("[::1]8", "in brackets, the port after"), ("[x]:1", "x in brackets is no IPv6"),
    ("", "not a host name"), ("a b", "not a host name"), ("h:", "the port must be a number"),
    ("70000", "the port must be a number"), ("h:http", "the port must be a number"),
    ("h:²", "the port must be a number"), ("127.0.0.1:²", "the port must be a number")])
def test_listen_refuses_anything_else_in_one_line(text: str, why: str) -> None:
    from popsicle_py.station.server import ServerError, parse_listen

    with pytest.raises(ServerError) as caught:
        parse_listen(text)
    assert why in str(caught.value) and "\n" not in str(caught.value)


def test_a_hook_that_cannot_be_split_is_refused(tmp_path: Path) -> None:
    done = _station(tmp_path, "--hook", "say 'unclosed")
    assert done.returncode == 2
    assert done.stderr == "popsicle-py: --hook \"say 'unclosed\": No closing quotation\n"


def test_a_token_file_that_is_not_text_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "token"
    bad.write_bytes(b"\xff\xfe\n")
    done = _station(tmp_path, "--token-file", str(bad), "--listen", "127.0.0.1:0")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"popsicle-py: --token-file {bad}: not UTF-8 text\n"


def test_records_of_a_missing_journal_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run([*popsicle_cmd(), "records", "--journal", str(tmp_path / "no.db")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr == f"popsicle-py: --journal {tmp_path / 'no.db'}: no such file\n"


def _foreign_database(path: Path) -> str:
    """Another program's SQLite file with a table named as ours; its SHA-256."""
    import hashlib
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("CREATE TABLE records (name TEXT)")
    db.execute("INSERT INTO records VALUES ('theirs')")
    db.commit()
    db.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_records_and_a_station_leave_another_programs_database_as_it_is(
        tmp_path: Path) -> None:
    """``records --journal FILE`` put another program's database in WAL mode and added 30
    columns to its table before failing with "unexpected error"; a station given it would
    have written its rows there. Both refuse it and change nothing; an empty file is no
    journal to export (it became a database)."""
    import hashlib

    theirs = tmp_path / "j.sqlite"
    before = _foreign_database(theirs)
    done = subprocess.run([*popsicle_cmd(), "records", "--journal", str(theirs)],
                          capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"popsicle-py: --journal {theirs}: not a station's journal (a "
                           "database of another program?); name a new file or a station's "
                           "journal\n")
    station = _station(tmp_path, "--listen", "127.0.0.1:0")
    assert (station.returncode, station.stderr) == (2, done.stderr), station.stderr
    assert hashlib.sha256(theirs.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.img", "j.sqlite"]
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    done = subprocess.run([*popsicle_cmd(), "records", "--journal", str(empty)],
                          capture_output=True, text=True, check=False)
    assert (done.returncode, done.stderr) == (
        2, f"popsicle-py: --journal {empty}: empty, not a station's journal\n")
    assert empty.stat().st_size == 0 and not (tmp_path / "empty.sqlite-wal").exists()


@contextlib.contextmanager
def _served(tmp_path: Path) -> Iterator[tuple[Any, str, int]]:
    """A station's web server in this process (token "secret"): (server, host, port)."""
    from popsicle_py.station.api import Station
    from popsicle_py.station.journal import Journal
    from popsicle_py.station.server import Server, bind

    journal = tmp_path / "j.sqlite"
    Journal(str(journal), station="s", session="x").close()
    sock = bind("127.0.0.1", 0)
    server = Server(Station(Hub(_board()), "secret", str(journal), threading.Event()), sock)
    server.start()
    try:
        host, port = sock.getsockname()[:2]
        yield server, host, port
    finally:
        server.stop()


def test_the_server_serves_only_its_assets_and_bounds_requests(tmp_path: Path) -> None:
    """In-process: the page's three files, nothing else; a large body is refused."""
    import http.client

    from popsicle_py.station.server import url_of

    with _served(tmp_path) as (server, host, port):
        def ask(method: str, path: str, body: bytes = b"",
                token: str | None = None) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()

        assert ask("GET", "/")[0] == 200
        assert b"EventSource" in ask("GET", "/static/app.js")[1]
        for path in ("/static/../api/slots", "/static/x.js", "/etc/passwd", "/static/"):
            assert ask("GET", path)[0] == 404, path
        assert ask("POST", "/api/stop", b"x" * 100_000, token="secret")[0] == 413
        assert ask("POST", "/api/stop", token="secrets")[0] == 401
        # A header that is not ASCII is a wrong token too, never a server error.
        raw = socket.create_connection((host, port), timeout=10)
        raw.sendall(b"POST /api/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                    b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
        raw.close()
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert not server.station.drain.is_set()
        assert ask("GET", "/api/records")[1] == b"[]"
        assert url_of(server.sock) == f"http://127.0.0.1:{port}/"


def test_a_client_gone_mid_body_is_no_server_error(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A client that sends part of a body and goes away (anyone on the network can) leaves
    no traceback in the station's log; a POST without the token is refused before its body
    is read."""
    with _served(tmp_path) as (server, host, port):
        def send(headers: bytes) -> socket.socket:
            raw = socket.create_connection((host, port), timeout=10)
            raw.sendall(b"POST /api/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                        + headers + b"\r\nabc")
            return raw

        with send(b"") as raw:  # answered at once, the body never awaited
            assert raw.recv(4096).startswith(b"HTTP/1.1 401 ")
        with send(b"Authorization: Bearer secret\r\n") as raw:
            raw.shutdown(socket.SHUT_WR)
            while raw.recv(4096):
                pass
        assert not server.station.drain.is_set()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_head_on_a_stream_is_its_headers_alone(tmp_path: Path) -> None:
    """A HEAD gets no endless body: the same connection serves the next request."""
    import http.client

    with _served(tmp_path) as (_, host, port):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        for path, kind in (("/api/stream", "text/event-stream"),
                           ("/api/events", "application/x-ndjson")):
            conn.request("HEAD", path)
            head = conn.getresponse()
            assert (head.status, head.getheader("Content-Type")) == (200, kind)
            assert head.read() == b""
            conn.request("GET", "/api/records")
            assert conn.getresponse().read() == b"[]", path


IDENTIFY_A_DEAD_DRIVE = """
import os, sys, threading, time, urllib.request
from popsicle_py.identity import MediaIdentity
from popsicle_py.station.api import Station
from popsicle_py.station.board import Board
from popsicle_py.station.hub import Hub
from popsicle_py.station.journal import Journal
from popsicle_py.station.server import Server, bind

work, dead = sys.argv[1], sys.argv[2]
Journal(work + "/j.sqlite", station="s", session="x").close()
board = Board.with_slots(("A1",), image={}, station={})
board.tiles["A1"].device, board.tiles["A1"].state = dead, "done"
board.tiles["A1"].identity = MediaIdentity(dead, 0, 0)  # as a FIFO reads: no device
hub = Hub(board)
sock = bind("127.0.0.1", 0)
server = Server(Station(hub, "t", work + "/j.sqlite", threading.Event(), 0.5), sock)
server.start()
url = "http://127.0.0.1:%d/api/slots/A1/identify" % sock.getsockname()[1]
asked = urllib.request.Request(url, method="POST", headers={"Authorization": "Bearer t"})
print(urllib.request.urlopen(asked, timeout=10).status, flush=True)
while hub.snapshot()["slots"][0]["identify"]:
    time.sleep(0.05)
print("highlight off", flush=True)
server.stop()
print("stopped", flush=True)
"""


def test_identify_on_a_drive_that_never_answers_keeps_nothing_waiting(tmp_path: Path) -> None:
    """A drive whose open never returns (a FIFO: a dead stick): the highlight ends after the
    identify time and the process ends once the server stops (nothing joins the reader)."""
    import os
    import sys

    dead = tmp_path / "sdz"
    os.mkfifo(dead)
    proc = subprocess.Popen([sys.executable, "-c", IDENTIFY_A_DEAD_DRIVE, str(tmp_path),
                             str(dead)], stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert out.splitlines() == ["202", "highlight off", "stopped"]
    assert proc.returncode == 0


def test_records_exports_the_journal_as_text_csv_and_json(tmp_path: Path) -> None:
    from popsicle_py.station.journal import Journal

    path = tmp_path / "j.sqlite"
    journal = Journal(str(path), station="bench", session="s1", batch="b1", operator="ada",
                      clock=lambda: 1_800_000_000.0)
    row = journal.start("A1", {"seq": 1, "device": "/dev/sdb", "serial": "SN1",
                               "vendor": "SanDisk", "model": "Cruzer"})
    journal.finish(row, {"result": "ok", "verified": True, "bytes_written": MiB,
                         "ended": "2027-01-15T08:00:00Z", "error": ""})
    journal.start("A2", {"seq": 2, "device": "/dev/sdc", "serial": "SN2"})
    journal.start("A3", {"seq": 3, "device": "/dev/sdd", "serial": "=HYPERLINK(\"x\")",
                         "model": "+1", "vendor": "-"})
    journal.close()

    def records(*args: str) -> str:
        return subprocess.run([*popsicle_cmd(), "records", "--journal", str(path), *args],
                              capture_output=True, text=True, check=True).stdout

    assert records().splitlines()[:2] == [
        "    1  2027-01-15T08:00:00Z  slot A1  ok           SanDisk Cruzer SN1",
        "    2  2027-01-15T08:00:00Z  slot A2  in-flight    SN2"]
    rows = json.loads(records("--json", "--batch", "b1"))
    assert [(r["slot"], r["result"], r["verified"]) for r in rows] == [
        ("A1", "ok", True), ("A2", "in-flight", None), ("A3", "in-flight", None)]
    assert (rows[2]["serial"], rows[2]["model"]) == ('=HYPERLINK("x")', "+1")
    lines = records("--csv").splitlines()
    assert lines[0].split(",")[:6] == ["id", "session", "station", "batch", "operator", "slot"]
    assert ",ok,true," in lines[1] and len(lines) == 4
    # A cell a spreadsheet would run as a formula (the stick's own words) gets a leading '.
    third = list(csv.DictReader(lines))[2]
    assert (third["serial"], third["model"], third["vendor"]) == (
        "'=HYPERLINK(\"x\")", "'+1", "'-")
    assert records("--json", "--batch", "none") == "[]\n"


def test_the_terminal_says_each_drives_slot() -> None:
    import io

    from popsicle_py.station.view import SlotJsonView, SlotPlainView

    out = io.StringIO()
    plain = SlotPlainView(out)
    info = events.DriveInfo(1, "1-3", "SanDisk", "Cruzer Blade", "SN", 64 * MiB)
    plain.handle(events.DriveAdded("/dev/sdc", "SanDisk Cruzer Blade", 64 * MiB, True, None,
                                   info), "A3")
    plain.handle(events.Note("a note for everyone"), None)
    plain.handle(events.DriveRemoved("/dev/sdc"), "A3")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[slot A3] /dev/sdc: added")
    assert lines[1] == "a note for everyone"
    assert lines[2] == "[slot A3] /dev/sdc: removed"
    out = io.StringIO()
    SlotJsonView(out).handle(events.DriveRemoved("/dev/sdc"), "A3")
    assert json.loads(out.getvalue()) == {"event": "drive_removed", "device": "/dev/sdc",
                                          "slot": "A3"}


def _added(device: str, port: str, seq: int | None, eligible: bool = True,
           reason: str | None = None) -> events.DriveAdded:
    info = events.DriveInfo(seq, port, "Generic", "Card Reader", "SN", 64 * MiB)
    return events.DriveAdded(device, "Generic Card Reader", 64 * MiB, eligible, reason, info)


def _result(device: str, seq: int, ok: bool) -> events.Result:
    info = events.DriveInfo(seq, "1-4", "Generic", "Card Reader", "SN", 64 * MiB)
    if ok:
        return events.Result(events.DriveResult(device, events.Status.OK, MiB, drive=info))
    return events.Result(events.DriveResult(device, events.Status.FAILED, 0,
                                            f"{device}: the drive was removed",
                                            cause=events.Cause.REMOVED, drive=info))


def test_a_failure_counts_on_the_page_when_its_tile_shows_another_drive() -> None:
    """A drive pulled mid-write, another put in the slot before the first one's end came."""
    board = _board()
    board.apply(_added("/dev/sde", "1-4", 1), "1", 0)
    board.apply(events.DriveRemoved("/dev/sde"), "1", 0)
    board.apply(_added("/dev/sdg", "1-4", 2), "1", 0)
    board.apply(_result("/dev/sde", 1, ok=False), "1", 0)
    snapshot = board.snapshot(0)
    assert snapshot["counters"] | {"in_flight": 0} == {"ok": 0, "failed": 1, "total": 1,
                                                      "in_flight": 0, "target": None}
    first = snapshot["slots"][0]
    assert (first["label"], first["device"], first["state"]) == ("1", "/dev/sdg", "probing")


def test_a_slot_holds_one_drive_until_it_ends_or_leaves() -> None:
    from popsicle_py.station.recorder import Tagger

    mapped = Tagger(slots.SlotMap((slots.Slot("A1", "1-4"),)))
    assert mapped.take("1-4", "/dev/sde") is None
    assert mapped.slot(_added("/dev/sde", "1-4", 1)) == "A1"
    assert mapped.take("1-4", "/dev/sdf") == "slot A1 holds /dev/sde already: one drive per slot"
    assert mapped.take("1-4", "/dev/sde") is None  # the same drive again (a card reader's)
    mapped.slot(_result("/dev/sde", 1, ok=True))
    assert mapped.take("1-4", "/dev/sdf") is None  # the first one ended: the slot is free
    mapped.slot(_added("/dev/sdf", "1-4", None, eligible=False, reason="too small"))
    assert mapped.take("1-4", "/dev/sdg") is None  # refused after all: it holds nothing
    assert mapped.slot(_added("/dev/sdg", "1-4", 2)) == "A1"
    mapped.slot(events.DriveRemoved("/dev/sdg"))
    assert mapped.take("1-4", "/dev/sdh") is None  # pulled out: the slot is free
    # Without a map, a second card on the port gets a tile of its own.
    unmapped = Tagger(None)
    assert unmapped.take("1-4", "/dev/sde") is None
    assert unmapped.slot(_added("/dev/sde", "1-4", 1)) == "1-4"
    assert unmapped.take("1-4", "/dev/sdf") is None
    assert unmapped.slot(_added("/dev/sdf", "1-4", 2)) == "1-4/sdf"
    assert unmapped.slot(_result("/dev/sdf", 2, ok=True)) == "1-4/sdf"


def test_a_powered_off_drive_keeps_its_done_tile_when_the_kernel_removes_its_disk() -> None:
    """Powering a stick off makes the kernel delete its disk ("remove"), the stick still in
    its slot: the tile says "done", powered off (pull me), until another drive comes."""
    board = _board()
    board.apply(_added("/dev/sde", "1-4", 1), "1", 0)
    board.apply(_result("/dev/sde", 1, ok=True), "1", 1)
    board.apply(events.Phase("/dev/sde", events.Step.DONE, events.POWERED_OFF), "1", 1)
    board.apply(events.DriveRemoved("/dev/sde"), "1", 2)
    tile = board.snapshot(2)["slots"][0]
    assert (tile["state"], tile["device"], tile["powered_off"]) == ("done", "/dev/sde", True)
    board.apply(_added("/dev/sdf", "1-4", 2), "1", 3)
    tile = board.snapshot(3)["slots"][0]
    assert (tile["state"], tile["device"], tile["powered_off"]) == ("probing", "/dev/sdf",
                                                                    False)
    # A drive that was not powered off and leaves: the slot is empty.
    board.apply(_result("/dev/sdf", 2, ok=True), "1", 4)
    board.apply(events.DriveRemoved("/dev/sdf"), "1", 5)
    assert board.snapshot(5)["slots"][0]["state"] == "empty"


def test_records_of_a_journal_moved_or_replaced_is_a_json_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The journal moved away or overwritten while the station runs: GET /api/records says
    so in one JSON line (503), and the station's log gets no traceback."""
    import http.client

    journal = tmp_path / "j.sqlite"
    with _served(tmp_path) as (_, host, port):
        def ask(path: str) -> tuple[int, Any]:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, json.loads(response.read())

        journal.rename(tmp_path / "moved.sqlite")
        assert ask("/api/records") == (503, {"error": f"--journal {journal}: no such file"})
        journal.write_bytes(b"not a database" * 100)
        status, body = ask("/api/records?format=csv")
        assert status == 503 and body["error"].startswith(f"--journal {journal}: ")
        assert "\n" not in body["error"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_the_station_raises_its_descriptor_limit_to_the_hard_one(tmp_path: Path) -> None:
    """A service's soft limit (often 1024) is raised before anything is opened; the
    connections served at once leave the drives their share of it."""
    script = ("import resource\n"
              "from popsicle_py.station.server import connection_cap, raise_descriptor_limit\n"
              "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))\n"
              "low = connection_cap()\n"
              "raise_descriptor_limit()\n"
              "print(low, resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard),"
              " connection_cap())\n")
    done = subprocess.run([*popsicle_cmd()[:1], "-c", script], capture_output=True,
                          text=True, check=True)
    assert done.stdout.split() == ["8", "True", "256"]  # 300 - 256 - 128: the floor


def test_malformed_requests_get_their_400_and_leave_no_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]) -> None:
    """Anyone on the network can send a header line too long, too many headers, or not
    HTTP at all: each gets its 400 and the station's stderr stays quiet."""
    with _served(tmp_path) as (_, host, port):
        def send(request: bytes) -> bytes:
            with socket.create_connection((host, port), timeout=10) as raw:
                raw.sendall(request)
                answer = b""
                while chunk := raw.recv(65536):
                    answer += chunk
                return answer.split(b"\r\n", 1)[0]

        many = b"".join(b"X%d: a\r\n" % n for n in range(500))
        head = b"GET /api/slots HTTP/1.1\r\nHost: x\r\n"
        for request in (head + b"X: " + b"a" * 10000 + b"\r\n\r\n", head + many + b"\r\n",
                        b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"GARBAGE\r\n\r\n", head + b"\x00\r\n\r\n"):
            assert send(request).split(b" ", 1)[1].startswith(b"4"), request[:40]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("option", ["--token-file", "--slots"])
def test_a_fifo_or_a_device_named_as_a_small_file_is_one_line_at_once(
        tmp_path: Path, option: str) -> None:
    """A FIFO would hold the start for ever (with Ctrl-C ignored), /dev/zero would fill
    memory, a large file is no token or map: each is refused in one line, exit 2."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"a" * (2 << 20))
    image = tmp_path / "image.img"
    image.write_bytes(b"\0" * MiB)
    for path, words in ((fifo, "is a pipe, not a regular file"),
                        ("/dev/zero", "is a character device, not a regular file"),
                        (big, "is larger than")):
        done = subprocess.run([*popsicle_cmd(), "station", str(image), "--yes", "--journal",
                               str(tmp_path / "j.sqlite"), "--listen", "127.0.0.1:0", option,
                               str(path)], capture_output=True, text=True, timeout=20,
                              stdin=subprocess.DEVNULL, check=False)
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert done.stderr.startswith(f"popsicle-py: {option} {path}: {words}"), done.stderr
        assert len(done.stderr.splitlines()) == 1


def _feed(tmp_path: Path, slot_map: slots.SlotMap | None,
          happened: list[events.WatchEvent]) -> tuple[Board, list[dict[str, Any]]]:
    """The events through the slot tagger, the journal and the board, as a station does:
    the board, and the journal's records."""
    from popsicle_py.station.journal import Journal, read_records
    from popsicle_py.station.recorder import Recorder, Tagger

    path = str(tmp_path / "j.sqlite")
    journal = Journal(path, station="s", session="x")
    tagger, recorder = Tagger(slot_map), Recorder(journal, "image.img", "", verify=True)
    board = Board.with_slots(slot_map.labels if slot_map is not None else (),
                             image={}, station={})
    for event in happened:
        slot = tagger.slot(event)
        recorder.handle(event, slot)
        board.apply(event, slot, 0)
    journal.close()
    return board, read_records(path)


def _on(device: str, port: str, seq: int) -> events.DriveAdded:
    info = events.DriveInfo(seq, port, "SanDisk", "Cruzer", f"SN{seq}", 64 * MiB)
    return events.DriveAdded(device, "SanDisk Cruzer", 64 * MiB, True, None, info)


def _ended(device: str, port: str, seq: int, ok: bool) -> events.Result:
    r = _result(device, seq, ok).result
    info = events.DriveInfo(seq, port, "SanDisk", "Cruzer", f"SN{seq}", 64 * MiB)
    return events.Result(dataclasses.replace(r, drive=info))


def test_a_drive_pulled_mid_write_ends_in_its_own_slot_when_another_has_its_name(
        tmp_path: Path) -> None:
    """No map: stick 1 (port 1-3) is pulled mid-write and stick 2 (port 1-4) comes under the
    same /dev name before stick 1's end: that end is stick 1's, in its slot and its row."""
    board, found = _feed(tmp_path, None, [
        _on("/dev/sdc", "1-3", 1), events.DriveRemoved("/dev/sdc"), _on("/dev/sdc", "1-4", 2),
        _ended("/dev/sdc", "1-3", 1, ok=False)])
    tiles = {t["label"]: (t["state"], t["device"]) for t in board.snapshot(0)["slots"]}
    assert tiles == {"1-3": ("failed", "/dev/sdc"), "1-4": ("probing", "/dev/sdc")}
    assert [(r["seq"], r["slot"], r["result"]) for r in found] == [
        (1, "1-3", "failed"), (2, "1-4", "in-flight")]


def test_a_stick_that_bounces_in_its_slot_leaves_no_row_in_flight(tmp_path: Path) -> None:
    """A bad contact: plugged, out, in again at once.  The first appearance's end (failed)
    is its own row's; the second one's tile and row are the second's."""
    mapped = slots.SlotMap((slots.Slot("A1", "1-3"),))
    board, found = _feed(tmp_path, mapped, [
        _on("/dev/sdc", "1-3", 1), events.DriveRemoved("/dev/sdc"), _on("/dev/sdc", "1-3", 2),
        _ended("/dev/sdc", "1-3", 1, ok=False), _ended("/dev/sdc", "1-3", 2, ok=True)])
    snapshot = board.snapshot(0)
    assert [(t["label"], t["state"]) for t in snapshot["slots"]] == [("A1", "done")]
    assert snapshot["counters"] | {"in_flight": 0} == {"ok": 1, "failed": 1, "total": 2,
                                                      "in_flight": 0, "target": None}
    assert [(r["seq"], r["slot"], r["result"]) for r in found] == [
        (1, "A1", "failed"), (2, "A1", "ok")]


def _late(device: str, seq: int) -> list[events.WatchEvent]:
    """What a pulled drive's lane says after another drive got its name: progress, its end."""
    W, F = events.Step.WRITING, events.Step.FAILED
    return [events.Progress(device, W, 32 * MiB, 64 * MiB, seq=seq),
            events.Phase(device, F, f"{device}: the drive was removed", events.Cause.REMOVED,
                         seq=seq)]


def test_a_pulled_drives_late_progress_reaches_no_tile_of_the_next_drive_of_its_name(
        tmp_path: Path) -> None:
    """No map: stick 1 (port 1-3) pulled mid-write, stick 2 (port 1-4) comes as /dev/sdc
    and is being probed when stick 1's lane says its last progress and its end: those are
    stick 1's tile's (its slot), never stick 2's, whose tile stays as it was."""
    W = events.Step.WRITING
    happened = [_on("/dev/sdc", "1-3", 1), events.Phase("/dev/sdc", W, seq=1),
                events.Progress("/dev/sdc", W, 8 * MiB, 64 * MiB, seq=1),
                events.DriveRemoved("/dev/sdc"), _on("/dev/sdc", "1-4", 2),
                events.Phase("/dev/sdc", events.Step.PROBING, seq=2), *_late("/dev/sdc", 1)]
    from popsicle_py.station.recorder import Tagger

    tagger = Tagger(None)
    assert [tagger.slot(e) for e in happened] == [
        "1-3", "1-3", "1-3", "1-3", "1-4", "1-4", "1-3", "1-3"]
    board, found = _feed(tmp_path, None, happened)
    tiles = {t["label"]: t for t in board.snapshot(0)["slots"]}
    assert (tiles["1-4"]["state"], tiles["1-4"]["progress"]) == ("probing", None)
    assert tiles["1-3"]["progress"] == 0.25  # half written, nothing verified
    assert [(r["seq"], r["slot"], r["result"]) for r in found] == [
        (1, "1-3", "in-flight"), (2, "1-4", "in-flight")]


def test_a_pulled_drives_late_progress_reaches_no_new_drive_in_its_own_slot(
        tmp_path: Path) -> None:
    """A mapped slot: the stick bounces (out, in again as /dev/sdc): the first appearance's
    late progress is not the second's, on the tile or in the second's row."""
    mapped = slots.SlotMap((slots.Slot("A1", "1-3"),))
    W = events.Step.WRITING
    board, found = _feed(tmp_path, mapped, [
        _on("/dev/sdc", "1-3", 1), events.Phase("/dev/sdc", W, seq=1),
        events.DriveRemoved("/dev/sdc"), _on("/dev/sdc", "1-3", 2),
        events.Phase("/dev/sdc", W, seq=2),
        events.Progress("/dev/sdc", W, 4 * MiB, 64 * MiB, seq=2), *_late("/dev/sdc", 1),
        _ended("/dev/sdc", "1-3", 1, ok=False)])
    tile = board.snapshot(0)["slots"][0]
    assert (tile["state"], tile["progress"]) == ("writing", 0.0312)  # its 4 MiB, not 32
    assert [(r["seq"], r["result"]) for r in found] == [(1, "failed"), (2, "in-flight")]


def test_the_hub_never_merges_the_progress_of_two_drives_of_one_name() -> None:
    """A pulled drive still ending and the next drive given its name: each one's progress
    waits for the page on its own (the newest of each wins), neither replaces the other."""
    hub = Hub(_board())
    W = events.Step.WRITING
    for seq in (1, 2, 1, 2):
        hub.post(events.Progress("/dev/sdb", W, seq * MiB, 64 * MiB, seq=seq), "1")
    assert [(e.seq, e.done) for e, *_ in hub._pending] == [  # type: ignore[union-attr]
        (1, MiB), (2, 2 * MiB)]
