"""A target's name, resolved to the block device the kernel finds there, or refused.

A name is looked up off the calling thread, within one timeout: a name on a hung network or
FUSE share (a path through one, a symlink into one) never answers, and the user's Ctrl-C
must still be heard.  The device is the one the kernel's own walk of the name finds, never
the one realpath()'s reading of links as text would (:func:`_same_to_the_kernel`).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterable

from popsicle_py import sysfs
from popsicle_py.drives.asking import start_quiet
from popsicle_py.drives.model import TargetError
from popsicle_py.drives.system import DeviceNames, source_stats

#: Seconds a target's name is given to answer (its links followed, its node stat()ed).
ASK_NAME = 2.0

_Named = tuple[str, str, os.stat_result]


def resolve_name(path: str, timeout: float = ASK_NAME) -> _Named:
    """(the resolved name, the name as the user is shown it, its stat) of the block device
    ``path`` names; TargetError with one line saying why it is none, or does not answer."""
    answer: list[_Named | BaseException] = []
    done = threading.Event()

    def look() -> None:
        try:
            answer.append(_resolve(path))
        except BaseException as exc:
            answer.append(exc)
        done.set()

    start_quiet(look, name="popsicle-name")
    if not done.wait(timeout):
        raise TargetError(path, f"{path} does not answer (a name on a hung network or FUSE "
                                "mount?); name the drive as /dev/sdX")
    if isinstance(answer[0], BaseException):
        raise answer[0]
    return answer[0]


def _resolve(path: str) -> _Named:
    shown = path
    if not path:  # an unset shell variable: "/dev/" exists, and is not what was meant
        raise TargetError(path, "the drive's name is empty (an unset variable?); name a drive"
                                " such as /dev/sdb")
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as e:  # a folder on the way closed to this user: not "does not exist"
        raise TargetError(path, f"{path} cannot be examined: {e.strerror}") from None
    if not os.path.lexists(path):
        hint = ""
        if "/" not in path and os.path.exists(f"/dev/{path}"):  # typed "sdb" or "loop8"
            hint = f"; did you mean /dev/{path}?"
        raise TargetError(path, f"{path} does not exist{hint}")
    real = os.path.realpath(path)
    if real != path:
        shown = f"{path} ({real})"
    try:
        st = os.stat(real)
    except FileNotFoundError:
        if real != path:
            _same_to_the_kernel(path, real, None)
        raise TargetError(path, f"{shown} does not exist") from None
    except OSError as e:
        raise TargetError(path, f"{shown} cannot be examined: {e.strerror}") from None
    if real != path:
        _same_to_the_kernel(path, real, st)
    if not stat.S_ISBLK(st.st_mode):
        raise TargetError(path, f"{shown} is not a block device ({_kind_of_file(st.st_mode)})")
    if not os.path.exists(sysfs.block_dir(st.st_rdev)):
        raise TargetError(path, f"{shown} is a block device the kernel does not list in sysfs")
    if not DeviceNames().in_dev(real) and os.statvfs(real).f_flag & os.ST_NODEV:  # EACCES
        node = _own_node(st.st_rdev)
        raise TargetError(path, f"{shown} is on a file system mounted nodev, where no device"
                                f" can be opened{f'; name it as {node}' if node else ''}")
    return real, shown, st


def _kind_of_file(mode: int) -> str:
    kinds = {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory", stat.S_IFCHR:
             "a character device", stat.S_IFIFO: "a pipe", stat.S_IFSOCK: "a socket"}
    return kinds.get(stat.S_IFMT(mode), "not a device")


def _own_node(rdev: int) -> str:
    """The block device's node in /dev (its kernel name), or "" when there is none."""
    node = f"/dev/{os.path.basename(os.path.realpath(sysfs.block_dir(rdev)))}"
    return node if named_devnums([node]) == {rdev} else ""


def _same_to_the_kernel(path: str, real: str, st: os.stat_result | None) -> None:
    """TargetError unless the kernel's walk of ``path`` finds what its resolved name ``real``
    is (``st``; None: nothing).  realpath() reads links as text, which a magic link of /proc
    (/proc/PID/root/..., /proc/PID/fd/N) is not: into another root or mount namespace, the
    text names our own node of that name, another drive perhaps, which would be written."""
    named = None
    with contextlib.suppress(OSError):
        named = os.stat(path)
    if named is None and st is None:
        return  # nothing either way: "does not exist"
    if named is not None and st is not None \
            and stat.S_IFMT(named.st_mode) == stat.S_IFMT(st.st_mode) \
            and (named.st_rdev == st.st_rdev or not stat.S_ISBLK(st.st_mode)):
        return
    node = _own_node(named.st_rdev) if named is not None and stat.S_ISBLK(named.st_mode) \
        else ""
    raise TargetError(path, f"{path} is not what its resolved name {real} is (a link into "
                            "another root or mount namespace?); name the drive by its own "
                            f"name{f', such as {node}' if node else ''}")


def named_devnums(paths: Iterable[str]) -> frozenset[int]:
    """The device numbers of the block devices named (what cannot be examined, or does not
    answer in time, is left out: it is refused as a target anyway)."""
    return frozenset(st.st_rdev for st in source_stats(paths).values()
                     if st is not None and stat.S_ISBLK(st.st_mode))
