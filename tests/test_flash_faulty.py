"""``popsicle-py flash --yes --json`` on faulty drives (issue 14), a healthy drive beside each.

Each test asserts the exit status, every drive's status, the image's bytes on the healthy
drive, and that a failed drive's first 64 KiB are not the image's (the partition table and
boot code go on last, and only onto a drive that holds the rest).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, needs_root, popsicle_cmd, waits_in_kernel
from faulty import FaultyDrive, FaultyFile, MiB, clean_eio_start

from popsicle_py.units import format_size

pytestmark = needs_root

GiB = 1 << 30
HEAD = 64 << 10
FILL = 0x5A
IMAGE = 48 * MiB



@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(IMAGE)
    path = tmp_path / "image.img"
    path.write_bytes(data)
    return path, data


def flash(image: Path, *devices: str, extra: tuple[str, ...] = (), timeout: float = 300
          ) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run([*popsicle_cmd(), "flash", str(image), *devices, "--yes", "--json",
                           *extra], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], \
        proc.stderr


def statuses(events: list[dict[str, Any]]) -> dict[str, str]:
    summary = events[-1]
    assert summary["event"] == "summary"
    return {r["device"]: r["status"] for r in summary["results"]}


def result_of(events: list[dict[str, Any]], device: str) -> dict[str, Any]:
    return next(r for r in events[-1]["results"] if r["device"] == device)


def assert_failed_drive_has_no_image_head(drive: FaultyDrive, data: bytes) -> None:
    assert drive.read(0, HEAD) != data[:HEAD]


def assert_healthy(loop: Loop, data: bytes) -> None:
    assert loop.read(len(data)) == data


# -- counterfeit capacity ------------------------------------------------------------------------


@pytest.mark.parametrize("real", [16 * MiB, 24 * MiB, 32 * MiB, 64 * MiB],
                         ids=["16M", "24M", "32M", "64M"])
def test_counterfeit_drive_fails_with_the_probe_message_and_the_healthy_one_is_ok(
        faulty_drive: Callable[..., FaultyDrive], loop_factory: Callable[..., Loop],
        image: tuple[Path, bytes], real: int) -> None:
    path, data = image
    healthy = loop_factory(64 * MiB, fill=FILL)
    fake = faulty_drive(GiB, fill=FILL, wrap=real)
    rc, events, stderr = flash(path, healthy.path, fake.path)
    assert rc == 1, stderr
    assert statuses(events) == {healthy.path: "ok", fake.path: "failed"}
    fits = (f"; the image ({format_size(len(data))}) fits in what it holds: use --no-probe to"
            " write it anyway") if len(data) <= real else ""
    assert result_of(events, fake.path)["error"] == (
        f"{fake.path}: counterfeit: claims {format_size(GiB)}, holds about {format_size(real)}"
        + fits)
    assert result_of(events, fake.path)["cause"] == "counterfeit"
    assert_healthy(healthy, data)
    assert_failed_drive_has_no_image_head(fake, data)
    assert not fake.ever_written(0, HEAD)


def test_no_probe_skips_the_probe(faulty_drive: Callable[..., FaultyDrive],
                                  loop_factory: Callable[..., Loop],
                                  image: tuple[Path, bytes]) -> None:
    """A fake that holds more than the image then verifies: it is written and ends ok, and
    nothing past the image was ever written (no stamps)."""
    path, data = image
    healthy = loop_factory(64 * MiB, fill=FILL)
    fake = faulty_drive(GiB, fill=FILL, wrap=64 * MiB)
    rc, events, stderr = flash(path, healthy.path, fake.path, extra=("--no-probe",))
    assert rc == 0, stderr
    assert statuses(events) == {healthy.path: "ok", fake.path: "ok"}
    assert_healthy(healthy, data)
    assert fake.read(0, len(data)) == data
    assert not fake.ever_written(IMAGE, GiB)


@pytest.mark.parametrize("real", [16 * MiB, 24 * MiB, 32 * MiB, 40 * MiB])
def test_without_the_probe_no_write_order_lets_a_wrap_pass(
        faulty_drive: Callable[..., FaultyDrive], loop_factory: Callable[..., Loop],
        image: tuple[Path, bytes], real: int) -> None:
    """A fake that wraps inside the image (smaller and larger than half of it), the probe off:
    repairs and the image's head are written after parts were checked, and each such write
    lands, through the wrap, on bytes already checked.  It must end ``invalid``, never ok.
    (Before: the first bucket, written after the rest was verified, overwrote checked bytes,
    and 16, 24, 32 MiB wraps of a 48 MiB image ended ok.)"""
    path, data = image
    healthy = loop_factory(64 * MiB, fill=FILL)
    fake = faulty_drive(GiB, fill=FILL, wrap=real)
    rc, events, stderr = flash(path, healthy.path, fake.path, extra=("--no-probe",))
    assert rc == 1, stderr
    assert statuses(events) == {healthy.path: "ok", fake.path: "invalid"}
    assert result_of(events, fake.path)["cause"] == "mismatch"
    assert_healthy(healthy, data)
    assert fake.read(0, HEAD) != data[:HEAD]


# -- dying drives ---------------------------------------------------------------------------------


def test_writes_dropped_past_an_offset_are_found_by_the_probe(
        faulty_drive: Callable[..., FaultyDrive], loop_factory: Callable[..., Loop],
        image: tuple[Path, bytes]) -> None:
    path, data = image
    healthy = loop_factory(64 * MiB, fill=FILL)
    dying = faulty_drive(64 * MiB, fill=FILL, drop_writes_after=24 * MiB)
    rc, events, stderr = flash(path, healthy.path, dying.path)
    assert rc == 1, stderr
    assert statuses(events) == {healthy.path: "ok", dying.path: "failed"}
    assert result_of(events, dying.path)["error"] == (
        f"{dying.path}: counterfeit: claims {format_size(64 * MiB)}, holds about "
        f"{format_size(24 * MiB)}")
    assert_healthy(healthy, data)
    assert_failed_drive_has_no_image_head(dying, data)


def test_writes_dropped_past_an_offset_without_the_probe_do_not_verify(
        faulty_drive: Callable[..., FaultyDrive], loop_factory: Callable[..., Loop],
        image: tuple[Path, bytes]) -> None:
    path, data = image
    healthy = loop_factory(64 * MiB, fill=FILL)
    dying = faulty_drive(64 * MiB, fill=FILL, drop_writes_after=24 * MiB)
    rc, events, stderr = flash(path, healthy.path, dying.path, extra=("--no-probe",))
    assert rc == 1, stderr
    assert statuses(events) == {healthy.path: "ok", dying.path: "invalid"}
    assert result_of(events, dying.path)["mismatch_offset"] == 24 * MiB
    assert_healthy(healthy, data)
    assert_failed_drive_has_no_image_head(dying, data)


def test_permanent_bad_block(faulty_drive: Callable[..., FaultyDrive],
                             loop_factory: Callable[..., Loop],
                             image: tuple[Path, bytes]) -> None:
    path, data = image
    bad = clean_eio_start(20 * MiB)
    healthy = loop_factory(64 * MiB, fill=FILL)
    broken = faulty_drive(64 * MiB, fill=FILL, bad_write=(bad, bad + 4096))
    rc, events, stderr = flash(path, healthy.path, broken.path)
    assert rc == 1, stderr
    assert statuses(events) == {healthy.path: "ok", broken.path: "failed"}
    assert "input/output error" in (result_of(events, broken.path)["error"] or "").lower()
    assert_healthy(healthy, data)
    assert_failed_drive_has_no_image_head(broken, data)


def test_block_that_fails_twice_then_works_ends_ok(faulty_drive: Callable[..., FaultyDrive],
                                                   loop_factory: Callable[..., Loop],
                                                   image: tuple[Path, bytes]) -> None:
    path, data = image
    bad = clean_eio_start(20 * MiB)
    healthy = loop_factory(64 * MiB, fill=FILL)
    flaky = faulty_drive(64 * MiB, fill=FILL, bad_write_times=(bad, bad + 4096, 2))
    rc, events, stderr = flash(path, healthy.path, flaky.path)
    assert rc == 0, stderr
    assert statuses(events) == {healthy.path: "ok", flaky.path: "ok"}
    assert_healthy(healthy, data)
    assert flaky.read(0, len(data)) == data


def test_read_errors_during_verify_name_the_offset(faulty_drive: Callable[..., FaultyDrive],
                                                   loop_factory: Callable[..., Loop],
                                                   image: tuple[Path, bytes]) -> None:
    path, data = image
    bad = 30 * MiB + 8192
    healthy = loop_factory(64 * MiB, fill=FILL)
    unreadable = faulty_drive(64 * MiB, fill=FILL, bad_read=(bad, bad + 512))
    rc, events, stderr = flash(path, healthy.path, unreadable.path)
    assert rc == 1, stderr
    assert statuses(events) == {healthy.path: "ok", unreadable.path: "failed"}
    result = result_of(events, unreadable.path)
    named = [int(n) for n in re.findall(r"\d{4,}", result["error"] or "")]
    if result["mismatch_offset"] is not None:
        named.append(result["mismatch_offset"])
    # The offset of the read that failed: the bad byte itself or the start of that request.
    assert any(bad - 4 * MiB < n <= bad for n in named), json.dumps(result)
    assert_healthy(healthy, data)
    assert_failed_drive_has_no_image_head(unreadable, data)


def test_one_flipped_bit_on_read_is_reported_at_the_exact_byte(
        faulty_drive: Callable[..., FaultyDrive], loop_factory: Callable[..., Loop],
        image: tuple[Path, bytes]) -> None:
    path, data = image
    flipped = 37 * MiB + 12345
    healthy = loop_factory(64 * MiB, fill=FILL)
    liar = faulty_drive(64 * MiB, fill=FILL, flip_bit=(flipped, 1))
    rc, events, stderr = flash(path, healthy.path, liar.path)
    assert rc == 1, stderr
    assert statuses(events) == {healthy.path: "ok", liar.path: "invalid"}  # did not verify
    assert result_of(events, liar.path)["mismatch_offset"] == flipped
    assert_healthy(healthy, data)
    assert_failed_drive_has_no_image_head(liar, data)


# -- drives that crawl or hang: the shell comes back on time --------------------------------------


class Timed:
    """A flash whose stdout lines are stamped with when they came (monotonic, from launch)."""

    def __init__(self, args: list[str]) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue[tuple[float, str | None]] = queue.Queue()
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.stderr = ""
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic() - self.started, line))
        self.lines.put((time.monotonic() - self.started, None))

    def until(self, kind: str | Callable[[dict[str, Any]], bool], seconds: float
              ) -> float | None:
        """When the first event of ``kind`` (or that ``kind`` accepts) came; None if not
        within ``seconds`` of launch."""
        def wanted(event: dict[str, Any]) -> bool:
            return kind(event) if callable(kind) else event["event"] == kind

        for at, event in self.events:
            if wanted(event):
                return at
        deadline = self.started + seconds
        while True:
            try:
                at, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                self.lines.put((at, None))
                return None
            self.events.append((at, json.loads(line)))
            if wanted(self.events[-1][1]):
                return at

    def exit_within(self, seconds: float) -> float | None:
        """When the process exited (None: not within ``seconds`` of launch)."""
        try:
            self.proc.wait(timeout=max(0.0, self.started + seconds - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None
        return time.monotonic() - self.started

    def summary_on_time(self, faulty: FaultyFile) -> tuple[float | None, int,
                                                            list[dict[str, Any]]]:
        """When the summary came, if within STALL + 2 s of the start (else None); then, once
        ``faulty`` is let go, the exit status and every event."""
        try:
            began = self.until("start", 30)
            assert began is not None
            summary_at = self.until("summary", began + STALL + 2)
        finally:
            rc, events = self.finish(faulty)
        return summary_at, rc, events

    def finish(self, drive: FaultyFile) -> tuple[int, list[dict[str, Any]]]:
        """Let the drive (or image) go, faults off, so that the process ends; every event it
        printed."""
        drive.clear()
        try:
            _, self.stderr = self.proc.communicate(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.until("never", 10)
        return self.proc.returncode, [event for _, event in self.events]


STALL = 3.0


def test_crawling_drive_ends_within_stall_timeout_plus_2_s(
        faulty_drive: Callable[..., FaultyDrive], loop_factory: Callable[..., Loop],
        image: tuple[Path, bytes]) -> None:
    """A stick that crawls at 20 KiB/s: each call is sized to half a second of its speed, so
    the stall is declared on time and the process is gone stall-timeout + 2 s after writing
    began (with 4 MiB calls it waited 128-205 s for the one in flight).  The probe is skipped:
    here the write path itself must be bounded."""
    path, data = image
    healthy = loop_factory(64 * MiB, fill=FILL)
    crawler = faulty_drive(64 * MiB, fill=FILL, crawl=(0, 20 * 1024))
    run = Timed([*popsicle_cmd(), "flash", str(path), healthy.path, crawler.path, "--yes",
                 "--json", "--stall-timeout", str(STALL), "--no-probe"])
    try:
        began = run.until("start", 30)
        assert began is not None
        exited = run.exit_within(began + STALL + 2)
    finally:
        rc, events = run.finish(crawler)
    assert rc == 1, run.stderr
    assert statuses(events) == {healthy.path: "ok", crawler.path: "failed"}
    assert "stall" in (result_of(events, crawler.path)["error"] or "")
    assert_healthy(healthy, data)
    assert_failed_drive_has_no_image_head(crawler, data)
    assert exited is not None, f"still running {STALL + 2} s after writing began"


def test_hung_write_gets_the_summary_on_time(faulty_drive: Callable[..., FaultyDrive],
                                             loop_factory: Callable[..., Loop],
                                             image: tuple[Path, bytes]) -> None:
    """A write that does not answer for 60 s: the summary comes stall-timeout + 2 s after
    writing began.  The process itself may wait for the kernel (README, what happens when)."""
    path, data = image
    healthy = loop_factory(64 * MiB, fill=FILL)
    hung = faulty_drive(64 * MiB, fill=FILL, hang=(20 * MiB, 60))
    run = Timed([*popsicle_cmd(), "flash", str(path), healthy.path, hung.path, "--yes",
                 "--json", "--stall-timeout", str(STALL)])
    summary_at, rc, events = run.summary_on_time(hung)
    assert rc == 1, run.stderr
    assert statuses(events) == {healthy.path: "ok", hung.path: "failed"}
    assert "stall" in (result_of(events, hung.path)["error"] or "")
    assert_healthy(healthy, data)
    assert_failed_drive_has_no_image_head(hung, data)
    assert summary_at is not None, f"no summary {STALL + 2} s after writing began"


# -- a flaky image source (issue 15) --------------------------------------------------------------


def test_image_that_reads_one_bit_wrong_after_its_checksum_fails_every_drive(
        faulty_file: Callable[..., FaultyFile], loop_factory: Callable[..., Loop]) -> None:
    """The checksum pass reads the image right, the write pass one bit wrong: no drive may
    end ok with bytes that do not match the checksum.  (Before the checksum was computed again
    in the write pass: "checksum ok", exit 0, and both drives differed at ``flipped``.)"""
    data = os.urandom(IMAGE)
    flipped = 30 * MiB + 4321
    source = faulty_file(data, flip_bit=(flipped, 2))  # right on the 1st read, wrong after
    drives = [loop_factory(64 * MiB, fill=FILL) for _ in range(2)]
    rc, events, stderr = flash(Path(source.path), *(d.path for d in drives),
                               extra=("--sha256", hashlib.sha256(data).hexdigest()))
    assert rc == 1, stderr
    assert set(statuses(events).values()) == {"failed"}
    for d in drives:
        assert d.read(HEAD) != data[:HEAD]


def test_image_that_stops_answering_fails_every_drive_on_time(
        faulty_file: Callable[..., FaultyFile], loop_factory: Callable[..., Loop]) -> None:
    """The disk or network share the image is on hangs mid-read.  A drive waiting for data is
    never stalled, so the reader is watched itself: every drive fails, the summary comes on
    time, and no drive gets the image's head.  (Before: no summary, ever.)"""
    data = os.urandom(IMAGE)
    # One byte a second from 24 MiB to 32 MiB: what is read before the run (the image's end)
    # answers.
    source = faulty_file(data, crawl=(24 * MiB, 1, 32 * MiB))
    drives = [loop_factory(64 * MiB, fill=FILL) for _ in range(2)]
    run = Timed([*popsicle_cmd(), "flash", source.path, *(d.path for d in drives), "--yes",
                 "--json", "--stall-timeout", str(STALL)])
    summary_at, rc, events = run.summary_on_time(source)
    assert rc == 1, run.stderr
    assert set(statuses(events).values()) == {"failed"}
    for d in drives:
        said = result_of(events, d.path)["error"]
        assert said == (f"{d.path}: reading the image stalled: no data for {STALL:g} s (is the "
                        "disk or network share it is on hung?)"), said
        assert d.read(HEAD) != data[:HEAD]
    assert summary_at is not None, f"no summary {STALL + 2} s after writing began"


