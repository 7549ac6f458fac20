"""Output of the commands whose output is the whole point (list, cache list, polkit-rule).

A listing that cannot be written has failed: one line on stderr and exit 1 (a full disk, a
closed stdout), never a traceback.  A reader that left (``| head``) is no failure.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from popsicle_py.cli.guard import error
from popsicle_py.errors import EXIT_FAILED, EXIT_OK

if TYPE_CHECKING:
    from rich.table import Table


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's own flush at exit stays quiet."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def emit(render: Callable[[], object]) -> int:
    """Run ``render`` (which writes to stdout); the exit status says whether it got out."""
    if sys.stdout is None:
        error("cannot write the output: standard output is closed")
        return EXIT_FAILED
    try:
        render()
        sys.stdout.flush()
    except BrokenPipeError:  # | head: the reader left, what it read is no less true
        _quiet_stdout()
        return EXIT_OK
    except OSError as exc:
        _quiet_stdout()
        error(f"cannot write the output ({exc.strerror or exc})")
        return EXIT_FAILED
    return EXIT_OK


def write_text(text: str) -> int:
    """``text`` on stdout, as :func:`emit` judges it."""
    return emit(lambda: sys.stdout.write(text))


def table(columns: Sequence[str], rows: Sequence[Sequence[str]], *,
          optional: Sequence[str] = ()) -> Table:
    """A borderless table; the ``optional`` columns only when some row has something there."""
    from rich import box
    from rich.table import Table

    keep = [i for i, name in enumerate(columns)
            if name not in optional or any(row[i] for row in rows)]
    result = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i in keep:
        result.add_column(columns[i], overflow="fold")
    for row in rows:
        result.add_row(*(row[i] for i in keep))
    return result


def print_table(table_: Table) -> int:
    """A Rich table on stdout, as :func:`emit` judges it."""
    from popsicle_py.live import ShownConsole

    console = ShownConsole()  # a mount point's "[/x]" is a name, not markup
    return emit(lambda: console.print(table_))
