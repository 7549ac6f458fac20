"""What a person sees: the live rows in a real terminal (tmux), pipes, honest words.

The terminal tests run the command in a tmux pane, widened from 80 to 120 to 200 columns during
one flash, with a slow drive (blkio throttle), a dying one (ENOSPC after 4 MiB) and a fast one,
and read the screen with ``capture-pane`` at each width while the drives are being written:
every row keeps its name, bar and percentage, and no line is longer than the terminal (``-J``
joins wrapped lines, so a wrapped row would show as a line wider than the pane).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import layout_cases
import psutil
import pytest
from conftest import Loop, popsicle_cmd

from popsicle_py import events, progress, rows
from popsicle_py.events import Cause, Status, Step
from popsicle_py.units import format_size
from popsicle_py.view import JsonView, PlainView, RichView

MiB = 1 << 20
PATTERN = 0xA5

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def make_image(directory: Path, size: int, name: str = "image.img") -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = directory / name
    path.write_bytes(data)
    return path, data


# ----------------------------------------------------------------------------------------------
# One measure per drive (pure)


def flash_events(device: str, size: int, first: int) -> list[Any]:
    """What a FlashJob emits for one drive: write all but the first bucket, verify it, write
    the first bucket, verify that."""
    rest = size - first
    out: list[Any] = [events.Phase(device, Step.WRITING)]
    out += [events.Progress(device, Step.WRITING, n, size) for n in range(0, rest + 1, MiB)]
    out.append(events.Phase(device, Step.VERIFYING))
    out += [events.Progress(device, Step.VERIFYING, n, rest) for n in range(0, rest + 1, MiB)]
    out.append(events.Phase(device, Step.SYNCING))
    out += [events.Progress(device, Step.WRITING, rest + n, size) for n in (MiB, first)]
    out.append(events.Phase(device, Step.VERIFYING))
    out += [events.Progress(device, Step.VERIFYING, n, first) for n in (0, first // 2, first)]
    return out


def feed(tracker: progress.DriveProgress, stream: list[Any], t0: float = 0.0) -> list[float]:
    fractions = []
    for i, e in enumerate(stream):
        now = t0 + i * 0.1
        if isinstance(e, events.Phase):
            tracker.on_phase(e.phase, now)
        else:
            tracker.on_progress(e.phase, e.done, e.total, now)
        assert tracker.total == 2 * 10 * MiB, "the total jumped"
        fractions.append(tracker.fraction or 0.0)
    return fractions


def test_one_measure_never_runs_backwards_and_reaches_100_only_when_ok() -> None:
    tracker = progress.DriveProgress(writes=True, verifies=True, size=10 * MiB)
    fractions = feed(tracker, flash_events("/dev/sdb", 10 * MiB, 4 * MiB))
    assert fractions == sorted(fractions), "the bar ran backwards"
    assert fractions[-1] < 1.0, "100% before the drive ended"
    assert 0.2 < fractions[len(fractions) // 2] < 0.8
    tracker.on_end("ok", 10.0, 10 * MiB)
    assert tracker.fraction == 1.0
    assert tracker.write_speed and tracker.verify_speed
    assert tracker.speed(10.0) is None, "a finished drive has no live speed"


def test_no_verify_is_one_pass_and_verify_alone_is_one_pass() -> None:
    tracker = progress.DriveProgress(writes=True, verifies=False)
    tracker.on_phase("writing", 0.0)
    tracker.on_progress("writing", 5 * MiB, 10 * MiB, 1.0)
    assert tracker.fraction == pytest.approx(0.5)
    verify = progress.DriveProgress(writes=False, verifies=True)
    verify.on_phase("verifying", 0.0)
    verify.on_progress("verifying", 3 * MiB, 12 * MiB, 1.0)
    assert verify.fraction == pytest.approx(0.25)
    assert verify.total == 12 * MiB


def test_unknown_size_shows_bytes_not_an_invented_percentage() -> None:
    tracker = progress.DriveProgress()
    tracker.on_phase("writing", 0.0)
    tracker.on_progress("writing", 21 * MiB, None, 1.0)
    assert tracker.fraction is None and tracker.total is None
    row = rows.Row("/dev/sdb", "writing", fraction=None, done=tracker.pass_done)
    text = rows.plain(rows.layout([row], 80)[0])
    assert format_size(21 * MiB) in text and "%" not in text, text
    tracker.on_end("ok", 2.0, 30 * MiB)
    assert tracker.fraction == 1.0 and tracker.total == 60 * MiB


def sample_rows() -> list[rows.Row]:
    why = "no space left on device (it failed, or is smaller than it claims)"
    return [
        rows.Row("/dev/loop12", "writing", port="1-1.2", label="SanDisk Cruzer Blade",
                 fraction=0.58, done=34 * MiB, total=58 * MiB, speed="23.4 MB/s", eta="0:12"),
        rows.Row("/dev/loop3", "failed", port="2-2", fraction=0.07, done=4 * MiB,
                 total=58 * MiB, detail=why, style="red"),
        rows.Row("/dev/sdb", "verifying", fraction=0.91, done=50 * MiB, total=58 * MiB,
                 speed="103.1 MB/s", eta="0:01"),
        rows.Row("/dev/sdc", "done", fraction=1.0, done=58 * MiB, total=58 * MiB,
                 speed="19.0 MB/s", eta="avg"),
    ]


@pytest.mark.parametrize("width", [40, 60, 80, 100, 120, 160, 200])
def test_rows_fit_any_width_and_keep_the_essentials(width: int) -> None:
    lines = [rows.plain(line) for line in rows.layout(sample_rows(), width)]
    assert all(len(line) <= width for line in lines), [ln for ln in lines if len(ln) > width]
    short = width < 60  # names lose their /dev/ before anything else goes
    by_name = {r.name: next(line for line in lines
                            if line.startswith(r.name.removeprefix("/dev/") if short else r.name))
               for r in sample_rows()}
    assert re.search(r"━+.* 58% ", by_name["/dev/loop12"])
    if width >= 60:
        assert "23.4 MB/s" in by_name["/dev/loop12"] and "0:12" in by_name["/dev/loop12"]
    assert "writing" in by_name["/dev/loop12"]
    assert by_name["/dev/loop3"].rstrip().endswith(("failed", "claims)")), by_name
    assert " 7% " in by_name["/dev/loop3"] and "MB/s" not in by_name["/dev/loop3"]
    assert by_name["/dev/sdc"].endswith("done")
    assert width < 60 or "19.0 MB/s  avg" in by_name["/dev/sdc"]
    # The error never eats the other rows: it is on its own lines when it does not fit.
    text = "\n".join(lines)
    assert "no space left on device" in text
    if width >= 80:
        assert "1-1.2" in by_name["/dev/loop12"], "the port is shown at 80 columns"


def test_layout_at_every_width_is_the_one_recorded_before_the_priority_table() -> None:
    """The table-driven layout lays out each row set as the old hand-written one did, at every
    width from 10 to 200 (tests/fixtures/layout_rows.json: a digest per width, recorded from
    the old ``rows.py`` with ``python tests/layout_cases.py OLD_ROWS_PY``)."""
    expected = json.loads((Path(__file__).parent / "fixtures" / "layout_rows.json").read_text())
    assert expected.pop("widths") == [layout_cases.WIDTHS.start, layout_cases.WIDTHS.stop - 1]
    got = layout_cases.record(rows, rows.layout_rows)
    assert got.keys() == expected.keys()
    for name, case in layout_cases.cases(rows).items():
        for width, old, new in zip(layout_cases.WIDTHS, expected[name].split(),
                                   got[name].split(), strict=True):
            lines = [rows.plain(line) for line in rows.layout(case, width)]
            assert new == old, (name, width, lines)
            assert all(len(line) <= max(width, 20) for line in lines), (name, width, lines)


def test_a_full_screen_drops_the_oldest_finished_rows_first() -> None:
    blocks = [[("a",)], [("b",), ("b detail",)], [("c",)], [("d",)], [("e",)]]
    finished = [True, True, False, True, False]
    kept, dropped = rows.fit_height(blocks, finished, 4)  # type: ignore[arg-type]
    assert kept == [[("c",)], [("d",)], [("e",)]] and dropped == 2  # type: ignore[comparison-overlap]
    assert rows.fit_height(blocks, finished, 10) == (blocks, 0)  # type: ignore[arg-type, comparison-overlap]
    kept, dropped = rows.fit_height(blocks, [False] * 5, 2)  # type: ignore[arg-type]
    assert dropped == 0 and len(kept) == 5, "a drive being written never leaves the screen"


# ----------------------------------------------------------------------------------------------
# tmux


class Tmux:
    """One pane of a private tmux server (its own socket), killed at the end."""

    def __init__(self, width: int, height: int = 50) -> None:
        self.socket = f"view-{uuid.uuid4().hex[:8]}"
        self.width, self.height = width, height

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True,
                              capture_output=True, text=True).stdout

    def start(self, command: str, cwd: Path) -> int:
        """Run ``command`` in a pane once Enter is sent (see :meth:`go`); the pane's pid."""
        # The pane's own size, not a COLUMNS inherited from whoever runs the tests.
        env = (f"env -u COLUMNS -u LINES PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} "
               "TERM=tmux-256color")
        script = f"read go; cd {shlex.quote(str(cwd))}; {env} {command}; echo EXIT=$?; " \
                 "sleep 600"
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", str(self.width),
                  "-y", str(self.height), "bash", "-c", script)
        self.tmux("set-option", "-t", "t", "history-limit", "5000")
        return int(self.tmux("display-message", "-p", "-t", "t", "#{pane_pid}").strip())

    def go(self) -> None:
        self.tmux("send-keys", "-t", "t", "Enter")

    def capture(self, *, screen: bool = False) -> list[str]:
        """The pane and its history (or, with ``screen``, what is on the screen now), wrapped
        lines joined (-J), escape codes left out."""
        history = () if screen else ("-S", "-")
        text = self.tmux("capture-pane", "-p", "-J", "-t", "t", *history)
        return [line.rstrip() for line in text.splitlines()]

    def resize(self, width: int) -> None:
        """The window (and its one pane) becomes ``width`` columns wide: the program in it
        gets SIGWINCH, as when a person resizes a terminal."""
        self.tmux("resize-window", "-t", "t", "-x", str(width), "-y", str(self.height))
        self.width = width

    def signal(self, signum: int) -> None:
        pane = int(self.tmux("display-message", "-p", "-t", "t", "#{pane_pid}").strip())
        for child in _children(pane):
            os.kill(child, signum)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        sockets = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}"
        (sockets / self.socket).unlink(missing_ok=True)