def test_verify_of_an_image_that_stops_answering_ends_on_time(
        faulty_file: Callable[..., FaultyFile], loop_factory: Callable[..., Loop]) -> None:
    """The same for `verify`, its share hung for good (the daemon stopped): the summary on
    time, the image not closed under its stuck reader (before: the close waited for the
    share, and the summary, the exit and Ctrl-C with it)."""
    data = os.urandom(IMAGE)
    source = faulty_file(data, crawl=(24 * MiB, 1, 32 * MiB))
    drive = loop_factory(64 * MiB, fill=FILL)
    with open(drive.backing, "r+b") as f:
        f.write(data)  # it holds the image: only the image's stall can fail it
    run = Timed([*popsicle_cmd(), "verify", source.path, drive.path, "--json",
                 "--stall-timeout", str(STALL)])
    try:
        # The image is open and being read: the reader cannot pass 24 MiB.  Then the whole
        # share hangs.
        hung = run.until("progress", 30)
        assert hung is not None
        os.kill(source.pid, signal.SIGSTOP)
        summary_at = run.until("summary", hung + STALL + 2)
    finally:
        os.kill(source.pid, signal.SIGCONT)
        rc, events = run.finish(source)
    assert summary_at is not None, f"no summary {STALL + 2} s after the share hung"
    assert rc == 1, run.stderr
    assert result_of(events, drive.path)["error"] == (
        f"{drive.path}: reading the image stalled: no data for {STALL:g} s (is the disk or "
        "network share it is on hung?)")


