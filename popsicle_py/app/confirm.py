"""What a front end shows before it asks "Continue?": plain data, drawn by each front end.

The CLI draws it as a Rich table on stderr; a station or a GUI as it likes.  A prepared job
carries its :class:`Confirmation`, so every front end asks about exactly the checked plan.
"""

from __future__ import annotations

from collections.abc import Sequence

from popsicle_py.drives import Drive
from popsicle_py.plan import Plan
from popsicle_py.ports import port_path_of
from popsicle_py.records import record


@record
class TargetRow:
    """One drive that will be overwritten, as the confirmation lists it."""

    device: str
    port: str
    drive: str
    size: int
    mountpoints: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@record
class Confirmation:
    """A heading, the drives, notes to read, then one question (default: no)."""

    title: str
    rows: tuple[TargetRow, ...]
    notes: tuple[str, ...]
    question: str
    #: Duplicator mode: the drives are the ones plugged in now (``rows`` may be empty), and
    #: ``warning`` says that every drive plugged in later is overwritten too.
    watch: bool = False
    warning: str = ""


def drives_word(count: int) -> str:
    """``1 drive``, ``3 drives``."""
    return f"{count} drive" if count == 1 else f"{count} drives"


def target_rows(drives: Sequence[Drive], plan: Plan | None = None) -> tuple[TargetRow, ...]:
    """The rows for ``drives``, with the plan's warnings for each."""
    warnings = plan.warnings if plan is not None else {}
    return tuple(TargetRow(d.path, port_path_of(d) or "", d.label or "?", d.size,
                           tuple(d.mountpoints), tuple(warnings.get(d.path, ())))
                 for d in drives)
