"""``popsicle-py station`` under umockdev: slots, the journal across a SIGKILL, the API.

Each test plugs sticks into an umockdev testbed (real "add"/"remove" uevents, as the watch
tests do) through tests/station_driver.py, waits on the station's own JSON events, and reads
the bytes on the sticks, the journal (``popsicle-py records``) and the HTTP API.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import popsicle_cmd
from station_rig import MiB, Rig, slot_map
from test_watch import Stick, needs_testbed

pytestmark = [needs_testbed, pytest.mark.umockdev]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "rig") as rig:
        yield rig


def image(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "image.img"
    path.write_bytes(data)
    return path, data


def records(journal: Path, *args: str) -> list[dict[str, object]]:
    done = subprocess.run([*popsicle_cmd(), "records", "--journal", str(journal), "--json",
                           *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_sigkill_mid_batch_loses_no_finished_record_and_the_drive_in_flight_is_interrupted(
        rig: Rig, tmp_path: Path) -> None:
    data = image(tmp_path, 48 * MiB + 512)[1]
    path = tmp_path / "image.img"
    first, second = Stick("c", 3, 64 * MiB), Stick("d", 5, 128 * MiB)
    slots = slot_map(tmp_path / "slots.toml", {"A1": 3, "A2": 5})
    journal = tmp_path / "journal.sqlite"
    args = [str(path), "--yes", "--slots", str(slots), "--journal", str(journal),
            "--listen", "127.0.0.1:0", "--batch", "b1", "--operator", "ada", "--name", "bench",
            "--no-power-off"]
    rig.start(args)
    token_file = tmp_path / "station.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() == rig.token

    rig.add(first.description)
    ok = rig.wait(event="result", device=first.dev)
    assert ok["status"] == "ok" and ok["slot"] == "A1"
    # identify: read for a few seconds, the slot highlighted; POSTs need the token.
    assert rig.post("/api/slots/A1/identify", token=None)[0] == 401
    assert rig.post("/api/slots/Z9/identify")[0] == 404
    assert rig.post("/api/slots/A1/identify") == (202, {"slot": "A1", "reading": True,
                                                        "seconds": 4.0})
    assert [s["identify"] for s in rig.get("/api/slots")["slots"]] == [True, False]
    rig.add(second.description)
    rig.wait(event="progress", device=second.dev, phase="writing")
    assert rig.kill() == -9

    rows = records(journal)
    assert [(r["slot"], r["device"], r["result"]) for r in rows] == [
        ("A1", first.dev, "ok"), ("A2", second.dev, "in-flight")]
    done = rows[0]
    assert done["verified"] is True and done["bytes_written"] == len(data)
    assert (done["batch"], done["operator"], done["station"]) == ("b1", "ada", "bench")
    assert done["serial"] == "4C530001231105110003" and done["port_path"] == "1-3"
    assert done["image_sha256"] and len(str(done["image_sha256"])) == 64
    assert rig.read(first.dev)[: len(data)] == data  # type: ignore[index]

    # The next start marks the row interrupted, counts it failed, keeps the finished one.
    rig.start(args)
    note = [e for e in rig.events() if e.get("event") == "note" and "interrupted" in e["text"]]
    assert note and note[-1]["text"].startswith("journal: 1 drive(s) left in flight")
    slots_state = rig.get("/api/slots")
    assert slots_state["counters"] | {"in_flight": 0} == {
        "ok": 1, "failed": 1, "total": 2, "in_flight": 0, "target": None}
    assert [s["label"] for s in slots_state["slots"]] == ["A1", "A2"]
    rows = records(journal, "--batch", "b1")
    assert [r["result"] for r in rows] == ["ok", "interrupted"]
    assert "stopped while this drive was being written" in str(rows[1]["error"])
    assert records(journal, "--batch", "other") == []
    api_rows = rig.get("/api/records?batch=b1")
    assert [r["result"] for r in api_rows] == ["ok", "interrupted"]
    csv_text = rig.get("/api/records?format=csv")
    assert csv_text.splitlines()[0].startswith("id,session,station,batch,operator,slot,seq")
    assert ",ok,true," in csv_text.splitlines()[1]

    # POSTs need the token; with it, stop ends the station with 0.
    assert rig.post("/api/stop", token=None)[0] == 401
    assert rig.post("/api/stop", token="wrong")[0] == 401
    assert rig.post("/api/stop") == (202, {"stopping": True})
    assert rig.wait_exit() == 0


def test_a_stick_on_an_unmapped_port_is_announced_and_never_opened(
        rig: Rig, tmp_path: Path) -> None:
    path, data = image(tmp_path, 1 * MiB)
    mapped, stray = Stick("c", 3), Stick("d", 5)
    slots = slot_map(tmp_path / "slots.toml", {"1": 3})
    heard = tmp_path / "hook.txt"
    hook = f"sh -c 'echo \"$POPSICLE_SLOT $POPSICLE_RESULT $POPSICLE_SERIAL\" >> {heard}'"
    rig.start([str(path), "--yes", "--slots", str(slots), "--journal",
               str(tmp_path / "j.sqlite"), "--listen", "127.0.0.1:0", "--count", "1",
               "--hook", hook])
    rig.add(stray.description)
    added = rig.wait(event="drive_added", device=stray.dev)
    assert added["eligible"] is False and added["slot"] is None
    assert added["reason"] == "not in a slot: port 1-5 is not in the slot map"
    others = rig.get("/api/slots")["others"]
    assert [(o["device"], o["port"]) for o in others] == [(stray.dev, "1-5")]
    rig.add(mapped.description)
    rig.wait(event="result", device=mapped.dev, status="ok", slot="1")
    assert rig.wait_exit() == 0
    assert rig.read(stray.dev) == b"", "the stick on an unmapped port was written"
    assert not [e for e in rig.events() if e.get("event") == "phase"
                and e.get("device") == stray.dev]
    assert rig.read(mapped.dev)[: len(data)] == data  # type: ignore[index]
    assert heard.read_text() == "1 ok 4C530001231105110003\n"  # the hook, once, for slot 1


def test_learn_slots_takes_the_port_of_each_stick_in_turn(rig: Rig, tmp_path: Path) -> None:
    out = tmp_path / "learned.toml"
    rig.cursor = len(rig.lines)
    rig.command({"start": {"cmd": [*popsicle_cmd(), "slots", str(out), "--labels", "L,R"]}})
    _wait_line(rig, "plug a stick into slot L")
    rig.add(Stick("c", 3).description)
    _wait_line(rig, "slot L: port 1-3")
    rig.remove(Stick("c", 3).unplug)
    rig.add(Stick("c", 3).description)  # the same port again
    _wait_line(rig, "port 1-3 is slot L already")
    rig.add(Stick("d", 7).description)
    _wait_line(rig, "wrote 2 slot(s)")
    assert rig.wait_exit() == 0
    assert out.read_text().count("[[slot]]") == 2
    assert 'label = "L"\nport = "1-3"' in out.read_text()
    assert 'label = "R"\nport = "1-7"' in out.read_text()
    assert rig.read("/dev/sdc") == b"" and rig.read("/dev/sdd") == b""


def _wait_line(rig: Rig, text: str) -> None:
    import time

    deadline = time.monotonic() + 30
    with rig.cond:
        while not any(text in line for line in rig.lines[rig.cursor:]):
            left = deadline - time.monotonic()
            assert left > 0, (text, rig.lines[rig.cursor:])
            rig.cond.wait(left)


def test_stop_finishes_the_drive_being_written_and_takes_no_new_one(
        rig: Rig, tmp_path: Path) -> None:
    from faulty import FaultyFile, faulty_files

    data = os.urandom(6 * MiB)
    with faulty_files() as made:
        # The image crawls (a FUSE file): the drive is still being written when stop comes.
        source = FaultyFile(len(data), content=data)
        made.append(source)
        writing, late = Stick("c", 3), Stick("d", 5)
        rig.start([source.file, "--yes", "--force", "--journal", str(tmp_path / "j.sqlite"),
                   "--listen", "127.0.0.1:0", "--no-power-off"])
        source.set(crawl=(0, 4 * MiB))  # once its SHA-256 is read (the station watches)
        rig.add(writing.description)
        rig.wait(event="progress", device=writing.dev, phase="writing")
        assert rig.post("/api/stop") == (202, {"stopping": True})
        assert rig.get("/api/slots")["stopping"] is True
        rig.add(late.description)
        added = rig.wait(event="drive_added", device=late.dev)
        assert added["eligible"] is False
        assert added["reason"] == "stopping: no new drive is written"
        source.set(crawl=None)  # stop and refusal seen mid-write: the rest at full speed
        result = rig.wait(event="result", device=writing.dev)
        assert result["status"] == "ok" and result["verified"] is True
        assert rig.wait_exit() == 0
    assert rig.read(writing.dev)[: len(data)] == data  # type: ignore[index]
    assert rig.read(late.dev) == b""
    assert [r["result"] for r in records(tmp_path / "j.sqlite")] == ["ok"]


def test_a_second_station_on_the_same_journal_is_refused_and_the_first_keeps_its_drive(
        rig: Rig, tmp_path: Path) -> None:
    from faulty import FaultyFile, faulty_files

    data = os.urandom(8 * MiB)
    journal = tmp_path / "j.sqlite"
    with faulty_files() as made:
        # The image crawls (a FUSE file): the first station's drive is in flight throughout.
        source = FaultyFile(len(data), content=data)
        made.append(source)
        stick = Stick("c", 3)
        rig.start([source.file, "--yes", "--force", "--journal", str(journal),
                   "--listen", "127.0.0.1:0", "--no-power-off", "--name", "tower1"])
        source.set(crawl=(0, MiB))  # once its SHA-256 is read (the station watches)
        rig.add(stick.description)
        rig.wait(event="progress", device=stick.dev, phase="writing")
        other = tmp_path / "other.img"
        other.write_bytes(b"\0" * MiB)
        nowhere = slot_map(tmp_path / "nowhere.toml", {"Z": 99})  # old code: it would run
        second = subprocess.run([*popsicle_cmd(), "station", str(other), "--yes", "--journal",
                                 str(journal), "--slots", str(nowhere), "--listen",
                                 "127.0.0.1:0", "--name", "tower2"],
                                capture_output=True, text=True, timeout=30,
                                stdin=subprocess.DEVNULL, check=False)
        assert (second.returncode, second.stdout) == (2, "")
        assert second.stderr == (f"popsicle-py: --journal {journal}: another station is using "
                                 "this journal; give each station its own --journal\n")
        assert [(r["station"], r["result"]) for r in records(journal)] == [
            ("tower1", "in-flight")]
        source.set(crawl=None)  # refused while the drive was in flight: the rest at full speed
        result = rig.wait(event="result", device=stick.dev)
        assert result["status"] == "ok"
        assert rig.post("/api/stop") == (202, {"stopping": True})
        assert rig.wait_exit() == 0
    assert [(r["station"], r["result"]) for r in records(journal)] == [("tower1", "ok")]
    # Once the first station ended, the journal is free for the next one.
    again = subprocess.run([*popsicle_cmd(), "station", str(other), "--yes", "--journal",
                            str(journal), "--listen", "127.0.0.1:http"], capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert again.returncode == 2 and "the port must be a number" in again.stderr


def card_reader(port: int, cards: dict[int, str], size: int = 64 * MiB) -> str:
    """A two-slot card reader on USB port 1-PORT: one SCSI LUN, and one disk, per card."""
    usb = f"/devices/pci0000:00/0000:00:14.0/usb1/1-{port}"
    text = f"""P: {usb}