def test_slow_image_is_not_a_stall(faulty_file: Callable[..., FaultyFile],
                                   loop_factory: Callable[..., Loop]) -> None:
    """An image read at 2 MB/s (a slow share) moves a MiB well within the stall timeout: the
    reader's calls are sized to its speed, so none of them looks like a hang."""
    data = os.urandom(24 * MiB)
    source = faulty_file(data, crawl=(12 * MiB, 2_000_000))
    drive = loop_factory(32 * MiB, fill=FILL)
    rc, events, stderr = flash(Path(source.path), drive.path,
                               extra=("--stall-timeout", str(STALL)))
    assert rc == 0, stderr
    assert statuses(events) == {drive.path: "ok"}
    assert_healthy(drive, data)


@pytest.mark.parametrize("how", ["stall", "ctrl-c"])
def test_image_that_stops_answering_in_its_checksum_pass_gives_the_shell_back(
        how: str, faulty_file: Callable[..., FaultyFile], loop_factory: Callable[..., Loop]
        ) -> None:
    """The checksum pass before writing reads on a thread of its own: an image that stops
    answering there is refused on time, and Ctrl-C is heard.  (Before: its read held the
    calling thread, so neither came until the share answered again.)"""
    data = os.urandom(IMAGE)
    source = faulty_file(data, crawl=(8 * MiB, 1, 16 * MiB))
    drive = loop_factory(64 * MiB, fill=FILL)
    run = Timed([*popsicle_cmd(), "flash", source.path, drive.path, "--yes", "--json",
                 "--stall-timeout", str(STALL), "--sha256", hashlib.sha256(data).hexdigest()])
    try:
        hung = run.until(lambda e: e["event"] == "progress" and e["phase"] == "checksum"
                         and e["bytes"] >= 8 * MiB, 30)
        assert hung is not None
        if how == "ctrl-c":
            run.proc.send_signal(signal.SIGINT)
            summary_at = run.until("summary", time.monotonic() - run.started + 2)
        else:
            summary_at = run.until("summary", hung + STALL + 2)
    finally:
        rc, events = run.finish(source)
    assert summary_at is not None, "no summary on time"
    assert events[-1]["event"] == "summary" and events[-1]["ok"] is False
    if how == "ctrl-c":
        assert rc == 130, run.stderr
    else:
        assert rc == 2, run.stderr
        assert run.stderr.splitlines()[-1] == (
            f"popsicle-py: {source.path} stopped answering while its checksum was computed: "
            f"no data for {STALL:g} s (is the disk or network share it is on hung?)")
    assert drive.read(64 * MiB) == bytes([FILL]) * (64 * MiB)


