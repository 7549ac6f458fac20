"""``--report FILE`` for flash: a record per drive, appended and fsynced as each drive ends."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, popsicle_cmd

from popsicle_py import events
from popsicle_py.report import FIELDS, format_record, record

MiB = 1 << 20
PATTERN = 0xA5


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, check=False)


def image(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    (tmp_path / "disk.img").write_bytes(data)
    return tmp_path / "disk.img", data


@pytest.mark.root
def test_flash_report_has_a_record_per_drive_with_its_outcome(
        loop_factory: Callable[..., Loop], dying_loop: Callable[..., Loop],
        tmp_path: Path) -> None:
    path, data = image(tmp_path, 6 * MiB + 3)
    sha = hashlib.sha256(data).hexdigest()
    good = loop_factory(8 * MiB, fill=PATTERN)
    dying = dying_loop(16 * MiB, good=2 * MiB)
    report = tmp_path / "run.jsonl"

    done = run("flash", path, good.path, dying.path, "--yes", "--bucket-size", "1M",
               "--sha256", sha, "--report", report)
    assert done.returncode == 1, done.stderr
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["device"] for r in records) == sorted([good.path, dying.path])
    by = {r["device"]: r for r in records}
    assert list(by[good.path]) == list(FIELDS)
    ok, bad = by[good.path], by[dying.path]
    assert (ok["result"], ok["verified"], ok["bytes_written"]) == ("ok", True, len(data))
    assert ok["image"] == "disk.img" and ok["image_sha256"] == sha
    assert ok["capacity"] == 8 * MiB and ok["port_path"] == ""  # a loop device: no USB port
    assert ok["write_speed"] > 0 and ok["verify_speed"] > 0
    assert {ok["seq"], bad["seq"]} == {1, 2}
    assert bad["result"] == "failed" and bad["verified"] is False
    # (The loop driver may hide the full tmpfs until verification finds it: a speed or none.)
    assert "no space left" in bad["error"]
    for r in records:
        assert r["started"].endswith("Z") and r["started"] <= r["ended"]

    # Appended, never truncated; CSV gets one header.
    csv_report = tmp_path / "run.csv"
    for _ in range(2):
        again = run("flash", path, good.path, "--yes", "--no-verify", "--report", csv_report)
        assert again.returncode == 0, again.stderr
    rows = list(csv.DictReader(csv_report.open()))
    assert [(r["device"], r["result"], r["verified"], r["image_sha256"]) for r in rows] == [
        (good.path, "ok", "false", "")] * 2
    assert csv_report.read_text().count("seq,device,") == 1


@pytest.mark.root
def test_a_csv_report_keeps_a_formula_a_name_spells_from_running_in_a_spreadsheet(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A cell beginning with = runs as a formula when the report is opened in a spreadsheet
    (an image named so here; a stick's model and serial are the stick's own words)."""
    named = tmp_path / "=HYPERLINK(1).img"
    named.write_bytes(os.urandom(MiB))
    target = loop_factory(4 * MiB, fill=PATTERN)
    sheet, lines = tmp_path / "run.csv", tmp_path / "run.jsonl"
    for report in (sheet, lines):
        done = run("flash", named, target.path, "--yes", "--no-verify", "--report", report)
        assert done.returncode == 0, done.stderr
    (row,) = csv.DictReader(sheet.open())
    assert row["image"] == "'=HYPERLINK(1).img"
    assert json.loads(lines.read_text())["image"] == "=HYPERLINK(1).img"  # JSON as it is


