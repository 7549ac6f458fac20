"""Reading the kernel's sysfs: the one place that knows its paths and how to read them.

Every value is a stripped string, or None when the attribute is not there (a device gone, a
kernel without it): callers decide what absence means.
"""

from __future__ import annotations

import os

ROOT = "/sys"


def block_dir(devnum: int) -> str:
    """/sys/dev/block/MAJ:MIN, the block device's own directory (a symlink into /sys/devices)."""
    return f"{ROOT}/dev/block/{os.major(devnum)}:{os.minor(devnum)}"


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def attr(devnum: int, name: str) -> str | None:
    """One attribute of a block device (``size``, ``ro``, ``diskseq``, ``loop/backing_file``)."""
    return read(os.path.join(block_dir(devnum), name))