N: bus/usb/001/{port:03d}
E: DEVTYPE=usb_device
E: SUBSYSTEM=usb
E: DRIVER=usb
A: speed=480
A: remove=
A: idVendor=0bda
A: idProduct=0158
A: serial=000000001
A: manufacturer=Generic
A: product=Card Reader

P: {usb}/1-{port}:1.0/host9
E: DEVTYPE=scsi_host
E: SUBSYSTEM=scsi
"""
    for lun, letter in cards.items():
        minor = (ord(letter) - ord("a")) * 16
        lun_path = f"{usb}/1-{port}:1.0/host9/target9:0:0/9:0:0:{lun}"
        text += f"""
P: {lun_path}
E: DEVTYPE=scsi_device
E: SUBSYSTEM=scsi
A: vendor=Generic
A: model=SD/MMC {lun}

P: {lun_path}/block/sd{letter}
N: sd{letter}
E: DEVNAME=/dev/sd{letter}
E: MAJOR=8
E: MINOR={minor}
E: DEVTYPE=disk
E: SUBSYSTEM=block
E: ID_BUS=usb
E: ID_VENDOR=Generic
E: ID_MODEL=Card_Reader_{lun}
E: ID_SERIAL=Generic_Card_Reader_000000001-0:{lun}
E: ID_SERIAL_SHORT=000000001
A: removable=1
A: size={size // 512}
A: ro=0
A: dev=8:{minor}
A: queue/logical_block_size=512
"""
    return text


def test_two_cards_in_one_slot_the_second_is_refused_and_the_first_ones_failure_counts(
        rig: Rig, tmp_path: Path) -> None:
    from faulty import FaultyFile, faulty_files

    data = os.urandom(8 * MiB)
    journal = tmp_path / "j.sqlite"
    slots = slot_map(tmp_path / "slots.toml", {"A1": 4})
    usb = "/devices/pci0000:00/0000:00:14.0/usb1/1-4"
    with faulty_files() as made:
        # The image crawls (a FUSE file): the first card is still being written when pulled.
        source = FaultyFile(len(data), content=data)
        made.append(source)
        rig.start([source.file, "--yes", "--force", "--slots", str(slots), "--journal",
                   str(journal), "--listen", "127.0.0.1:0", "--no-power-off"])
        source.set(crawl=(0, MiB))  # once its SHA-256 is read (the station watches)
        rig.add(card_reader(4, {0: "e", 1: "f"}))
        second = rig.wait(event="drive_added", device="/dev/sdf")
        assert (second["eligible"], second["slot"]) == (False, "A1")
        assert second["reason"] == "slot A1 holds /dev/sde already: one drive per slot"
        rig.wait(event="progress", device="/dev/sde", phase="writing")
        page = rig.get("/api/slots")
        assert [(s["label"], s["device"], s["state"]) for s in page["slots"]] == [
            ("A1", "/dev/sde", "writing")]
        assert [(o["device"], o["why"]) for o in page["others"]] == [
            ("/dev/sdf", "slot A1 holds /dev/sde already: one drive per slot")]
        rig.remove([f"/sys{usb}/1-4:1.0/host9/target9:0:0/9:0:0:0/block/sde"])
        failed = rig.wait(event="result", device="/dev/sde")
        assert failed["status"] == "failed" and "removed" in failed["error"]
        page = rig.get("/api/slots")
        assert page["counters"]["failed"] == 1 and page["counters"]["ok"] == 0
        assert [(s["label"], s["device"], s["state"]) for s in page["slots"]] == [
            ("A1", "/dev/sde", "failed")]
        assert rig.post("/api/stop") == (202, {"stopping": True})
        assert rig.wait_exit() == 0
    assert rig.read("/dev/sdf") == b"", "the second card in slot A1 was written"
    assert [(r["slot"], r["device"], r["result"]) for r in records(journal)] == [
        ("A1", "/dev/sde", "failed")]


def test_a_powered_off_stick_stays_done_when_the_kernel_removes_its_disk(
        rig: Rig, tmp_path: Path) -> None:
    """Power-off (the default) writes the USB device's ``remove``: a real kernel then deletes
    the disk ("remove" uevent) while the stick is still in its slot.  The testbed only stores
    the write, so the test sends that uevent; the tile must go on saying "done: pull me"."""
    path = image(tmp_path, 2 * MiB)[0]
    stick = Stick("c", 3)
    slots = slot_map(tmp_path / "slots.toml", {"A1": 3, "A2": 5})
    rig.start([str(path), "--yes", "--slots", str(slots), "--journal",
               str(tmp_path / "j.sqlite"), "--listen", "[::1]:0"])
    assert rig.url.startswith("http://[::1]:")
    rig.add(stick.description)
    assert rig.wait(event="result", device=stick.dev)["status"] == "ok"
    rig.wait(event="phase", device=stick.dev, phase="done", detail="powered off")
    assert rig.read(stick.remove_attr) is not None
    rig.remove(stick.unplug)
    rig.wait(event="drive_removed", device=stick.dev)
    tiles = rig.get("/api/slots")["slots"]
    assert [(t["label"], t["state"], t["device"], t["powered_off"]) for t in tiles] == [
        ("A1", "done", stick.dev, True), ("A2", "empty", None, False)]
    assert rig.post("/api/stop") == (202, {"stopping": True})
    assert rig.wait_exit() == 0


def test_clients_holding_connections_take_no_descriptor_a_drive_needs(
        rig: Rig, tmp_path: Path) -> None:
    """Anyone who reaches --listen may open streams (the page needs no token).  With a low
    descriptor limit, connections beyond the station's cap are answered 503 and closed; a
    stick plugged in meanwhile is written, and the log gets no traceback."""
    import socket

    path, data = image(tmp_path, 2 * MiB)
    stick = Stick("c", 3)
    rig.start([str(path), "--yes", "--journal", str(tmp_path / "j.sqlite"), "--listen", "0",
               "--no-power-off"], prefix=("/bin/sh", "-c", 'ulimit -n 320; exec "$@"', "sh"))
    assert rig.url.startswith("http://127.0.0.1:") and not rig.url.endswith(":8737/")
    host, port = rig.url.split("//")[1].rstrip("/").rsplit(":", 1)
    held = []
    try:
        for _ in range(400):
            conn = socket.create_connection((host, int(port)), timeout=10)
            conn.sendall(b"GET /api/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
            held.append(conn)
        answers = [conn.recv(64).split(b"\r\n", 1)[0] for conn in held]
        assert set(answers) == {b"HTTP/1.1 200 OK", b"HTTP/1.1 503 Service Unavailable"}
        assert 8 <= answers.count(b"HTTP/1.1 200 OK") <= 64
        rig.add(stick.description)
        result = rig.wait(event="result", device=stick.dev)
        assert result["status"] == "ok", result
    finally:
        for conn in held:
            conn.close()
    assert rig.post("/api/stop") == (202, {"stopping": True})
    assert rig.wait_exit() == 0
    assert rig.read(stick.dev)[: len(data)] == data  # type: ignore[index]
    stderr = (rig.work / "stderr.txt").read_text()
    assert "Traceback" not in stderr and len(stderr.splitlines()) <= 3, stderr[-2000:]


def _stderr_line(rig: Rig, text: str, timeout: float = 30) -> str:
    """The first line of the station's stderr that holds ``text`` (waited for)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        for line in (rig.work / "stderr.txt").read_text().splitlines():
            if text in line:
                return line
        assert time.monotonic() < deadline, (rig.work / "stderr.txt").read_text()
        with rig.cond:
            rig.cond.wait(0.05)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


@pytest.mark.parametrize("signals", [1, 2])
def test_a_hook_still_running_at_the_end_is_said_and_a_signal_ends_it(
        rig: Rig, tmp_path: Path, signals: int) -> None:
    """The session ends with a hook running: the station says what it waits for; a signal
    then (the session ended by --count) or a second one (a SIGTERM ended it) ends the hook
    and the station at once."""
    import re
    import signal
    import time

    path = image(tmp_path, 1 * MiB)[0]
    pids = tmp_path / "hook.pid"
    stick = Stick("c", 3)
    args = [str(path), "--yes", "--journal", str(tmp_path / "j.sqlite"), "--listen", "0",
            "--no-power-off", "--hook", f"sh -c 'echo $$ > {pids}; exec sleep 60'"]
    rig.start(args + (["--count", "1"] if signals == 1 else []))
    rig.add(stick.description)
    rig.wait(event="result", device=stick.dev)
    if signals == 2:
        rig.signal(signal.SIGTERM)
    line = _stderr_line(rig, "waiting for")
    again = "Ctrl-C again or another SIGTERM" if signals == 2 else "Ctrl-C or SIGTERM"
    assert re.fullmatch(r"popsicle-py: waiting for 1 --hook command\(s\) still running, at "
                        rf"most (2\d|3[01]) s \({again} ends them now\)", line), line
    deadline = time.monotonic() + 10
    while not pids.exists() or not pids.read_text().strip():
        assert time.monotonic() < deadline, "the hook never started"
        with rig.cond:
            rig.cond.wait(0.05)
    pid = int(pids.read_text())
    start = time.monotonic()
    rig.signal(signal.SIGTERM)
    status = rig.wait_exit(20)
    assert time.monotonic() - start < 5
    assert status == (0 if signals == 1 else 128 + signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not _gone(pid):
        assert time.monotonic() < deadline, "the hook outlived the station"
        with rig.cond:
            rig.cond.wait(0.05)


def test_stop_while_the_url_image_downloads_ends_the_station_at_once(
        rig: Rig, tmp_path: Path) -> None:
    """The download is abandoned (it listens to the cancellation, not to the drain): the
    station ends with 0 at once, not when the trickling download is done, a stick plugged in
    meanwhile is left alone and the journal holds no row."""
    from webserver import Served, serving

    data = os.urandom(6 * MiB)
    stick = Stick("c", 3)
    journal = tmp_path / "j.sqlite"
    with serving() as web:
        web.add("/disk.img", Served(data, trickle_at=2 * MiB, trickle_every=0.05))
        rig.start([web.url("/disk.img"), "--yes", "--journal", str(journal), "--listen",
                   "127.0.0.1:0", "--no-power-off"], env={"TMPDIR": str(tmp_path)},
                  watching=False)
        rig.wait(event="progress", device=None, phase="downloading")
        rig.add(stick.description)
        assert rig.post("/api/stop") == (202, {"stopping": True})
        assert rig.wait_exit(timeout=15) == 0
    assert rig.read(stick.dev) == b""
    assert not [e for e in rig.events() if e.get("event") == "watching"]
    assert records(journal) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("popsicle")] == []


def test_identify_on_a_failed_tile_whose_name_another_stick_took_reads_nothing(
        rig: Rig, tmp_path: Path) -> None:
    """No map: stick A (port 1-3) is pulled mid-write and stick B (port 1-4) comes under the
    same /dev name.  Identify on A's failed tile answers 409 (A is gone) and B is not read
    for it; on B's own tile it reads B."""
    from faulty import FaultyFile, faulty_files

    data = os.urandom(6 * MiB)
    a, b = Stick("c", 3, 128 * MiB), Stick("c", 4, 128 * MiB)
    with faulty_files() as made:
        source = FaultyFile(len(data), content=data)
        made.append(source)
        rig.start([source.file, "--yes", "--force", "--journal", str(tmp_path / "j.sqlite"),
                   "--listen", "127.0.0.1:0", "--no-power-off"])
        source.set(crawl=(0, 2 * MiB))  # once its SHA-256 is read (the station watches)
        rig.add(a.description)
        rig.wait(event="progress", device=a.dev, phase="writing")
        rig.remove(a.unplug)
        rig.add(b.description)
        rig.wait(event="drive_added", device=b.dev, slot="1-4")
        rig.wait(event="result", device=a.dev, status="failed", slot="1-3")
        tiles = {t["label"]: t for t in rig.get("/api/slots")["slots"]}
        assert (tiles["1-3"]["state"], tiles["1-3"]["device"]) == ("failed", a.dev)
        # A's last phase is A's (its slot), even when it came after B took the name.
        assert [e["slot"] for e in rig.events() if e.get("event") == "phase"
                and e["phase"] == "failed"] == ["1-3"]
        status, answer = rig.post("/api/slots/1-3/identify")
        assert status == 409, answer
        assert answer["error"].startswith(f"slot 1-3: the drive it shows ({a.dev}) is gone: "
                                          f"{a.dev} is another drive now (different serial")
        assert not rig.get("/api/slots")["slots"][0]["identify"]
        source.set(crawl=None)  # A failed and its tile was answered: B at full speed
        rig.wait(event="result", device=b.dev, status="ok", slot="1-4")
        assert rig.post("/api/slots/1-4/identify") == (202, {"slot": "1-4", "reading": True,
                                                             "seconds": 4.0})
        assert rig.post("/api/stop")[0] == 202
        assert rig.wait_exit() == 0


def test_stop_while_the_image_is_decompressed_ends_the_station_at_once(
        rig: Rig, tmp_path: Path) -> None:
    """An .xz whose middle crawls as it is decompressed (a FUSE file at 2 MiB/s from the
    second read of its byte 2 MiB on: 9 s to decompress; its SHA-256, the first read, is
    taken at full speed): the decompression is abandoned on the stop (within the 4 MiB it
    is decoding), its copy removed, the station ends with 0."""
    import lzma

    from faulty import FaultyFile, faulty_files

    # Random: the .xz is as large.  The fastest of lzma's settings (random data is what it
    # is slowest at: a minute for 160 MiB at preset 0).
    fast = [{"id": lzma.FILTER_LZMA2, "preset": 0, "mode": lzma.MODE_FAST, "nice_len": 8,
             "mf": lzma.MF_HC3, "depth": 1}]
    packed = lzma.compress(os.urandom(20 * MiB), filters=fast)
    journal = tmp_path / "j.sqlite"
    with faulty_files() as made:
        source = FaultyFile(len(packed), content=packed,
                            faults={"crawl": (2 * MiB, 2 * MiB, 20 * MiB, 2)})
        made.append(source)
        rig.start([source.file, "--yes", "--force", "--journal", str(journal),
                   "--listen", "127.0.0.1:0", "--no-power-off"], env={"TMPDIR": str(tmp_path)},
                  watching=False)
        rig.wait(event="phase", device=None, phase="decompressing")
        assert rig.post("/api/stop") == (202, {"stopping": True})
        assert rig.wait_exit(timeout=8) == 0
    assert not [e for e in rig.events() if e.get("event") == "watching"]
    assert records(journal) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("popsicle")] == []