@pytest.mark.root
def test_a_finished_drive_is_in_the_report_before_the_run_ends(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any],
        tmp_path: Path) -> None:
    """Killed (SIGKILL) while a slow drive is still writing: the fast one's record is there."""
    path, _ = image(tmp_path, 16 * MiB)
    fast = loop_factory(24 * MiB, fill=PATTERN)
    slow = loop_factory(24 * MiB, fill=PATTERN)
    add = throttle((slow, 1_000_000))
    report = tmp_path / "run.csv"
    proc = subprocess.Popen([*popsicle_cmd(), "flash", str(path), fast.path, slow.path, "--yes",
                             "--json", "--bucket-size", "1M", "--report", str(report)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: add(os.getpid()))
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "result" and event["device"] == fast.path:
                break
            assert time.monotonic() < deadline and event["event"] != "summary", line
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rows = list(csv.DictReader(report.open()))
    assert [(r["device"], r["result"]) for r in rows] == [(fast.path, "ok")]


@pytest.mark.parametrize(("name", "words"), [
    ("run.txt", "must end in .csv, .jsonl or .json"),
    ("no/such/dir/run.csv", "No such file or directory"),
])
@pytest.mark.root
def test_an_unusable_report_refuses_before_writing(loop_factory: Callable[..., Loop],
                                                   tmp_path: Path, name: str,
                                                   words: str) -> None:
    path, _ = image(tmp_path, MiB)
    loop = loop_factory(2 * MiB, fill=PATTERN)
    done = run("flash", path, loop.path, "--yes", "--report", tmp_path / name)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert loop.read() == bytes([PATTERN]) * loop.size


def test_a_record_in_csv_and_json_lines() -> None:
    info = events.DriveInfo(seq=3, port_path="1-1.2", vendor="SanDisk", model="Cruzer Blade",
                            serial="4C53, \"odd\"", size=16 * 10**9)
    result = events.DriveResult("/dev/sdb", events.Status.INVALID, 4096, "/dev/sdb: differs", 1234,
                                verified=False, drive=info)
    data = record(result, None, image="/srv/img/raspios.img.xz", sha256="ab" * 32,
                  started=0.0, ended=61.0)
    assert data["first_bad_offset"] == 1234 and data["image"] == "raspios.img.xz"
    assert data["started"] == "1970-01-01T00:00:00Z" and data["ended"] == "1970-01-01T00:01:01Z"
    (row,) = csv.DictReader([",".join(FIELDS), format_record(data, "csv")])
    assert row["serial"] == "4C53, \"odd\"" and row["port_path"] == "1-1.2"
    assert row["write_speed"] == "" and row["verified"] == "false"
    assert json.loads(format_record(data, "jsonl"))["seq"] == 3


@pytest.mark.root
def test_a_report_that_fills_its_disk_is_said_once_and_fails_no_drive(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    path, data = image(tmp_path, 2 * MiB)
    loop = loop_factory(4 * MiB, fill=PATTERN)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(small)], check=True)
    try:
        (small / "filler").write_bytes(b"x" * 4096)
        refused = run("flash", path, loop.path, "--yes", "--report", small / "full.csv")
        assert refused.returncode == 2, refused.stderr
        assert "cannot write to it: No space left on device" in refused.stderr
        assert "the drives go on" not in refused.stderr, refused.stderr  # they do not: exit 2
        assert loop.read() == bytes([PATTERN]) * loop.size, "written despite the refusal"
        done = run("flash", path, loop.path, "--yes", "--json", "--report",
                   small / "full.jsonl")
        assert done.returncode == 0, done.stderr
        notes = [e["text"] for e in map(json.loads, done.stdout.splitlines())
                 if e["event"] == "note"]
        assert [n for n in notes if "cannot write the report" in n] == [
            f"--report {small / 'full.jsonl'}: cannot write the report: No space left on "
            "device; the drives go on"]
        assert loop.read(len(data)) == data
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@pytest.mark.root
def test_drives_cancelled_before_writing_have_records_too(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any],
        tmp_path: Path) -> None:
    data = os.urandom(8 * MiB)
    source = loop_factory(8 * MiB)
    source.backing.write_bytes(data)
    drives = [loop_factory(8 * MiB, fill=PATTERN) for _ in range(2)]
    add = throttle((source, 1 << 20))
    report = tmp_path / "run.jsonl"
    proc = subprocess.Popen([*popsicle_cmd(), "flash", source.path, *(d.path for d in drives),
                             "--yes", "--json", "--sha256", hashlib.sha256(data).hexdigest(),
                             "--report", str(report)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: add(os.getpid()))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line).get("phase") == "checksum":
                break
        proc.terminate()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(r["seq"], r["device"], r["result"], r["bytes_written"]) for r in records] == [
        (i, d.path, "cancelled", 0) for i, d in enumerate(drives, 1)]


def test_the_report_imports_no_view() -> None:
    """A job-side sink: importing it loads neither the rows nor the views (no job imports a
    view), only the progress measure they share."""
    code = ("import sys, popsicle_py.report; "
            "print(' '.join(m for m in sys.modules if m.startswith('popsicle_py')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert "popsicle_py.report" in loaded and "popsicle_py.progress" in loaded
    assert not {"popsicle_py.rows", "popsicle_py.view"} & set(loaded), loaded