@pytest.mark.parametrize(("command", "how"), [("flash", "stall"), ("flash", "ctrl-c"),
                                              ("verify", "stall"), ("watch", "ctrl-c"),
                                              ("flash", "share hung"),
                                              ("verify", "share hung")])
def test_image_that_hangs_while_it_is_opened_gives_the_shell_back(
        command: str, how: str, faulty_file: Callable[..., FaultyFile],
        loop_factory: Callable[..., Loop]) -> None:
    """The checks before a run (what the image is, its end, its partitions) read on a thread
    of their own: an image that hangs from its first byte is refused on time, and Ctrl-C is
    heard, with nothing written.  (Before: the read held the calling thread, and neither came
    until the share answered again.)"""
    data = os.urandom(IMAGE)
    if how == "share hung":  # its daemon stopped: even stat() waits (the arguments' parse)
        source = faulty_file(data, attr_timeout=0)
        os.kill(source.pid, signal.SIGSTOP)
    else:
        source = faulty_file(data, crawl=(0, 1))  # a byte a second from the start: hung
    drive = loop_factory(64 * MiB, fill=FILL)
    args = {"flash": ["flash", source.path, drive.path, "--yes"],
            "verify": ["verify", source.path, drive.path],
            "watch": ["watch", source.path]}[command]
    if how != "ctrl-c":
        args += ["--stall-timeout", str(STALL)]
    run = Timed([*popsicle_cmd(), *args, "--json"])
    try:
        deadline = time.monotonic() + 30
        while not waits_in_kernel(run.proc.pid, "request_wait_answer"):
            assert time.monotonic() < deadline and run.proc.poll() is None, "never read"
            threading.Event().wait(0.05)
        hung = time.monotonic() - run.started
        if how == "ctrl-c":
            run.proc.send_signal(signal.SIGINT)
            summary_at = run.until("summary", hung + 2)
        else:
            summary_at = run.until("summary", hung + STALL + 2)
    finally:
        if how == "share hung":
            os.kill(source.pid, signal.SIGCONT)
        rc, events = run.finish(source)
    assert summary_at is not None, "no summary on time"
    assert events[-1] == {"event": "summary", "ok": False, "results": []}
    said = run.stderr.splitlines()[-1]
    if how == "ctrl-c":  # and the process can end only once the share answers: said so
        assert rc == 130, run.stderr
        assert run.stderr.splitlines()[-2:] == [
            "popsicle-py: interrupted before writing: nothing was written",
            f"popsicle-py: {source.path}: a read of the image to check it has not returned; "
            "popsicle-py exits once it does (when the disk or share it is on answers again)"]
    else:
        assert rc == 2, run.stderr
        assert said == (f"popsicle-py: {source.path} stopped answering while it was opened and "
                        f"checked: no answer for {STALL:g} s (is the disk or network share it "
                        "is on hung?)")
    assert drive.read(64 * MiB) == bytes([FILL]) * (64 * MiB)