def _children(pid: int) -> list[int]:
    return [child.pid for child in psutil.Process(pid).children()]


@pytest.fixture
def tmux_pane() -> Iterator[Callable[[int], Tmux]]:
    made: list[Tmux] = []

    def make(width: int) -> Tmux:
        pane = Tmux(width)
        made.append(pane)
        return pane

    yield make
    for pane in made:
        pane.kill()


def wait_for(pane: Tmux, check: Callable[[list[str]], bool], timeout: float = 60, *,
             screen: bool = False) -> list[str]:
    """The pane's lines once ``check`` holds for them (polled until the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = pane.capture(screen=screen)
        if check(lines):
            return lines
        assert time.monotonic() < deadline, "\n".join(lines)
        time.sleep(0.1)


def row_of(lines: list[str], device: str) -> str | None:
    mine = [line for line in lines if re.match(rf"{re.escape(device)}\s", line)]
    return mine[-1] if mine else None


def exit_of(lines: list[str]) -> int | None:
    for line in lines:
        if line.startswith("EXIT="):
            return int(line[5:])
    return None


ROW = re.compile(r"[━─]{3,}\s+(\d{1,3})%")


#: The pane's widths, in order: widening only (a narrowing pane rewraps the lines already
#: drawn, so the live region's cursor moves would no longer match what is on the screen).
WIDTHS = (80, 120, 200)


@needs_tmux
@pytest.mark.root
def test_rows_in_tmux_keep_name_bar_and_percent_with_a_failed_drive(
        loop_factory: Callable[..., Loop], dying_loop: Callable[..., Loop],
        throttle: Callable[..., Any], tmux_pane: Callable[[int], Tmux], tmp_path: Path
        ) -> None:
    """One flash; the pane widens from 80 to 120 to 200 columns while a drive is written, and
    the screen is read at each width (the rows follow it)."""
    image, data = make_image(tmp_path, 16 * MiB + 4099)
    slow = loop_factory(24 * MiB, fill=PATTERN)
    fast = loop_factory(24 * MiB, fill=PATTERN)
    dying = dying_loop(24 * MiB, good=4 * MiB)
    add = throttle((slow, 4_000_000))
    pane = tmux_pane(WIDTHS[0])
    cmd = " ".join(map(shlex.quote, [*popsicle_cmd(), "flash", str(image), slow.path,
                                     dying.path, fast.path, "--yes", "--bucket-size", "1M"]))
    add(pane.start(cmd, tmp_path))
    pane.go()
    devices = (slow.path, dying.path, fast.path)

    def laid_out_at(width: int, narrower: int) -> Callable[[list[str]], bool]:
        """The dying drive failed, the slow one is being written, and the rows are laid out
        at ``width`` (one of them is wider than the pane was before)."""
        def check(lines: list[str]) -> bool:
            bad, busy = row_of(lines, dying.path), row_of(lines, slow.path)
            found = [row_of(lines, device) or "" for device in devices]
            return bool(bad and "failed" in bad and busy and ROW.search(busy)
                        and re.search(r"\d [kMG]i?B/s \d+:\d\d (writing|verifying)", busy)
                        and max(map(len, found)) > narrower)
        return check

    for narrower, width in zip((0, *WIDTHS[:-1]), WIDTHS, strict=True):
        pane.resize(width)
        during = wait_for(pane, laid_out_at(width, narrower), screen=True)
        for device in devices:
            row = row_of(during, device)
            assert row is not None and ROW.search(row), (width, device, during)
        busy = row_of(during, slow.path)
        assert busy is not None and re.search(r"\d [kMG]i?B/s", busy), (width, during)
        assert re.search(r"\d:\d\d", busy), (width, during)
        assert not re.search(r"B/s", row_of(during, dying.path) or ""), "a failed row's speed"
        assert any("no space left" in line for line in during), (width, during)
        wide = [line for line in during if len(line) > width]
        assert not wide, (width, wide)

    width = WIDTHS[-1]
    end = wait_for(pane, lambda lines: exit_of(lines) is not None)
    assert exit_of(end) == 1, end
    assert not [line for line in end if len(line) > width]
    for device, state in ((slow.path, "done"), (fast.path, "done"), (dying.path, "failed")):
        row = row_of(end[: next(i for i, ln in enumerate(end) if "drives ok" in ln)], device)
        assert row is not None and state in row, (device, end)
    done = row_of(end, fast.path)
    assert done is not None
    ok_row = [ln for ln in end if ln.startswith(slow.path) and "100%" in ln]
    assert ok_row and re.search(r"\d [kMG]i?B/s +avg", ok_row[-1]), "a finished row's average speed"
    assert slow.read(len(data)) == data and fast.read(len(data)) == data


@needs_tmux
@pytest.mark.root
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_leaves_each_row_once(loop_factory: Callable[..., Loop],
                                       throttle: Callable[..., Any],
                                       tmux_pane: Callable[[int], Tmux], tmp_path: Path,
                                       signum: int) -> None:
    image, _ = make_image(tmp_path, 16 * MiB)
    fast = loop_factory(24 * MiB, fill=PATTERN)
    slow = loop_factory(24 * MiB, fill=PATTERN)
    add = throttle((slow, 2_000_000))
    pane = tmux_pane(100)
    cmd = " ".join(map(shlex.quote, [*popsicle_cmd(), "flash", str(image), fast.path,
                                     slow.path, "--yes", "--bucket-size", "1M"]))
    add(pane.start(cmd, tmp_path))
    pane.go()
    wait_for(pane, lambda lines: "done" in (row_of(lines, fast.path) or "")
             and "writing" in (row_of(lines, slow.path) or ""))
    pane.signal(signum)
    end = wait_for(pane, lambda lines: exit_of(lines) is not None, timeout=15)
    assert exit_of(end) == 128 + signum, end
    title = next(i for i, line in enumerate(end) if "drives ok" in line)
    live = [line for line in end[:title] if line.startswith("/dev/")]
    assert sorted(live) == sorted(set(live)), f"rows printed twice: {live}"
    for device in (fast.path, slow.path):
        assert len([line for line in live if line.startswith(device + " ")]) == 1, end


# ----------------------------------------------------------------------------------------------
# Pipes: the exit status of a piped run is the truth


def piped(command: list[str], reader: str, cwd: Path) -> tuple[int, str, str]:
    """``command | reader`` through bash with pipefail; (command's status, out, err)."""
    script = (f"set -o pipefail; {' '.join(map(shlex.quote, command))} 2>{cwd}/err"
              f" | {reader}; echo \"status=${{PIPESTATUS[0]}}\"")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, cwd=cwd, check=False)
    out = done.stdout
    match = re.search(r"status=(\d+)", out)
    assert match, out + done.stderr
    return int(match.group(1)), out[: match.start()], (cwd / "err").read_text()


