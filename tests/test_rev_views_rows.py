"""Live rows with wide characters (Chinese, Japanese: two cells each) fit the terminal."""

from __future__ import annotations

import time

import pytest
from rich.cells import cell_len
from rich.console import Console

from popsicle_py import live, progress

MiB = 1 << 20


def _screen(board: live.Board, width: int) -> list[str]:
    console = Console(width=width, height=40, force_terminal=True, color_system=None,
                      highlight=False)
    with console.capture() as captured:
        console.print(board)
    return captured.get().splitlines()


@pytest.mark.parametrize("width", [60, 80, 100, 120])
def test_a_wide_label_or_error_never_pushes_the_state_off_the_row(width: int) -> None:
    """The rows were laid out counting characters: a drive labelled in Chinese made its row
    up to twice as wide as counted, and the terminal's edge cut its state ("writing") off;
    an error naming a file in Chinese was cut at the edge, its end lost."""
    now = time.monotonic()
    board = live.Board()
    busy = live.DriveRow("/dev/sdb", progress.DriveProgress(size=8 * MiB), "1-1.2",
                         "金士顿金士顿金士顿金士顿")
    busy.tracker.on_phase("writing", now)
    busy.progressed("writing", 2 * MiB, 8 * MiB, now)
    busy.say("writing")
    failed = live.DriveRow("/dev/sdc", progress.DriveProgress(size=8 * MiB))
    failed.tracker.on_phase("writing", now)
    failed.tracker.on_end("failed", now)
    failed.say("failed", "cannot read /home/用户/图像图像图像图像图像图像图像.img: "
                         "Input/output error")
    board.add(busy)
    board.add(failed)
    lines = _screen(board, width)
    assert all(cell_len(line) <= width for line in lines), lines
    (row,) = [line for line in lines if line.startswith(("/dev/sdb", "sdb"))]
    assert row.rstrip().endswith("writing"), lines
    said = " ".join(line.strip().removeprefix("↳ ") for line in lines
                    if not line.startswith(("/dev/", "sd")))
    assert "Input/output error" in said, lines
