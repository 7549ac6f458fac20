"""End to end: the installed ``popsicle-py`` command on real loop devices (and umockdev).

Every test runs the command in a subprocess, as a user or a script would, and checks what it
printed, its exit status and the bytes on the devices.  Loop numbers are never assumed, so the
tests can run in parallel (``-n 2``) with other tests using loop devices.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Loop, popsicle_cmd
from loopdev import loop_device

MiB = 1 << 20
PATTERN = 0xA5
RESULT_KEYS = {"device", "status", "bytes_written", "error", "mismatch_offset"}
STATUSES = {"ok", "failed", "invalid", "cancelled"}
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CLI_STICK = FIXTURES / "cli-usb-stick.umockdev"

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
                  r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC
                  r"|\x1b[=>()][0-9A-Za-z]?")
SGR = re.compile(r"\x1b\[([0-9;]*)m")

needs_umockdev = pytest.mark.skipif(shutil.which("umockdev-run") is None,
                                    reason="umockdev-run is not installed")

pytestmark = pytest.mark.root


# ----------------------------------------------------------------------------------------------
# Helpers


def popsicle(*args: object, timeout: float = 60, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    """Run the installed command with stdin not a terminal, capture both streams."""
    return subprocess.run([*popsicle_cmd(), *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def make_image(directory: Path, size: int, name: str = "image.img") -> tuple[Path, bytes]:
    """Random (incompressible) image bytes in a file."""
    data = os.urandom(size)
    path = directory / name
    path.write_bytes(data)
    return path, data


def json_events(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line is one JSON object with "event"; the last and only summary ends it."""
    lines = stdout.splitlines()
    assert lines, "no JSON output"
    parsed = [json.loads(line) for line in lines]
    for obj in parsed:
        assert isinstance(obj, dict) and isinstance(obj.get("event"), str), obj
    kinds = [obj["event"] for obj in parsed]
    assert kinds[-1] == "summary", kinds
    assert kinds.count("summary") == 1, kinds
    check_summary_shape(parsed[-1])
    return parsed


def check_summary_shape(summary: dict[str, Any]) -> None:
    """``{"event": "summary", "ok": bool, "results": [{device, status, bytes_written, ...}]}``."""
    assert summary["event"] == "summary"
    assert isinstance(summary["ok"], bool)
    assert isinstance(summary["results"], list)
    for r in summary["results"]:
        assert r.keys() >= RESULT_KEYS, r
        assert isinstance(r["device"], str) and r["device"].startswith("/dev/"), r
        assert r["status"] in STATUSES, r
        assert type(r["bytes_written"]) is int and r["bytes_written"] >= 0, r
        assert r["error"] is None or isinstance(r["error"], str), r
        assert r["mismatch_offset"] is None or type(r["mismatch_offset"]) is int, r
    assert summary["ok"] == (bool(summary["results"])
                             and all(r["status"] == "ok" for r in summary["results"]))