@pytest.mark.root
@pytest.mark.parametrize("reader", ["head -1", "grep -q writing"])
@pytest.mark.parametrize("mode", ["plain", "json"])
def test_flash_piped_to_a_reader_that_leaves_exits_with_the_truth(
        loop_factory: Callable[..., Loop], dying_loop: Callable[..., Loop], tmp_path: Path,
        reader: str, mode: str) -> None:
    image, data = make_image(tmp_path, 6 * MiB + 5)
    loops = [loop_factory(8 * MiB, fill=PATTERN) for _ in range(2)]
    extra = ["--json"] if mode == "json" else []
    base = [*popsicle_cmd(), "flash", str(image), "--yes", "--bucket-size", "1M", *extra]

    status, out, err = piped([*base, *(lp.path for lp in loops)], reader, tmp_path)
    assert status == 0, err
    assert "unexpected error" not in err and "Traceback" not in err and "Broken pipe" not in err
    assert "Exception ignored" not in err, err
    if reader == "head -1":
        assert len(out.splitlines()) == 1
    for loop in loops:
        assert loop.read(len(data)) == data

    dying = dying_loop(16 * MiB, good=2 * MiB)
    status, _, err = piped([*base, loops[0].path, dying.path], reader, tmp_path)
    assert status == 1, err
    assert "unexpected error" not in err and "Traceback" not in err


