"""Looking at a path a mount table names without asking a file system that may hang.

A mount's source (the image file a FUSE driver such as fuse2fs mounts, a device node) or an
overlay's layer may lie on a network or FUSE share.  stat() of it then waits for that share,
for good when it hangs, and Ctrl-C is not heard inside the call: ``list`` and every check
before a write hung with it.  The mount table says which file system each directory is on
without asking any: a path is looked at only while the directories on the way, and the path
itself, are on local file systems.  One that is not is taken as not there (the share's own
mount, and the loop devices' backing files the kernel names, are found by other means).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import Protocol

#: File systems whose calls may be slow (a loaded machine) but never wait on a daemon or a
#: network: FUSE (``fuse.*``, ``fuseblk``), NFS, CIFS and the like are not in it.
LOCAL_FILE_SYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "bcachefs", "f2fs", "jfs", "reiserfs", "nilfs2",
    "zfs", "vfat", "msdos", "exfat", "ntfs", "ntfs3", "hfs", "hfsplus", "udf", "iso9660",
    "squashfs", "erofs", "tmpfs", "ramfs", "devtmpfs", "devpts", "proc", "sysfs", "mqueue",
    "hugetlbfs", "cgroup", "cgroup2", "bpf", "tracefs", "debugfs", "securityfs", "configfs",
    "pstore", "efivarfs", "binfmt_misc", "overlay",
})
#: Symbolic links followed at most on one path, as the kernel's own limit.
MAX_LINKS = 40


class Mounted(Protocol):
    """What the look needs of a mount-table line."""

    @property
    def mountpoint(self) -> str: ...
    @property
    def fstype(self) -> str: ...


def local(path: str, table: Sequence[Mounted]) -> bool:
    """Whether the file system ``path`` (absolute, no symbolic links) is on is a local one:
    the last mount stacked on the longest mountpoint above it.  A path under no mountpoint
    (a table read in a chroot) is taken as local, as the file system of ``/`` mostly is."""
    best: Mounted | None = None
    for entry in table:
        mp = entry.mountpoint
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and (
                best is None or len(mp) >= len(best.mountpoint)):
            best = entry
    return best is None or best.fstype in LOCAL_FILE_SYSTEMS


def local_stat(path: str, table: Sequence[Mounted]) -> os.stat_result | None:
    """``os.stat(path)``, following symbolic links as it does; None when the path does not
    exist, or when reaching it would ask a file system that is not local (see above)."""
    if not path.startswith("/"):
        return None
    here, rest, links = "/", path.split("/"), 0
    while rest:
        part = rest.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            here = os.path.dirname(here)
            continue
        step = os.path.join(here, part)
        if not local(step, table):  # a share mounted there, or the path goes on in one
            return None
        try:
            if not stat.S_ISLNK(os.lstat(step).st_mode):
                here = step
                continue
            target = os.readlink(step)
        except OSError:
            return None
        links += 1
        if links > MAX_LINKS:
            return None
        rest[:0] = target.split("/")
        here = "/" if target.startswith("/") else here
    if not local(here, table):
        return None
    try:
        return os.stat(here)  # every step on the way was a local directory
    except OSError:
        return None