def by_device(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    results = {r["device"]: r for r in summary["results"]}
    assert len(results) == len(summary["results"]), "a device is listed twice"
    return results


def holds_pattern(loop: Loop, length: int | None = None, offset: int = 0) -> bool:
    length = loop.size - offset if length is None else length
    return loop.read(length, offset) == bytes([PATTERN]) * length


def corrupt(device: str, offset: int, good: int) -> None:
    """Change one byte through the block device itself (as a failing stick would hold it)."""
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([good ^ 0xFF]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout


def state_lines(stdout: str, device: str) -> list[str]:
    """A device's plain lines that are not progress lines."""
    mine = [line for line in stdout.splitlines() if line.startswith(device + ":")]
    return [line for line in mine if " of " not in line]


# ----------------------------------------------------------------------------------------------
# Flash and verify on healthy drives


@pytest.mark.parametrize("bucket", [None, "1M"], ids=["default-bucket", "1MiB-buckets"])
def test_flash_three_drives_json_then_verify(loop_factory: Callable[..., Loop], tmp_path: Path,
                                             bucket: str | None) -> None:
    image, data = make_image(tmp_path, 3 * MiB + 4321)
    loops = [loop_factory(8 * MiB, fill=PATTERN) for _ in range(3)]
    # One drive is named through a symlink: the summary must give its canonical path.
    link = tmp_path / "stick"
    link.symlink_to(loops[1].path)
    named = [loops[0].path, str(link), loops[2].path]
    extra = ["--bucket-size", bucket] if bucket else []

    result = popsicle("flash", image, *named, "--yes", "--json", *extra)

    assert result.returncode == 0, result.stderr
    no_traceback(result)
    events = json_events(result.stdout)
    summary = events[-1]
    assert summary["ok"] is True
    results = by_device(summary)
    assert set(results) == {loop.path for loop in loops}
    for loop in loops:
        r = results[loop.path]
        assert (r["status"], r["bytes_written"], r["error"], r["mismatch_offset"]) == (
            "ok", len(data), None, None)
        assert loop.read(len(data)) == data, f"{loop.path} does not hold the image"
    assert [r["device"] for r in summary["results"]] == [loop.path for loop in loops]
    assert {e["event"] for e in events} >= {"start", "phase", "result", "summary"}
    start = events[0]
    assert start["event"] == "start" and start["size"] == len(data)

    verified = popsicle("verify", image, *(loop.path for loop in loops), "--json")
    assert verified.returncode == 0, verified.stderr
    vsummary = json_events(verified.stdout)[-1]
    assert vsummary["ok"] is True
    assert {d: r["status"] for d, r in by_device(vsummary).items()} == {
        loop.path: "ok" for loop in loops}
    assert all(r["mismatch_offset"] is None for r in vsummary["results"])
    # What was read back and matched, as a flash's results say it.
    assert {r["device_sha256"] for r in vsummary["results"]} == {
        hashlib.sha256(data).hexdigest()}
    assert {r["device_sha256"] for r in summary["results"]} == {
        hashlib.sha256(data).hexdigest()}


def test_flash_three_drives_plain_then_verify(loop_factory: Callable[..., Loop],
                                              tmp_path: Path) -> None:
    image, data = make_image(tmp_path, 5 * MiB + 777)
    loops = [loop_factory(8 * MiB, fill=PATTERN) for _ in range(3)]

    result = popsicle("flash", image, *(loop.path for loop in loops), "--yes",
                      "--bucket-size", "1M")

    assert result.returncode == 0, result.stderr
    no_traceback(result)
    assert "\x1b" not in result.stdout + result.stderr, "escape codes when not a terminal"
    for loop in loops:
        assert loop.read(len(data)) == data
        states = state_lines(result.stdout, loop.path)
        # One line per state change: never the same state twice in a row for one drive.
        assert all(a != b for a, b in itertools.pairwise(states)), states
        # The capacity probe first, then writing.
        assert states[:2] == [f"{loop.path}: probing", f"{loop.path}: writing"], states
        assert f"{loop.path}: verifying" in states, states
        assert states[-1].startswith(f"{loop.path}: ok"), states
        assert [s for s in states if ": ok" in s] == [states[-1]], states
    assert result.stdout.splitlines()[-1] == "done: 3 of 3 drives ok"

    verified = popsicle("verify", image, *(loop.path for loop in loops))
    assert verified.returncode == 0, verified.stderr
    assert "\x1b" not in verified.stdout + verified.stderr
    for loop in loops:
        assert f"{loop.path}: ok" in verified.stdout


# ----------------------------------------------------------------------------------------------
# A drive that dies mid-write


@pytest.mark.parametrize("bucket", [None, "1M"], ids=["dies-in-first-bucket", "dies-in-ring"])
@pytest.mark.parametrize("as_json", [True, False], ids=["json", "plain"])
def test_drive_dying_mid_write_among_healthy_ones(loop_factory: Callable[..., Loop],
                                                  dying_loop: Callable[..., Loop],
                                                  tmp_path: Path, bucket: str | None,
                                                  as_json: bool) -> None:
    image, data = make_image(tmp_path, 10 * MiB + 777)
    healthy = [loop_factory(16 * MiB, fill=PATTERN) for _ in range(2)]
    dying = dying_loop(16 * MiB, good=4 * MiB)
    devices = [healthy[0].path, dying.path, healthy[1].path]
    extra = ["--bucket-size", bucket] if bucket else []

    result = popsicle("flash", image, *devices, "--yes", *extra,
                      *(["--json"] if as_json else []))

    assert result.returncode == 1, result.stdout + result.stderr
    no_traceback(result)
    for loop in healthy:
        assert loop.read(len(data)) == data, f"healthy {loop.path} was not written"
    if as_json:
        events = json_events(result.stdout)
        summary = events[-1]
        assert summary["ok"] is False
        results = by_device(summary)
        assert [r["device"] for r in summary["results"]] == devices
        for loop in healthy:
            assert results[loop.path]["status"] == "ok"
            assert results[loop.path]["bytes_written"] == len(data)
        bad = results[dying.path]
        assert bad["status"] == "failed"
        assert dying.path in bad["error"] and "no space left" in bad["error"], bad
        assert bad["bytes_written"] < len(data), json.dumps(bad)
        # The dying drive never looked finished on the way.
        for e in events:
            if e.get("device") == dying.path:
                assert e.get("status") != "ok" and e.get("phase") != "done", e
    else:
        assert "\x1b" not in result.stdout
        assert re.search(rf"^{re.escape(dying.path)}: failed: .*no space left", result.stdout,
                         re.M), result.stdout
        assert f"{dying.path}: ok" not in result.stdout
        for loop in healthy:
            assert f"{loop.path}: ok" in result.stdout
        assert result.stdout.splitlines()[-1] == ("finished with problems: 2 of 3 drives ok; "
                                                  f"not ok: #2 {dying.path} failed (no space "
                                                  "left)")

    verified = popsicle("verify", image, *(loop.path for loop in healthy), "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr


# ----------------------------------------------------------------------------------------------
# verify finds a corrupted byte


def test_verify_refuses_a_drive_named_as_its_own_image(loop_factory: Callable[..., Loop],
                                                     tmp_path: Path) -> None:
    """``verify DEVICE DEVICE`` (or a link to it, a loop device over it, its backing file,
    stdin from it) compared the drive with itself and said "ok (matches the image)": a
    success that is none.  Refused as flash refuses a drive holding its image: exit 2."""
    drive = loop_factory(4 * MiB, fill=PATTERN)
    link = tmp_path / "link"
    link.symlink_to(drive.path)
    over = subprocess.run(["losetup", "-f", "--show", "-r", "-o", str(MiB), drive.path],
                          capture_output=True, text=True, check=True).stdout.strip()
    line = (f"popsicle-py: {drive.path} holds the image being compared (it would match "
            "itself); name another image or drive\n")
    try:
        for image in (drive.path, link, over, drive.backing):
            result = popsicle("verify", image, drive.path)
            assert (result.returncode, result.stdout, result.stderr) == (2, "", line), image
        with open(drive.path, "rb") as stdin:
            result = subprocess.run([*popsicle_cmd(), "verify", "-", drive.path], stdin=stdin,
                                    capture_output=True, text=True, timeout=60, check=False)
        assert (result.returncode, result.stderr) == (2, line)
    finally:
        subprocess.run(["losetup", "-d", over], check=False)
    copy, _ = make_image(tmp_path, 0)
    copy.write_bytes(drive.read())
    assert popsicle("verify", copy, drive.path).returncode == 0  # a copy is compared


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("as_json", [True, False], ids=["json", "plain"])
def test_verify_reports_the_offset_of_a_corrupted_byte(loop_factory: Callable[..., Loop],
                                                       tmp_path: Path, where: str,
                                                       as_json: bool) -> None:
    size = 3 * MiB + 1001
    image, data = make_image(tmp_path, size)
    good, bad = loop_factory(4 * MiB, fill=PATTERN), loop_factory(4 * MiB, fill=PATTERN)
    flashed = popsicle("flash", image, good.path, bad.path, "--yes", "--bucket-size", "1M")
    assert flashed.returncode == 0, flashed.stdout + flashed.stderr
    offset = {"first": 0, "middle": 1234567, "last": size - 1}[where]
    corrupt(bad.path, offset, data[offset])
    assert bad.read(len(data)) != data

    result = popsicle("verify", image, good.path, bad.path, *(["--json"] if as_json else []))

    assert result.returncode == 1, result.stdout + result.stderr
    no_traceback(result)
    if as_json:
        summary = json_events(result.stdout)[-1]
        assert summary["ok"] is False
        results = by_device(summary)
        assert results[good.path]["status"] == "ok"
        assert results[good.path]["mismatch_offset"] is None
        assert results[bad.path]["status"] == "invalid"
        assert results[bad.path]["mismatch_offset"] == offset
        assert str(offset) in results[bad.path]["error"]
    else:
        assert "\x1b" not in result.stdout
        assert f"{good.path}: ok" in result.stdout
        assert re.search(rf"^{re.escape(bad.path)}: invalid: .*\bbyte {offset}\b",
                         result.stdout, re.M), result.stdout


# ----------------------------------------------------------------------------------------------
# Signals mid-flash


class Lines:
    """Read a child's stdout line by line with a deadline (no sleeps, no blocking forever)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.lines: list[str] = []

    def next(self, deadline: float) -> str | None:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line in time; so far: {self.lines[-5:]}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        text = line.decode()
        self.lines.append(text)
        return text

    def rest(self, deadline: float) -> list[str]:
        while self.next(deadline) is not None:
            pass
        if self.buf:
            self.lines.append(self.buf.decode())
            self.buf = b""
        return self.lines


def _procs_mentioning(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if any(marker in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
    return found


@pytest.mark.parametrize(("signum", "phase", "image_size", "bucket"), [
    (signal.SIGINT, "writing", 48 * MiB, 16 * MiB),
    (signal.SIGTERM, "writing", 48 * MiB, 16 * MiB),
    (signal.SIGTERM, "verifying", 16 * MiB, 4 * MiB),
], ids=["SIGINT-writing", "SIGTERM-writing", "SIGTERM-verifying"])
def test_signal_mid_flash_cancels_every_drive_quickly(loop_factory: Callable[..., Loop],
                                                      throttle: Callable[..., Any],
                                                      tmp_path: Path, signum: signal.Signals,
                                                      phase: str, image_size: int,
                                                      bucket: int) -> None:
    """Drives throttled to 4 MB/s; the signal comes once the JSON stream shows ``phase``."""
    image, image_data = make_image(tmp_path, image_size)
    loops = [loop_factory(image_size + 16 * MiB, fill=PATTERN) for _ in range(2)]
    add = throttle(*((loop, 4_000_000) for loop in loops))
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [*popsicle_cmd(), "flash", str(image), *(loop.path for loop in loops), "--yes",
             "--json", "--bucket-size", str(bucket)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            preexec_fn=lambda: add(os.getpid()))
    try:
        lines = Lines(proc)
        deadline = time.monotonic() + 60
        while True:
            line = lines.next(deadline)
            assert line is not None, f"ended before any progress: {lines.lines}"
            event = json.loads(line)
            if (event["event"] == "progress" and event["phase"] == phase
                    and event["bytes"] > 0):
                break
            assert event["event"] not in ("result", "summary"), lines.lines
        sent = time.monotonic()
        proc.send_signal(signum)
        status = proc.wait(timeout=3)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = lines.rest(time.monotonic() + 5)
    err = stderr_path.read_text()

    assert status == 128 + signum, (status, out[-3:], err)
    assert took < 3, f"took {took:.1f} s to stop"
    assert "Traceback" not in err
    events = json_events("\n".join(out))
    summary = events[-1]
    assert summary["ok"] is False
    assert {d: r["status"] for d, r in by_device(summary).items()} == {
        loop.path: "cancelled" for loop in loops}
    # Interrupted before the end: the first bucket (kept for last) is never counted.
    assert all(r["bytes_written"] < len(image_data) for r in summary["results"]), summary
    # Nothing left behind: no process still running on the image, every drive closed.
    assert not _procs_mentioning(str(image))
    for loop in loops:
        fd = os.open(loop.path, os.O_RDONLY | os.O_EXCL)
        os.close(fd)
        # The image's head (first 64 KiB) is written last: an interrupted drive must not look
        # bootable (it holds what it held, or the random stamp kept there during verification).
        assert loop.read(64 << 10) != image_data[: 64 << 10], f"{loop.path} got the image's head"


# ----------------------------------------------------------------------------------------------
# Refusals and bad input


@pytest.mark.parametrize("as_json", [False, True], ids=["plain", "json"])
def test_refuses_without_yes_when_stdin_is_not_a_terminal(loop_factory: Callable[..., Loop],
                                                          tmp_path: Path,
                                                          as_json: bool) -> None:
    image, _ = make_image(tmp_path, 1 * MiB)
    loop = loop_factory(4 * MiB, fill=PATTERN)

    result = popsicle("flash", image, loop.path, *(["--json"] if as_json else []))

    assert result.returncode == 2, result.stdout + result.stderr
    no_traceback(result)
    assert "--yes" in result.stderr
    assert holds_pattern(loop), "written without confirmation"
    if as_json:
        summary = json_events(result.stdout)[-1]
        assert summary["ok"] is False


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    no_traceback(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("popsicle-py"), lines
    return lines[0]


NINES = "9" * 400

BAD_INPUTS: dict[str, tuple[Sequence[str], str]] = {
    # id: (arguments with IMAGE, LOOP, TMP, FILE, PART placeholders, a word the error says)
    "missing-image": (["flash", "TMP/nope.img", "LOOP", "--yes"], "does not exist"),
    "directory-image": (["flash", "TMP", "LOOP", "--yes"], "directory"),
    "no-devices": (["flash", "IMAGE", "--yes"], "--all-usb"),
    "unknown-option": (["flash", "IMAGE", "LOOP", "--yes", "--bogus"], "--bogus"),
    "regular-file-target": (["flash", "IMAGE", "FILE", "--yes"], "not a block device"),
    "partition-target": (["flash", "IMAGE", "PART", "--yes"], "partition"),
    "bucket-size-garbage": (["flash", "IMAGE", "LOOP", "--yes", "--bucket-size", "12Q"],
                            "--bucket-size"),
    "bucket-size-zero": (["flash", "IMAGE", "LOOP", "--yes", "--bucket-size", "0"],
                         "--bucket-size"),
    "bucket-size-unaligned": (["flash", "IMAGE", "LOOP", "--yes", "--bucket-size", "1000"],
                              "--bucket-size"),
    "bucket-size-huge": (["flash", "IMAGE", "LOOP", "--yes", "--bucket-size", "1T"],
                         "--bucket-size"),
    "buckets-zero": (["flash", "IMAGE", "LOOP", "--yes", "--buckets", "0"], "--buckets"),
    # Sizes are parsed exactly: 400 digits were an OverflowError's traceback (float infinity),
    # and 99999999999999999999999E was taken as a capacity.
    "bucket-size-400-digits": (["flash", "IMAGE", "LOOP", "--yes", "--bucket-size", NINES],
                               "too large"),
    "capacity-400-digits": (["flash", "IMAGE", "LOOP", "--yes", "--capacity", NINES],
                            "too large"),
    "capacity-beyond-2-63": (["flash", "IMAGE", "LOOP", "--yes", "--capacity",
                              "99999999999999999999999E"], "too large"),
    "min-write-speed-400-digits": (["flash", "IMAGE", "LOOP", "--yes", "--min-write-speed",
                                    f"{NINES}MB/s"], "too large"),
    "check-size-400-digits": (["check", "--sha256", "0" * 64, "--size", NINES, "LOOP"],
                              "too large"),
    # nan and inf pass every comparison of a range: a drive would never be found stalled.
    "stall-timeout-nan": (["flash", "IMAGE", "LOOP", "--yes", "--stall-timeout", "nan"],
                          "not a finite number"),
    "stall-timeout-inf": (["verify", "IMAGE", "LOOP", "--stall-timeout", "inf"],
                          "not a finite number"),
    "tolerance-nan": (["flash", "IMAGE", "LOOP", "--yes", "--capacity", "4M", "--tolerance",
                       "nan"], "not a finite number"),
    "verify-missing-image": (["verify", "TMP/nope.img", "LOOP"], "does not exist"),
    "verify-no-devices": (["verify", "IMAGE"], "DEVICE"),
    "unknown-command": (["frobnicate", "IMAGE"], "frobnicate"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
        loop_factory: Callable[..., Loop], tmp_path: Path, case: str) -> None:
    args, word = BAD_INPUTS[case]
    image, _ = make_image(tmp_path, 1 * MiB)
    loop = loop_factory(4 * MiB, fill=PATTERN)
    plain_file = tmp_path / "file.img"
    plain_file.write_bytes(bytes([PATTERN]) * MiB)
    with contextlib.ExitStack() as stack:
        part = ""
        if "PART" in args:
            parted = stack.enter_context(loop_device(4 * MiB, partitions=[(2048, 4096)]))
            part = parted.path + "p1"
            before = Path(parted.backing).read_bytes()
        values = {"IMAGE": str(image), "LOOP": loop.path, "TMP": str(tmp_path),
                  "FILE": str(plain_file), "PART": part}
        argv = [re.sub(r"\b(IMAGE|LOOP|TMP|FILE|PART)\b", lambda m: values[m.group(1)], a)
                for a in args]

        result = popsicle(*argv)

        assert result.returncode == 2, result.stdout + result.stderr
        line = _one_line_error(result)
        assert word in line, line
        assert holds_pattern(loop)
        assert plain_file.read_bytes() == bytes([PATTERN]) * MiB
        if part:
            assert Path(parted.backing).read_bytes() == before


def test_a_rejected_drive_is_said_rejected_once(loop_factory: Callable[..., Loop],
                                               tmp_path: Path) -> None:
    """The line was "LOOP: rejected: rejected: holds 16 MiB, ..."."""
    image, _ = make_image(tmp_path, 1 * MiB)
    loop = loop_factory(16 * MiB, fill=PATTERN)

    result = popsicle("flash", image, loop.path, "--yes", "--capacity", "32GB",
                      "--tolerance", "3")

    assert result.returncode == 1, result.stdout + result.stderr
    said = result.stdout + result.stderr
    assert (f"{loop.path}: rejected: holds 16 MiB, outside the 29.8 GiB (+-3%) asked for"
            in said), said
    assert "rejected: rejected" not in said and said.count("rejected:") == 1, said
    assert holds_pattern(loop)


def _mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo
                    if line.startswith("MemAvailable:"))


@pytest.mark.skipif(_mem_available() >= 128 << 30, reason="64 GiB is less than half of memory")
def test_a_ring_larger_than_half_the_memory_is_refused(loop_factory: Callable[..., Loop],
                                                       tmp_path: Path) -> None:
    """--bucket-size 1G --buckets 64 was taken: a ring of 64 GiB, touched bucket by bucket
    until the kernel killed the run for memory halfway through a write."""
    image, _ = make_image(tmp_path, 1 * MiB)
    loop = loop_factory(4 * MiB, fill=PATTERN)

    result = popsicle("flash", image, loop.path, "--yes", "--bucket-size", "1G",
                      "--buckets", "64")

    assert result.returncode == 2, result.stdout + result.stderr
    line = _one_line_error(result)
    assert "a ring of 64 GiB (64 x 1 GiB) is more than half the memory available" in line
    assert holds_pattern(loop)


@pytest.mark.parametrize("compress", [["gzip"], ["xz"], ["zstd", "-q"], ["bzip2"]],
                         ids=["gz", "xz", "zst", "bz2"])
def test_an_image_empty_once_decompressed_is_refused_even_with_force(
        loop_factory: Callable[..., Loop], tmp_path: Path, compress: list[str]) -> None:
    """As an empty raw file is: before, it ended ok with nothing written, the drive still
    holding whatever it held."""
    image = tmp_path / "empty.img.c"
    image.write_bytes(subprocess.run([*compress, "-c"], input=b"", capture_output=True,
                                     check=True).stdout)
    loop = loop_factory(4 * MiB, fill=PATTERN)
    result = popsicle("flash", str(image), loop.path, "--yes", "--force")
    assert result.returncode == 2, result.stdout + result.stderr
    assert _one_line_error(result).endswith(" layer) is empty")
    assert holds_pattern(loop)


# ----------------------------------------------------------------------------------------------
# The Rich view in a pseudo-terminal


def run_in_pty(args: Sequence[str], *, columns: int = 120, no_color: bool = False
               ) -> tuple[int, str]:
    pexpect = pytest.importorskip("pexpect")
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(COLUMNS=str(columns), LINES="40", TERM="xterm-256color")
    if no_color:
        env["NO_COLOR"] = "1"
    cmd = popsicle_cmd()
    child = pexpect.spawn(cmd[0], [*cmd[1:], *args], env=env, dimensions=(40, columns),
                          encoding="utf-8", codec_errors="replace", timeout=60)
    child.expect(pexpect.EOF)
    output = child.before
    child.close()
    assert child.exitstatus is not None, f"killed by signal {child.signalstatus}"
    return child.exitstatus, output


def screen_lines(output: str) -> list[str]:
    """Output as printed lines: escape codes removed, split at CR and LF."""
    return [line.rstrip() for line in re.split(r"\r\n|\r|\n", ANSI.sub("", output))]


def names(line: str, device: str) -> bool:
    """``line`` names ``device`` (/dev/loop4, not as part of /dev/loop44)."""
    return re.search(rf"{re.escape(device)}\b", line) is not None


def last_row_of(lines: Sequence[str], device: str) -> str:
    """The last progress row drawn for ``device`` before the summary table."""
    rows = [line for line in lines if names(line, device)]
    assert rows, f"no row for {device}"
    return rows[-1]


def progress_part(lines: list[str], title: str) -> tuple[list[str], list[str]]:
    at = max(i for i, line in enumerate(lines) if title in line)
    return lines[:at], lines[at:]


def test_rich_view_in_a_pty_has_a_row_per_drive_that_reaches_100(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    image, data = make_image(tmp_path, 6 * MiB + 99)
    loops = [loop_factory(8 * MiB, fill=PATTERN) for _ in range(2)]

    status, output = run_in_pty(["flash", str(image), *(loop.path for loop in loops), "--yes",
                                 "--bucket-size", "1M"])

    assert status == 0, output
    assert "Traceback" not in output
    assert SGR.search(output), "no styling on a terminal"
    lines = screen_lines(output)
    progress, summary = progress_part(lines, "done: 2 of 2 drives ok")
    for loop in loops:
        assert loop.read(len(data)) == data
        row = last_row_of(progress, loop.path)
        assert "100%" in row and row.rstrip().endswith("done"), row
        # Its own row: no line shows two drives.
        others = [other.path for other in loops if other is not loop]
        assert not any(names(line, loop.path) and any(names(line, o) for o in others)
                       for line in lines if not line.startswith("Flash ")
                       ), "two drives on one row"  # (the --yes note names them all)
        # The summary table has a row for it with its result.
        assert any(names(line, loop.path) and " ok " in line for line in summary), summary
    assert all(len(line) <= 120 for line in lines)


def test_rich_view_rows_follow_their_own_drive(loop_factory: Callable[..., Loop],
                                               dying_loop: Callable[..., Loop],
                                               tmp_path: Path) -> None:
    image, data = make_image(tmp_path, 10 * MiB + 5)
    healthy = loop_factory(16 * MiB, fill=PATTERN)
    dying = dying_loop(16 * MiB, good=4 * MiB)

    status, output = run_in_pty(["flash", str(image), healthy.path, dying.path, "--yes",
                                 "--bucket-size", "1M"], columns=160)

    assert status == 1, output
    lines = screen_lines(output)
    progress, summary = progress_part(lines, "finished with problems: 1 of 2 drives ok")
    good_row = last_row_of(progress, healthy.path)
    assert "100%" in good_row and good_row.endswith("done"), good_row
    bad_row = last_row_of(progress, dying.path)
    assert "failed" in bad_row and "100%" not in bad_row and "done" not in bad_row, bad_row
    assert any(dying.path in line and "failed" in line for line in summary), summary
    assert healthy.read(len(data)) == data


def test_rich_view_respects_no_color_and_a_narrow_terminal(loop_factory: Callable[..., Loop],
                                                           tmp_path: Path) -> None:
    image, data = make_image(tmp_path, 2 * MiB)
    loops = [loop_factory(4 * MiB, fill=PATTERN) for _ in range(2)]

    status, output = run_in_pty(["flash", str(image), *(loop.path for loop in loops), "--yes"],
                                columns=60, no_color=True)

    assert status == 0, output
    colors = [params for params in SGR.findall(output)
              if any(re.fullmatch(r"3[0-9]|4[0-9]|9[0-7]|10[0-7]", p)
                     for p in params.split(";"))]
    assert not colors, f"color codes despite NO_COLOR: {colors[:5]}"
    lines = screen_lines(output)
    too_wide = [line for line in lines if len(line) > 60]
    assert not too_wide, too_wide
    progress, _ = progress_part(lines, "done: 2 of 2 drives ok")
    for loop in loops:
        assert loop.read(len(data)) == data
        assert "100%" in last_row_of(progress, loop.path)


@pytest.mark.parametrize("answer", ["n", "y"])
def test_confirmation_on_a_terminal_shows_the_drives_and_asks_once(
        loop_factory: Callable[..., Loop], tmp_path: Path, answer: str) -> None:
    pexpect = pytest.importorskip("pexpect")
    image, data = make_image(tmp_path, 1 * MiB + 1)
    loop = loop_factory(4 * MiB, fill=PATTERN)
    env = {**os.environ, "COLUMNS": "120", "LINES": "40"}
    cmd = popsicle_cmd()
    child = pexpect.spawn(cmd[0], [*cmd[1:], "flash", str(image), loop.path], env=env,
                          dimensions=(40, 120), encoding="utf-8", timeout=60)
    child.expect(r"Continue\?")
    table = ANSI.sub("", child.before)
    assert loop.path in table and "4 MiB" in table, table
    assert holds_pattern(loop), "written before the answer"
    child.sendline(answer)
    child.expect(pexpect.EOF)
    rest = ANSI.sub("", child.before)
    child.close()
    assert "Continue?" not in rest, "asked twice"
    if answer == "n":
        assert child.exitstatus == 2, rest
        assert "nothing was written" in rest
        assert holds_pattern(loop)
    else:
        assert child.exitstatus == 0, rest
        assert loop.read(len(data)) == data


# ----------------------------------------------------------------------------------------------
# Discovery and --all-usb under umockdev


def _testbed_run(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["umockdev-run", "-d", str(CLI_STICK), "--", "sh", "-c", script,
                           "sh", *args], capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)


@needs_umockdev
@pytest.mark.umockdev
def test_list_json_shows_the_usb_stick_eligible() -> None:
    cmd = " ".join(f"'{part}'" for part in popsicle_cmd())
    result = _testbed_run(f'{cmd} list --json && echo --- && {cmd} list --all --json')
    assert result.returncode == 0, result.stderr
    usb_only, every = (json.loads(part) for part in result.stdout.split("---\n"))
    assert [d["path"] for d in usb_only] == ["/dev/sdb"]
    stick = usb_only[0]
    required = {"path", "vendor", "model", "serial", "size", "bus", "removable", "read_only",
                "mountpoints", "eligible", "reason"}
    assert required <= stick.keys()
    assert stick["eligible"] is True and stick["reason"] is None
    assert (stick["vendor"], stick["model"], stick["serial"]) == (
        "SanDisk", "Cruzer Blade", "4C530001231105117303")
    assert (stick["size"], stick["bus"], stick["removable"], stick["read_only"]) == (
        16384 * 512, "usb", True, False)
    assert stick["mountpoints"] == []
    assert stick["port_path"] == "1-2"  # the USB port it hangs off
    assert stick["link_speed"] == 480  # Mbit/s, its USB device's sysfs speed
    # --all lists the SATA disk too, with why it may not be written automatically.
    paths = {d["path"]: d for d in every}
    assert set(paths) == {"/dev/sda", "/dev/sdb"}
    assert paths["/dev/sda"]["eligible"] is False and paths["/dev/sda"]["reason"]
    assert paths["/dev/sda"]["port_path"] is None


@needs_umockdev
@pytest.mark.umockdev
def test_list_table_shows_the_port_of_each_stick() -> None:
    cmd = " ".join(f"'{part}'" for part in popsicle_cmd())
    result = _testbed_run(f"COLUMNS=100 {cmd} list --all")
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "Device" in line)
    assert "Port" in header
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("/dev/sdb")]
    assert re.search(r"/dev/sdb\s+1-2\s+", row), row
    assert "Link" in header and "480 Mbit/s" in row  # the USB link's speed (sysfs speed)
    assert "note: /dev/sdb is on a USB 2.0 link (480 Mbit/s" in result.stdout


@needs_umockdev
@pytest.mark.umockdev
def test_flash_all_usb_writes_the_mocked_stick_only(tmp_path: Path) -> None:
    image, data = make_image(tmp_path, 3 * MiB + 123)
    out, sdb, sda = tmp_path / "out.json", tmp_path / "sdb.bin", tmp_path / "sda.bin"
    script = ('"$@" > "$OUT"; status=$?; cat /dev/sdb > "$SDB"; cat /dev/sda > "$SDA"; '
              'exit $status')
    env = {**os.environ, "OUT": str(out), "SDB": str(sdb), "SDA": str(sda)}
    result = subprocess.run(
        ["umockdev-run", "-d", str(CLI_STICK), "--", "sh", "-c", script, "sh", *popsicle_cmd(),
         "flash", "--all-usb", "--yes", str(image), "--json", "--bucket-size", "1M"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
        stdin=subprocess.DEVNULL)

    assert result.returncode == 0, out.read_text() + result.stderr
    assert "Traceback" not in result.stderr
    summary = json_events(out.read_text())[-1]
    assert summary["ok"] is True
    assert summary["results"] == [{**summary["results"][0], "device": "/dev/sdb",
                                   "status": "ok", "bytes_written": len(data), "error": None,
                                   "mismatch_offset": None}]
    assert sdb.read_bytes()[: len(data)] == data
    assert sda.read_bytes() == b"", "the SATA disk was written"


@needs_umockdev
@pytest.mark.umockdev
def test_flash_all_usb_without_yes_refuses_under_umockdev(tmp_path: Path) -> None:
    image, _ = make_image(tmp_path, 1 * MiB)
    cmd = " ".join(f"'{part}'" for part in popsicle_cmd())
    result = _testbed_run(f'{cmd} flash --all-usb "$1"; status=$?; wc -c < /dev/sdb; '
                          'exit $status', str(image))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--yes" in result.stderr
    assert result.stdout.split()[-1] == "0", "the stick was written"


@pytest.mark.parametrize("args", [["--bogus"], ["--buckets", "0"], []],
                         ids=["unknown-option", "bad-value", "missing-image"])
def test_json_usage_errors_still_end_with_a_summary(args: list[str]) -> None:
    proc = popsicle("flash", "--json", *args)
    assert proc.returncode == 2
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["event"] == "error" and lines[0]["message"]
    assert lines[-1] == {"event": "summary", "ok": False, "results": []}
    assert "Traceback" not in proc.stderr
