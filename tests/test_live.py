"""What a person sees on a terminal, third round (issue 32), read with tmux's capture-pane.

A URL whose server stalls, resumes and then fails (the image row says each as it happens, the
drives say they wait); twelve drives, one dying and one counterfeit, in a 12-line pane (the
fold never hides a failed drive); a typed ^C and a pane narrowed and widened again (no ghost
rows, a cancelled row keeps its numbers); rows whose numbers agree; the last line names the
drives that did not end ok.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, popsicle_cmd
from test_view import Tmux, exit_of, needs_tmux, row_of, wait_for
from webserver import Served, WebServer, serving

from popsicle_py import events, live, progress, rows, verdicts
from popsicle_py.events import Cause, DriveInfo, DriveResult, Status, Step

MiB = 1 << 20
PATTERN = 0xA5


@pytest.fixture
def pane() -> Iterator[Callable[[int, int], Tmux]]:
    """``pane(width, height)``: a tmux pane of that size, killed at the end."""
    made: list[Tmux] = []

    def make(width: int, height: int) -> Tmux:
        made.append(Tmux(width, height))
        return made[-1]

    yield make
    for p in made:
        p.kill()


@pytest.fixture
def server() -> Iterator[WebServer]:
    with serving() as s:
        yield s


def command(*args: str, env: str = "") -> str:
    return " ".join([env, *map(shlex.quote, [*popsicle_cmd(), *args])]).strip()


def table_title(lines: list[str]) -> int:
    return next(i for i, line in enumerate(lines) if "drives ok" in line)


def narrow_enough(lines: list[str], width: int) -> None:
    """No row wider than the pane (the last line is one line the terminal wraps: -J joins it)."""
    wide = [line for line in lines if len(line) > width and not line.startswith("not ok: ")]
    assert not wide, (width, wide)


# ----------------------------------------------------------------------------------------------
# The download as a row of its own


@needs_tmux
@pytest.mark.root
def test_a_download_that_stalls_resumes_and_fails_says_so_on_its_row(
        loop_factory: Callable[..., Loop], server: WebServer, pane: Callable[[int, int], Tmux],
        tmp_path: Path) -> None:
    size = 16 * MiB
    data = os.urandom(size)
    server.add("/stick.img", Served(data, stall_at=[4 * MiB], drop_at=[10 * MiB],
                                    refuse_from=10 * MiB))
    drives = [loop_factory(24 * MiB, fill=PATTERN) for _ in range(2)]
    p = pane(80, 24)
    env = ("POPSICLE_PY_HTTP_TIMEOUT=6 POPSICLE_PY_HTTP_RETRIES=1 "
           "POPSICLE_PY_HTTP_BACKOFF=2 POPSICLE_PY_HTTP_OUTAGE=0")
    p.start(command("flash", server.url("/stick.img"), *(d.path for d in drives), "--yes",
                    "--bucket-size", "1M", "--no-checksum", env=env), tmp_path)
    p.go()

    def image_row(lines: list[str]) -> str:
        return row_of(lines, "image") or ""

    # Silent server: the image row says stalled at the bytes received; the drives wait,
    # with no speed or time left.
    stalled = wait_for(p, lambda lines: "stalled" in image_row(lines), timeout=30, screen=True)
    row = image_row(stalled)
    assert re.search(r" 25% .*stalled", row), stalled
    assert table_title_free(stalled)
    for d in drives:
        mine = row_of(stalled, d.path) or ""
        assert mine.endswith("waiting") and "B/s" not in mine, stalled
        assert not re.search(r"\d:\d\d", mine), f"a time left while waiting: {mine}"
    drawn = [line for line in stalled if line.startswith(("image ", "/dev/"))]
    assert drawn[0].startswith("image "), "the image row is on top"
    narrow_enough(stalled, 80)

    # The connection times out: resuming, at the byte reached.
    resuming = wait_for(p, lambda lines: "resuming" in image_row(lines), timeout=30,
                        screen=True)
    assert "resuming at 4 MiB" in "\n".join(resuming), resuming
    # It resumes, then fails for good: the row says why.
    failed = wait_for(p, lambda lines: "failed" in image_row(lines), timeout=60)
    text = "\n".join(failed)
    assert "HTTP 503" in text, failed
    assert "checked" not in text and "100%" not in image_row(failed), failed
    end = wait_for(p, lambda lines: exit_of(lines) is not None, timeout=60)
    if os.environ.get("SHOW_PANE"):
        print("\n".join(end))
    assert exit_of(end) == 1, end
    title = table_title(end)
    image_rows = [line for line in end[:title] if line.startswith("image ")]
    assert image_rows and "failed" in image_rows[-1] and " 62% " in image_rows[-1], end
    assert re.search(r"received 10(\.0)?/16 MiB", image_rows[-1]) or " 62% " in image_rows[-1]
    last = [line for line in end[title:] if line.strip() and not line.startswith("EXIT=")][-1]
    assert last.startswith("not ok: #1 ") and "the image failed" in last, end


def table_title_free(lines: list[str]) -> bool:
    """The run has not ended yet (no table on the screen)."""
    return not any("drives ok" in line for line in lines)


def test_the_image_row_says_checked_only_after_a_checksum_matched() -> None:
    from io import StringIO

    from rich.console import Console

    from popsicle_py.view import RichView

    for checked, word in ((True, "checked"), (False, "downloaded")):
        view = RichView(Console(file=StringIO(), width=100, force_terminal=True))
        view.handle(events.Started("http://h/x.img", "raw", 8 * MiB, ("/dev/sdz",)))
        view.handle(events.Phase(None, Step.DOWNLOADING, "http://h/x.img"))
        view.handle(events.Progress(None, Step.DOWNLOADING, 2 * MiB, 8 * MiB))
        view.handle(events.Phase("/dev/sdz", Step.WRITING))
        view.handle(events.Progress("/dev/sdz", Step.WRITING, 2 * MiB, 8 * MiB))
        image = view.by_device[None]
        assert image.state == "downloading" and image.tracker.ended is None, \
            "the drives started: the download is not checked for that"
        assert view.board.rows[0] is image
        view.handle(events.Download(events.Fetch.COMPLETE, 8 * MiB, 8 * MiB, checked=checked))
        assert image.state == word
        view.close()


# ----------------------------------------------------------------------------------------------
# Twelve drives in twelve lines


@needs_tmux
@pytest.mark.root
def test_twelve_drives_in_a_short_pane_never_hide_the_failed_ones(
        loop_factory: Callable[..., Loop], dying_loop: Callable[..., Loop],
        faulty_drive: Callable[..., Any], pane: Callable[[int, int], Tmux],
        tmp_path: Path) -> None:
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(6 * MiB + 7))
    dying = dying_loop(8 * MiB, good=2 * MiB)
    fake = faulty_drive(8 * MiB, wrap=2 * MiB)
    good = [loop_factory(8 * MiB, fill=PATTERN) for _ in range(10)]
    targets = [dying.path, *(g.path for g in good[:5]), fake.path, *(g.path for g in good[5:])]
    p = pane(80, 12)
    p.start(command("flash", str(image), *targets, "--yes", "--bucket-size", "1M"), tmp_path)
    p.go()
    end = wait_for(p, lambda lines: exit_of(lines) is not None, timeout=120)
    if os.environ.get("SHOW_PANE"):
        print("\n".join(end))
    assert exit_of(end) == 1, end
    narrow_enough(end, 80)
    title = table_title(end)
    frame = end[:title]
    for bad in (dying.path, fake.path):
        row = row_of(frame, bad)
        assert row is not None and re.search(r"(failed|invalid)", row), (bad, frame)
    folded = [line for line in frame if "not shown" in line]
    assert folded and re.search(r"\(\d+ ok", folded[-1]), frame
    # The table lists the two that did not end ok first, and the last line names them.
    table = [line for line in end[title:] if "/dev/" in line]
    assert {dying.path, fake.path} == {re.search(r"/dev/\S+", t)[0]  # type: ignore[index]
                                       for t in table[:2]}, table
    last = [line for line in end if line.strip() and not line.startswith("EXIT=")][-1]
    assert last.startswith("not ok: ") and dying.path in last and fake.path in last, end
    assert "no space left" in last or "I/O error" in last, last


def test_the_fold_takes_ok_rows_first_and_never_a_failed_one() -> None:
    one = [(rows.Piece("x"),)]
    two = [(rows.Piece("x"),), (rows.Piece("why"),), (rows.Piece("more"),)]
    blocks = [one, two, one, one, one, one]
    kinds = [rows.KEEP, rows.KEEP, rows.OK, rows.BUSY, rows.OK, rows.BUSY]
    kept, folded = rows.fold(blocks, kinds, 6)
    assert folded == {rows.OK: 2} and len(kept) == 4
    kept, folded = rows.fold(blocks, kinds, 4)
    assert folded == {rows.OK: 2, rows.BUSY: 2}, folded
    assert kept[0] == one and kept[1] == two[:2], "failed rows stay, their detail cut to a line"
    kept, folded = rows.fold(blocks, kinds, 1)
    assert kept[:2] == [one, two[:2]], "nothing hides a failed row"


# ----------------------------------------------------------------------------------------------
# A typed ^C and a resize

#: After the command: whether the terminal echoes typed keys again (the exit status kept).
ECHO = ("; s=$?; if stty -a | grep -qw -- -echo; then echo ECHO=off; else echo ECHO=on; fi; "
        "(exit $s)")


@needs_tmux
def test_ctrl_c_twice_quits_at_once_and_gives_the_echo_back(
        pane: Callable[[int, int], Tmux], tmp_path: Path) -> None:
    """The live view turns the echo off; a second Ctrl-C (which quits at once, skipping
    atexit) still turns it back on."""
    script = ("import os, signal; from popsicle_py import live, signals; "
              "live.quiet_keys(); c = signals.Cancellation(); "
              "c.installed().__enter__(); os.kill(os.getpid(), signal.SIGINT); "
              "os.kill(os.getpid(), signal.SIGINT)")
    p = pane(80, 24)
    p.start(" ".join(map(shlex.quote, [popsicle_cmd()[0], "-c", script])) + ECHO, tmp_path)
    p.go()
    end = wait_for(p, lambda lines: exit_of(lines) is not None, timeout=20)
    assert exit_of(end) == 130 and "ECHO=on" in end, end


@needs_tmux
@pytest.mark.root
def test_a_resize_and_a_typed_ctrl_c_leave_each_row_once_with_its_numbers(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any],
        pane: Callable[[int, int], Tmux], tmp_path: Path) -> None:
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(16 * MiB))
    fast = loop_factory(24 * MiB, fill=PATTERN)
    slow = loop_factory(24 * MiB, fill=PATTERN)
    add = throttle((slow, 1_500_000))
    p = pane(120, 40)
    add(p.start(command("flash", str(image), fast.path, slow.path, "--yes", "--bucket-size",
                        "1M") + ECHO, tmp_path))
    p.go()
    wait_for(p, lambda lines: "done" in (row_of(lines, fast.path) or "")
             and re.search(r"\d%", row_of(lines, slow.path) or "") is not None)
    for width in (80, 120):
        p.resize(width)
        wait_for(p, lambda lines, w=width: max(map(len, lines)) > w - 45, screen=True)
        time.sleep(0.6)  # a few refreshes at this width (4 a second)
    p.tmux("send-keys", "-t", "t", "C-c")
    end = wait_for(p, lambda lines: exit_of(lines) is not None, timeout=20)
    assert exit_of(end) == 130, end
    title = table_title(end)
    live_rows = [line for line in end[:title] if line.startswith(("/dev/", "image"))]
    for device in (fast.path, slow.path):
        mine = [line for line in live_rows if line.startswith(device + " ")]
        assert len(mine) == 1, f"ghost rows of {device}: {live_rows}"
    assert "^C" not in "\n".join(end), "the typed ^C was echoed over the rows"
    assert "ECHO=on" in end, "the terminal's echo was not given back"
    cancelled = row_of(end[:title], slow.path) or ""
    match = re.search(r" (\d+)% ", cancelled)
    assert match and 0 < int(match[1]) < 100 and "cancelled" in cancelled, cancelled


# ----------------------------------------------------------------------------------------------
# Numbers that agree


def test_a_rows_bytes_say_their_pass_and_its_average_is_bytes_over_its_time() -> None:
    tracker = progress.DriveProgress(writes=True, verifies=True, size=8 * MiB)
    row = live.DriveRow("/dev/sdz", tracker)
    tracker.on_phase("writing", 0.0)
    tracker.on_progress("writing", 6 * MiB, 8 * MiB, 0.5)
    shot = row.snapshot(0.6)
    assert rows.byte_counts(shot) == "written 6/8 MiB" and shot.fraction == pytest.approx(6 / 16)
    tracker.on_progress("writing", 8 * MiB, 8 * MiB, 0.6)
    tracker.on_phase("verifying", 0.6)
    tracker.on_progress("verifying", 2 * MiB, 8 * MiB, 0.7)
    assert rows.byte_counts(row.snapshot(0.8)) == "verified 2/8 MiB"
    # 5.9 MiB in a drive's 2 s (as its result says it): 2.9 MiB/s, not the phase's burst.
    tracker.on_end("ok", 0.9, 8 * MiB, elapsed=2.0)
    done = row.snapshot(5.0)
    assert done.speed == "4 MiB/s" and done.eta == "avg", done
    assert rows.byte_counts(done) == "verified 8/8 MiB", "a done row keeps its byte counts"


def test_columns_keep_their_place_from_frame_to_frame() -> None:
    board = live.Board()
    a = live.DriveRow("/dev/sdy", progress.DriveProgress(size=64 * MiB))
    b = live.DriveRow("/dev/sdz", progress.DriveProgress(size=64 * MiB))
    board.add(a)
    board.add(b)
    starts: set[tuple[int, int]] = set()
    now = 0.0
    for step in range(40):  # speeds come and go, percentages grow, a row finishes
        now = step * 0.3
        for i, r in enumerate((a, b)):
            if step == 0:
                r.tracker.on_phase("writing", now)
            r.tracker.on_progress("writing", min(64, step * (i + 1)) * MiB, 64 * MiB, now)
        if step == 30:
            a.tracker.on_end("ok", now, 64 * MiB, elapsed=9.0)
            a.say("done")
        for width in (80,):
            lines = [t.plain for t in board.lines(width, 24, now)]
            for line in lines:
                bar = re.search(r"[━─]+", line)
                assert bar is not None, lines
                starts.add((bar.start(), bar.end()))
    assert len(starts) == 1, f"the bar moved: {sorted(starts)}"


# ----------------------------------------------------------------------------------------------
# The last line, and probe's words


def test_the_last_line_names_the_drives_that_did_not_end_ok() -> None:
    results = tuple(
        DriveResult(f"/dev/loop{i}", Status.OK, MiB, verified=True, drive=DriveInfo(seq=i))
        for i in range(1, 33))
    bad = (DriveResult("/dev/loop1", Status.FAILED, MiB, "no space", cause=Cause.NO_SPACE,
                       drive=DriveInfo(seq=1)),
           DriveResult("/dev/loop32", Status.INVALID, MiB, "counterfeit",
                       cause=Cause.COUNTERFEIT, drive=DriveInfo(seq=32)))
    summary = events.Summary((bad[0], *results[1:31], bad[1]))
    line = verdicts.summary_line(summary)
    assert line == ("finished with problems: 30 of 32 drives ok; not ok: #1 /dev/loop1 failed "
                    "(no space left), #32 /dev/loop32 invalid (counterfeit)"), line
    table = live.summary_table(summary)
    first = [table.columns[1]._cells[i] for i in range(2)]
    assert first == ["/dev/loop1", "/dev/loop32"], first


def _end_at(width: int, summary: events.Summary) -> list[str]:
    import io

    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(live.FinalTable(summary))
    return out.getvalue().splitlines()


def test_the_end_in_a_narrow_terminal_keeps_each_drives_words_together() -> None:
    """At 50 columns the table's Details column was one letter wide: "no space left on
    device" stood one letter per line down the screen.  Below room for the words the end is
    one paragraph per drive, wrapped at words; a table again where it fits."""
    digest = "416b0183de1fea185a18eb2f6e7ce58bf6c5112b3b589db384064bed6641574f"
    results = (
        DriveResult("/dev/sdb", Status.OK, 8 * MiB, verified=True, elapsed=2.4,
                    device_sha256=digest, drive=DriveInfo(seq=1, port_path="1-1.2")),
        DriveResult("/dev/sdc", Status.FAILED, 4 * MiB, "no space left on device",
                    cause=Cause.NO_SPACE, elapsed=1.1, drive=DriveInfo(seq=2, port_path="1-1.3")))
    summary = events.Summary(results)
    for width in (40, 50, 60):
        lines = _end_at(width, summary)
        assert all(len(line) <= width for line in lines), (width, lines)
        text = " ".join(line.strip() for line in lines)
        assert "#2 /dev/sdc (port 1-1.3): failed, 4 MiB in 1.1 s: no space left on device" \
            in text, (width, lines)
        assert "#1 /dev/sdb (port 1-1.2): ok, 8 MiB in 2.4 s: written and verified" in text, \
            (width, lines)
        assert digest in "".join(lines), (width, lines)  # whole, folded, as sha256sum's
    wide = _end_at(120, summary)
    assert wide[1].startswith("┏") and "no space left on device" in " ".join(wide), wide


@pytest.mark.root
def test_probe_ends_each_drive_with_its_verdict_not_nothing_to_write(
        loop_factory: Callable[..., Loop]) -> None:
    import subprocess

    loop = loop_factory(8 * MiB, fill=PATTERN)
    done = subprocess.run([*popsicle_cmd(), "probe", loop.path, "--yes"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr
    assert "nothing to write" not in done.stdout, done.stdout
    assert f"{loop.path}: ok (genuine: holds all of 8 MiB)" in done.stdout.splitlines(), \
        done.stdout


# ----------------------------------------------------------------------------------------------
# The docs, as a person reads them

REPO = Path(__file__).resolve().parent.parent
MAN = REPO / "man" / "popsicle-py.1"


def rendered_man(width: int) -> str:
    """The man page as groff lays it out for a terminal ``width`` columns wide (plain text)."""
    import shutil
    import subprocess

    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    done = subprocess.run(["groff", "-man", "-Tascii", f"-rLL={width - 7}n", "-P-cbou",
                           str(MAN)], capture_output=True, text=True, check=True)
    return done.stdout


def man_section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(title)
    end = next(i for i in range(start + 1, len(lines)) if lines[i][:1].isupper())
    return lines[start + 1 : end]


@pytest.mark.parametrize("width", [60, 80])
def test_the_man_synopsis_is_neither_justified_nor_hyphenated(width: int) -> None:
    synopsis = [line.strip() for line in man_section(rendered_man(width), "SYNOPSIS")]
    assert not [line for line in synopsis if line.endswith("-")], "a word cut by a hyphen"
    assert not [line for line in synopsis if "  " in line], "spaces stretched to justify"


def test_the_man_exit_status_2_says_it_once_and_quotes_the_real_non_root_message() -> None:
    from popsicle_py.udisks import NEEDS_ROOT

    status = " ".join(" ".join(man_section(rendered_man(400), "EXIT STATUS")).split())
    assert status.count("Bad usage or input") == 1, status
    assert f"({NEEDS_ROOT})" in status, status


def test_the_man_page_lints_clean_with_mandoc_at_every_level() -> None:
    import shutil
    import subprocess

    if shutil.which("mandoc") is None:
        pytest.skip("mandoc is not installed")
    done = subprocess.run(["mandoc", "-Tlint", str(MAN)], capture_output=True, text=True,
                          check=False)
    assert done.stdout + done.stderr == "", done.stdout + done.stderr


def test_readmes_what_you_see_uses_the_programs_units_and_result_line() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### What you see"):readme.index("### A record per drive")]
    assert not re.search(r"\d MB\b|MB/s", section), "MB where the program prints MiB"
    said = " ".join(section.split())
    r = DriveResult("/dev/sdb", Status.OK, int(58.5 * MiB), verified=True,
                    drive=DriveInfo(seq=1, port_path="1-1.2", serial="4C53..."))
    line = verdicts.result_line(r, ", write 23.4 MiB/s, verify 80.1 MiB/s")
    assert f"`{line}`" in said, (line, said)
    for row in re.findall(r"^/dev/\S+ .*$", section, re.M):
        assert re.search(r"\d+% +(written|verified) [\d.]+/[\d.]+ MiB ", row), row


@needs_tmux
@pytest.mark.root
def test_ctrl_c_while_the_download_stalls_keeps_every_rows_numbers(
        loop_factory: Callable[..., Loop], server: WebServer, pane: Callable[[int, int], Tmux],
        tmp_path: Path) -> None:
    server.add("/x.img", Served(os.urandom(12 * MiB), stall_at=[5 * MiB]))
    drive = loop_factory(16 * MiB, fill=PATTERN)
    p = pane(120, 40)
    p.start(command("flash", server.url("/x.img"), drive.path, "--yes", "--bucket-size", "1M",
                    "--no-checksum", env="POPSICLE_PY_HTTP_TIMEOUT=30"), tmp_path)
    p.go()
    wait_for(p, lambda lines: "waiting" in (row_of(lines, drive.path) or ""), screen=True)
    p.tmux("send-keys", "-t", "t", "C-c")
    end = wait_for(p, lambda lines: exit_of(lines) is not None, timeout=40)
    if os.environ.get("SHOW_PANE"):
        print("\n".join(end))
    assert exit_of(end) == 130, end
    frame = end[:table_title(end)]
    image, row = row_of(frame, "image") or "", row_of(frame, drive.path) or ""
    assert re.search(r" 41% +received 5/12 MiB .*cancelled", image), frame
    # The image's head (its first MiB) is held back: 4 to 5 MiB of the 5 received written.
    assert re.search(r" (1[6-9]|2\d)% +written [45](\.\d)?/12 MiB .*cancelled", row), frame


def test_probes_rows_and_table_say_the_verdict_not_nothing_to_write() -> None:
    from io import StringIO

    from rich.console import Console

    from popsicle_py.view import RichView

    out = StringIO()
    view = RichView(Console(file=out, width=100, force_terminal=True, color_system=None))
    view.handle(events.Phase("/dev/sdz", Step.PROBING))
    view.handle(events.Probed("/dev/sdz", 8 * MiB, 8 * MiB, True, "genuine: holds all of 8 MiB"))
    result = DriveResult("/dev/sdz", Status.OK, 0)
    view.handle(events.Result(result))
    row = view.by_device["/dev/sdz"].snapshot(time.monotonic())
    assert "genuine" in rows.plain(rows.layout([row], 100)[0]), row
    view.handle(events.Summary((result,)))
    assert "nothing to write" not in out.getvalue() and "genuine: holds all" in out.getvalue()


def test_a_hung_drive_that_fills_the_ring_is_not_a_stalled_download() -> None:
    """Nothing moves in either case; only a silent server is "stalled"."""
    def board(written: tuple[int, int]) -> list[rows.Row]:
        b = live.Board()
        image = live.DriveRow("image", progress.DriveProgress(writes=True, verifies=False))
        image.tracker.on_phase("downloading", 0.0)
        image.tracker.on_progress("downloading", 100 * MiB, 256 * MiB, 1.0)
        image.say("downloading")
        b.add(image)
        for i, n in enumerate(written):
            r = live.DriveRow(f"/dev/sd{'yz'[i]}", progress.DriveProgress(size=256 * MiB))
            r.tracker.on_phase("writing", 0.0)
            r.tracker.on_progress("writing", n, 256 * MiB, 1.0)
            r.say("writing")
            b.add(r)
        return b.snapshots(10.0)

    server_silent = board((99 * MiB, 100 * MiB))
    assert [r.state for r in server_silent] == ["stalled", "waiting", "waiting"]
    assert not any(r.speed or r.eta for r in server_silent)
    drive_hung = board((100 * MiB, 30 * MiB))
    assert [r.state for r in drive_hung] == ["downloading", "waiting", "writing"]


def test_the_duplicator_screen_hears_the_download_too() -> None:
    from io import StringIO

    from rich.console import Console

    from popsicle_py.view import WatchView

    view = WatchView(Console(file=StringIO(), width=100, force_terminal=True), "http://h/x.img")
    view.handle(events.Phase(None, Step.DOWNLOADING, "http://h/x.img"))
    view.handle(events.Progress(None, Step.DOWNLOADING, MiB, 8 * MiB))
    view.handle(events.Download(events.Fetch.RESUMING, MiB, 8 * MiB, "timed out"))
    assert view.current[None].state == "resuming"
    view.handle(events.Download(events.Fetch.FAILED, MiB, 8 * MiB,
                                "http://h/x.img: download failed after 6 attempts: timed out"))
    image = view.current[None]
    assert image.state == "failed" and image.detail == "download failed after 6 attempts: " \
        "timed out"
    view.close()


def test_readmes_rows_are_the_ones_the_program_draws_at_100_columns() -> None:
    """README's example, drawn by the live view from the same drives' numbers."""
    size = int(58.5 * MiB)
    board = live.Board()
    made = {}
    for name, port in (("/dev/sdb", "1-1.2"), ("/dev/sdc", "1-1.3"), ("/dev/sdd", "2-2")):
        made[name] = live.DriveRow(name, progress.DriveProgress(size=size), port)
        made[name].tracker.on_phase("writing", 0.0)
        board.add(made[name])
    now = 34.1 / 23.4
    made["/dev/sdb"].tracker.on_progress("writing", int(34.1 * MiB), size, now)
    made["/dev/sdb"].say("writing")
    failed = made["/dev/sdc"]
    failed.tracker.on_progress("writing", int(4.2 * MiB), size, 0.5)
    failed.tracker.on_end("failed", 1.0, int(4.2 * MiB))
    failed.say("failed", "no space left on the drive (it failed, or is smaller than it claims)")
    done = made["/dev/sdd"].tracker
    done.on_progress("writing", size, size, 1.0)
    done.on_phase("verifying", 1.0)
    done.on_progress("verifying", size, size, 1.2)
    done.on_end("ok", 1.3, size, elapsed=size / (19 * MiB))
    made["/dev/sdd"].say("done")
    drawn = [t.plain for t in board.lines(100, 24, now)]
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### What you see"):readme.index("### A record per drive")]
    block = section.split("```\n")[1].rstrip("\n").splitlines()
    assert block == drawn, "\n".join(drawn)


@pytest.mark.root
@pytest.mark.parametrize("checksum", [True, False], ids=["sha256", "none"])
def test_json_says_the_downloads_course_and_checked_only_with_a_checksum(
        loop_factory: Callable[..., Loop], server: WebServer, tmp_path: Path,
        checksum: bool) -> None:
    import hashlib
    import json
    import subprocess

    data = os.urandom(3 * MiB + 5)
    server.add("/d.img", Served(data, drop_at=[MiB]))
    drive = loop_factory(4 * MiB, fill=PATTERN)
    extra = ["--sha256", hashlib.sha256(data).hexdigest()] if checksum else ["--no-checksum"]
    env = {**os.environ, "POPSICLE_PY_HTTP_BACKOFF": "0.05"}
    done = subprocess.run([*popsicle_cmd(), "flash", server.url("/d.img"), drive.path, "--yes",
                           "--json", *extra], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    news = [e for e in map(json.loads, done.stdout.splitlines()) if e["event"] == "download"]
    assert [e["state"] for e in news] == ["resuming", "complete"], news
    assert news[0]["bytes"] == MiB and news[0]["total"] == len(data)
    assert news[1]["checked"] is checksum and news[1]["bytes"] == len(data)


def test_the_image_row_is_on_top_for_a_file_too_and_checked_once_its_checksum_passed() -> None:
    from io import StringIO

    from rich.console import Console

    from popsicle_py.view import RichView

    view = RichView(Console(file=StringIO(), width=100, force_terminal=True))
    view.handle(events.Phase(None, Step.CHECKSUM, "image.img.sha256"))
    view.handle(events.Progress(None, Step.CHECKSUM, 4 * MiB, 8 * MiB))
    view.handle(events.Started("image.img", "raw", 8 * MiB, ("/dev/sdy", "/dev/sdz")))
    image = view.by_device[None]
    assert [r.name for r in view.board.rows] == ["image", "/dev/sdy", "/dev/sdz"]
    assert image.state == "checksum" and image.tracker.ended is None
    view.handle(events.Phase("/dev/sdy", Step.WRITING))  # the drives start once it passed
    assert image.state == "checked"
    view.close()
