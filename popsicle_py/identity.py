"""Media identity: which medium a device name stands for, so a swap is never written.

A name (/dev/sdb, /dev/loop3) and even a device number outlive the medium behind them: a
stick pulled and another pushed into the same port, or a loop device detached and attached to
another file of the same size, keeps both.  The kernel's ``diskseq`` (Linux >= 5.15) is a
counter that changes whenever the medium behind a disk changes; a loop device is further
pinned by its backing file (st_dev, st_ino) or block device, and offset.

This module is pure (no I/O) so that both the drive layer (which records an identity when the
plan is made, from sysfs) and the block-device layer (which reads one from the opened
descriptor) can use it without importing each other; :mod:`popsicle_py.media` reads one
from an open descriptor or sysfs.
"""

from __future__ import annotations

from popsicle_py.records import record


@record
class LoopKey:
    """What a loop device stands on: its backing file (or block device) and offset."""

    #: st_dev and st_ino of the backing path (a block device node has them too).
    dev: int
    ino: int
    #: The device number when the backing is a block device, else 0.
    rdev: int
    offset: int


@record
class MediaIdentity:
    """A medium as the kernel names it; ``None`` fields are unknown and not compared."""

    path: str
    devnum: int
    size: int
    diskseq: int | None = None
    serial: str | None = None
    #: For a loop device: what it stands on; None for other disks (and an unbound loop).
    loop: LoopKey | None = None
    is_loop: bool = False


def same_media(recorded: MediaIdentity, now: MediaIdentity) -> str | None:
    """None when ``now`` is the medium ``recorded``, else what differs (a few words).

    Device number, size, serial and loop backing are compared first because they make the
    clearest message; diskseq last, as the catch-all for a medium that changed behind an
    unchanged name, number and size.
    """
    if recorded.devnum != now.devnum:
        return "different device number"
    if (recorded.is_loop or now.is_loop) and now.loop is None and recorded.loop is not None:
        return "the loop device was detached"  # its size is 0 now: said as what happened
    if recorded.size and not now.size:
        return "no medium now: pulled, or its card taken out"
    if recorded.size != now.size:
        return "different size"
    if recorded.serial is not None and now.serial is not None and recorded.serial != now.serial:
        return "different serial"
    if (recorded.is_loop or now.is_loop) and recorded.loop is not None and now.loop is not None:
        a, b = recorded.loop, now.loop
        if (a.dev, a.ino, a.rdev) != (b.dev, b.ino, b.rdev):
            return "attached to a different file" if not (a.rdev or b.rdev) \
                else "attached to a different device"
        if a.offset != b.offset:
            return "different offset into its backing file"
    if recorded.diskseq is not None and now.diskseq is not None \
            and recorded.diskseq != now.diskseq:
        return f"different medium: diskseq {recorded.diskseq}, now {now.diskseq}"
    return None


def not_confirmed(path: str, why: str) -> str:
    """The one line that refuses a drive whose medium changed since the user confirmed it."""
    return f"{path} is not the drive you confirmed ({why}); nothing was written to it"