@pytest.mark.root
@pytest.mark.parametrize("mode", ["plain", "json"])
def test_verify_piped_to_head_exits_with_the_truth(loop_factory: Callable[..., Loop],
                                                   tmp_path: Path, mode: str) -> None:
    image, data = make_image(tmp_path, 3 * MiB)
    good = loop_factory(4 * MiB)
    good.backing.write_bytes(data + bytes(MiB))
    extra = ["--json"] if mode == "json" else []
    status, out, err = piped([*popsicle_cmd(), "verify", str(image), good.path, *extra],
                             "head -1", tmp_path)
    assert status == 0 and len(out.splitlines()) == 1, err
    assert "unexpected error" not in err and "Exception ignored" not in err, err
    bad = loop_factory(4 * MiB, fill=PATTERN)
    status, _, err = piped([*popsicle_cmd(), "verify", str(image), bad.path, *extra],
                           "head -1", tmp_path)
    assert status == 1 and "unexpected error" not in err, err


@pytest.mark.root
@pytest.mark.parametrize("mode", ["plain", "json"])
@pytest.mark.parametrize("redirect", [">/dev/full", ">&-"])
def test_flash_whose_output_cannot_be_written_still_exits_with_the_truth(
        loop_factory: Callable[..., Loop], tmp_path: Path, mode: str, redirect: str) -> None:
    """A log on a full disk (ENOSPC) or a closed stdout loses the output, not the drives."""
    image, data = make_image(tmp_path, 3 * MiB + 5)
    loop = loop_factory(4 * MiB, fill=PATTERN)
    extra = ["--json"] if mode == "json" else []
    command = shlex.join([*popsicle_cmd(), "flash", str(image), loop.path, "--yes", *extra])
    done = subprocess.run(["bash", "-c", f"{command} {redirect}"], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "unexpected error" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
    assert loop.read(len(data)) == data

    missing = shlex.join([*popsicle_cmd(), "flash", str(tmp_path / "none.img"), loop.path,
                          "--yes", *extra])
    done = subprocess.run(["bash", "-c", f"{missing} {redirect}"], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "does not exist" in done.stderr, done.stderr


def test_views_survive_an_output_that_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """Each view on /dev/full: no exception, one line on stderr, later writes dropped."""
    for make in (PlainView, JsonView):
        with open("/dev/full", "w") as out:
            view = make(out)
            view.handle(events.Note("first"))
            view.handle(events.Summary())
            view.close()
            assert view.out.gone
        assert capsys.readouterr().err.count("cannot write the output") == 1


def test_a_plain_result_line_says_its_reason_once() -> None:
    out = io.StringIO()
    view = PlainView(out)
    view.handle(events.Result(events.DriveResult("/dev/sdb", Status.CANCELLED, 0, "cancelled",
                                                 cause=Cause.CANCELLED)))
    view.handle(events.Result(events.DriveResult("/dev/sdc", Status.FAILED, 0,
                                                 "/dev/sdc: stalled: no progress",
                                                 cause=Cause.STALLED)))
    assert out.getvalue().splitlines() == ["/dev/sdb: cancelled", "/dev/sdc: failed: stalled: "
                                           "no progress"]


def test_views_stop_writing_quietly_when_the_reader_left(tmp_path: Path) -> None:
    """Each view on a pipe whose reader is gone: no exception, later writes dropped."""
    for make in (PlainView, JsonView):
        r, w = os.pipe()
        os.close(r)
        out = os.fdopen(w, "w")
        view = make(out)
        view.handle(events.Note("first"))
        view.handle(events.Summary())
        view.close()
        assert view.out.gone


# ----------------------------------------------------------------------------------------------
# Honest words: --no-verify says "written (not verified)" everywhere


@pytest.mark.root
def test_no_verify_says_written_not_verified_in_every_view(loop_factory: Callable[..., Loop],
                                                           tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    image, data = make_image(tmp_path, 2 * MiB + 3)
    loop = loop_factory(4 * MiB, fill=PATTERN)
    base = [*popsicle_cmd(), "flash", str(image), loop.path, "--yes", "--no-verify"]

    plain = subprocess.run(base, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=60, check=False)
    assert plain.returncode == 0, plain.stderr
    words = f"{format_size(len(data))} written (not verified)"
    assert re.search(rf"^{re.escape(loop.path)}: ok \({re.escape(words)}, "
                     r"write [\d.]+ [kMG]i?B/s\)$", plain.stdout, re.M), plain.stdout
    assert "verified)" in plain.stdout and "and verified" not in plain.stdout

    js = subprocess.run([*base, "--json"], capture_output=True, text=True,
                        stdin=subprocess.DEVNULL, timeout=60, check=False)
    summary = json.loads(js.stdout.splitlines()[-1])
    assert [r["verified"] for r in summary["results"]] == [False]
    assert summary["results"][0]["status"] == "ok"
    checked = subprocess.run([*base[:-1], "--json"], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=60, check=False)
    assert [r["verified"] for r in json.loads(checked.stdout.splitlines()[-1])["results"]] \
        == [True]

    env = {**os.environ, "COLUMNS": "80", "LINES": "40", "TERM": "xterm-256color"}
    child = pexpect.spawn(base[0], base[1:], env=env, dimensions=(40, 80), encoding="utf-8",
                          timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    screen = re.sub(r"\x1b\[[0-?]*[ -/]*[@-~]", "", child.before or "")
    assert child.exitstatus == 0, screen
    assert "written (not verified)" in screen, screen
    assert "written and verified" not in screen
    assert loop.read(len(data)) == data


def test_rich_rows_for_verify_alone_and_for_a_flash(tmp_path: Path) -> None:
    """The flash's row says done only once verified; ``verify``'s row is one pass."""
    import io

    from rich.console import Console

    out = io.StringIO()
    view = RichView(Console(file=out, width=80, color_system=None, force_terminal=True),
                    writes=False)
    view.handle(events.Started("img", "raw", 8 * MiB, ("/dev/sdz",)))
    view.handle(events.Phase("/dev/sdz", Step.VERIFYING))
    view.handle(events.Progress("/dev/sdz", Step.VERIFYING, 2 * MiB, 8 * MiB))
    row = view.by_device["/dev/sdz"].snapshot(time.monotonic())
    assert row.fraction == pytest.approx(0.25)
    view.handle(events.Result(events.DriveResult("/dev/sdz", Status.OK, 0, verified=True)))
    view.handle(events.Summary((events.DriveResult("/dev/sdz", Status.OK, 0, verified=True),)))
    assert "matches the image" in out.getvalue()


@needs_tmux
@pytest.mark.umockdev
@pytest.mark.skipif(shutil.which("umockdev-run") is None, reason="umockdev-run is not installed")
@pytest.mark.parametrize("width", [80, 120])
def test_duplicator_screen_in_tmux_shows_the_port_of_each_stick(
        tmux_pane: Callable[[int], Tmux], tmp_path: Path, width: int) -> None:
    """``watch`` on a real terminal, with a mocked USB stick in port 1-2 and a SATA disk."""
    image, _ = make_image(tmp_path, 3 * MiB + 7)
    stick = Path(__file__).resolve().parent / "fixtures" / "cli-usb-stick.umockdev"
    pane = tmux_pane(width)
    cmd = " ".join(map(shlex.quote, ["umockdev-run", "-d", str(stick), "--", *popsicle_cmd(),
                                     "watch", str(image), "--yes", "--include-present",
                                     "--count", "1", "--no-power-off"]))
    pane.start(cmd, tmp_path)
    pane.go()
    end = wait_for(pane, lambda lines: exit_of(lines) is not None)
    assert exit_of(end) == 0, end
    assert not [line for line in end if len(line) > width], end
    title = next(i for i, line in enumerate(end) if "drives ok" in line)
    live = end[:title]
    assert any(re.match(r"(Duplicating .*)?image\.img \(.*\)  done 1  failed 0", line)
               for line in live), live
    row = row_of(live, "/dev/sdb")
    assert row is not None and re.match(r"/dev/sdb +1-2 .*━+ 100% .*B/s +avg done", row), live
    assert "pull it" in "\n".join(live)
    ignored = row_of(live, "/dev/sda")
    assert ignored is not None and "ignored" in ignored and "%" not in ignored, live
    assert any("│ /dev/sdb │ 1-2  │ ok" in line for line in end[title:]), end


def _sectors_read(loop: Loop) -> int:
    """The drive's own count of 512-byte sectors read (the kernel's, not ours)."""
    return int(Path(f"/sys/block/{loop.name}/stat").read_text().split()[2])


@pytest.mark.root
def test_speeds_are_the_drives_own_when_the_view_lags(
        tmp_path: Path, loop_factory: Callable[..., Loop],
        throttle: Callable[..., Callable[[int], None]]) -> None:
    """A view that falls behind (a slow terminal, a busy program) gets a pass's messages in
    one burst: the speeds it shows are still the drive's, as the engine timed them."""
    from popsicle_py import app
    from popsicle_py.signals import Cancellation

    image, data = make_image(tmp_path, 4 * MiB)
    loop = loop_factory(8 * MiB)
    rate = 4_000_000  # so each pass takes about a second
    throttle((loop, rate))(os.getpid())
    before = _sectors_read(loop)
    out = io.StringIO()

    class Lagging(PlainView):
        """Stops listening at the first bytes written until the drive was read back whole."""

        lagged = False

        def handle(self, event: events.WatchEvent) -> None:
            if isinstance(event, events.Progress) and not self.lagged:
                self.lagged = True
                deadline = time.monotonic() + 60
                while _sectors_read(loop) - before < len(data) // 512 \
                        and time.monotonic() < deadline:
                    time.sleep(0.05)  # polls the drive's own counter: not a wait for timing
            super().handle(event)

    request = app.FlashRequest(app.SourceOptions(str(image)),
                               app.TargetOptions(devices=(loop.path,)),
                               write=app.WriteOptions(probe=False))
    with app.prepare_flash(request) as job:
        summary = job.run(Lagging(out), Cancellation())
    assert summary.ok and loop.read(len(data)) == data
    result = summary.results[0]
    assert result.write_seconds is not None and result.verify_seconds is not None
    # The drive cannot go faster than its throttle (a little slack for the kernel's
    # accounting); before, the verify pass looked instant: "verify 2.4 GiB/s".
    assert len(data) / result.verify_seconds < rate * 1.25
    assert len(data) / result.write_seconds < rate * 1.25
    line = next(t for t in out.getvalue().splitlines() if t.startswith(f"{loop.path}: ok"))
    speeds = re.findall(r"(write|verify) ([\d.]+) (KiB|MiB|GiB)/s", line)
    assert {kind for kind, _, _ in speeds} == {"write", "verify"}, line
    for _, number, unit in speeds:
        shown = float(number) * {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]
        assert shown < rate * 1.25, line
