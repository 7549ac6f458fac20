"""May this user open the drives at all?  Asked once, before the confirmation.

Root opens drives itself; anyone else through udisks2, which asks polkit per drive.  Without
either, the run is refused in one line rather than failing drive by drive.
"""

from __future__ import annotations

import grp
import os
from collections.abc import Sequence

from popsicle_py.errors import Refused

# udisks (D-Bus, subprocess: 4 ms) is imported only when a user without access is seen.


def __getattr__(name: str) -> str:
    """``NEEDS_ROOT_TO_WRITE`` and ``NEEDS_ROOT_TO_READ``: udisks' lines (asked for no other
    name: the import system looks for ``__path__`` here)."""
    if name not in ("NEEDS_ROOT_TO_WRITE", "NEEDS_ROOT_TO_READ"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from popsicle_py import udisks

    return udisks.NEEDS_ROOT if name == "NEEDS_ROOT_TO_WRITE" else udisks.NEEDS_ROOT_TO_READ


def access_refusal(euid: int, denied: Sequence[str], *, writing: bool) -> str | None:
    """The one line for a user who may not open the drives (``denied``), or None."""
    if euid == 0 or not denied:
        return None  # root's own EACCES (rare: a locked-down node) is reported per drive
    from popsicle_py import udisks

    return udisks.NEEDS_ROOT if writing else udisks.NEEDS_ROOT_TO_READ


def require_access(paths: Sequence[str], *, writing: bool, limit: float | None = None
                   ) -> None:
    """Refuse at once, in one line, when this user cannot open the drives at all: not root,
    not allowed by the kernel, and no udisks2 to ask polkit (or none that answers within
    ``limit`` s, the run's --stall-timeout when under D-Bus' 25 s)."""
    mode = os.R_OK | (os.W_OK if writing else 0)
    line = access_refusal(os.geteuid(), [p for p in paths if not os.access(p, mode)],
                          writing=writing)
    if line is not None:
        from popsicle_py import udisks

        udisks.set_limit(limit)
        why = udisks.unavailable_line(writing=writing)  # installed but hung: says so
        if why is not None:
            raise Refused([why])


def may_write_future_drives() -> bool:
    """Root, or a member of the group that owns disk nodes ("disk" on Debian and Fedora)."""
    if os.geteuid() == 0:
        return True
    try:
        return grp.getgrnam("disk").gr_gid in os.getgroups()
    except KeyError:
        return False


def require_future_access(limit: float | None = None) -> None:
    """watch: drives plugged in later must be openable by this user, or through udisks2."""
    if not may_write_future_drives():
        from popsicle_py import udisks

        udisks.set_limit(limit)
        why = udisks.unavailable_line(writing=True)
        if why is not None:
            raise Refused([why])
