"""The checks of a read's OUTPUT before the drive is read: what may be replaced, where it may
go, that its files can be made there; each on a watched thread (a hung disk or share is a
refusal on time, never a hang)."""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable

from popsicle_py import drives, master, reading
from popsicle_py.drives import Drive
from popsicle_py.units import format_size


def temp_name(final: str) -> str:
    """Where one of OUTPUT's files is made, hidden, before it is named (published)."""
    folder, name = os.path.split(final)
    return os.path.join(folder, f".{name}.{secrets.token_hex(4)}.part")


def _not_a_file(name: str, st: os.stat_result) -> str | None:
    """Why ``name`` (lstat'ed) is not a file read may replace: anything but a regular file or
    a symlink to one (a device node, a link to /dev/sdc...), whatever --force says."""
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(name)
        except OSError:
            return None  # a link to nothing: replacing it loses nothing
        what = _KINDS.get(stat.S_IFMT(target.st_mode))
        return None if what is None else f"{name} is a symlink to a {what}: read replaces " \
            "only files"
    if kind == "directory":
        return f"{name} is a directory"
    return None if kind is None else f"{name} is a {kind}: read replaces only files"


#: What a name may be that read refuses to replace (a regular file or a link is not here).
_KINDS = {stat.S_IFDIR: "directory", stat.S_IFBLK: "block device",
          stat.S_IFCHR: "character device", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket"}


def output_refusals(output: str, files: tuple[str, ...], force: bool, drive: Drive,
                    fmt: str, stale: tuple[str, ...] = ()) -> list[str]:
    """Why OUTPUT cannot be written, one line each (empty: it can)."""
    folder = os.path.dirname(output)
    if not os.path.isdir(folder):
        return [f"{folder} is not a directory: OUTPUT's directory must exist"]
    lines: list[str] = []
    suffix = os.path.splitext(output)[1].lower()
    if suffix in reading.NOT_WRITTEN:
        lines.append(f"{output} ends in {suffix}, which read does not write: end it in .zst, "
                     ".xz or .gz to compress, or .img for a raw copy")
    for name in (*files, *stale):
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        except OSError as exc:  # a name too long (its sidecars' are longer), no search...
            lines.append(f"{name} cannot be written: {exc.strerror or exc}")
            break
        problem = _not_a_file(name, st)
        owner = name.removesuffix(".bmap")
        if problem:
            lines.append(problem)
        elif name.endswith(".bmap") and owner != output and os.path.lexists(owner):
            # Another image's map: replacing or removing it would leave that image with a
            # map that is not its own, or with none (whatever --force says).
            lines.append(f"{name} is the block map of {owner}, and flash would take it for "
                         f"{os.path.basename(output)} too: give OUTPUT another name")
        elif force:
            continue
        elif name in stale:
            lines.append(f"{name} exists: flash would take that old block map for "
                         f"{os.path.basename(output)}; --force removes it")
        else:
            lines.append(f"{name} exists; --force replaces it")
    devnums, _ = drives.path_storage(folder)
    if devnums & master.family(drive.devnum):
        lines.append(f"{output} is on {drive.path}, the drive being read; write it elsewhere")
    if fmt == "raw":
        room = _free(folder)
        if room is not None and room < drive.size:
            lines.append(f"not enough room for {output}: {format_size(drive.size)} needed, "
                         f"{format_size(room)} free in {folder}")
    return lines


def _free(folder: str) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def creatable(output: str, files: tuple[str, ...]) -> list[str]:
    """Why OUTPUT's files cannot be created in its directory (read-only, no permission, a
    name too long once made temporary), found by creating a file there (without a name where
    the file system allows, else the longest temporary name, removed): one line (empty: they
    can).  Run last, once nothing else refused: it writes."""
    longest = max((temp_name(name) for name in files), key=len)
    folder = os.path.dirname(output)
    try:
        if len(os.fsencode(os.path.basename(longest))) > os.pathconf(folder, "PC_NAME_MAX"):
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        try:  # a file with no name first: nothing is left of it whenever the process ends
            fd = os.open(folder, os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
            named = False
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            fd = os.open(longest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            named = True
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            extra = len(os.path.basename(longest)) - len(os.path.basename(output))
            most = os.pathconf(folder, "PC_NAME_MAX") - extra
            return [f"{output} cannot be written: its name is too long for the temporary "
                    f"files read writes beside it; shorten it to {most} characters or less"]
        return [f"{output} cannot be written: {exc.strerror or exc}"]
    os.close(fd)
    if named:
        os.unlink(longest)
    return []


def watched_output(check: Callable[[], list[str]], output: str, stall_timeout: float
                   ) -> list[str]:
    """``check()`` of OUTPUT's directory on a thread of its own: a directory on a hung disk or
    share holds that thread, not the command (Ctrl-C is heard), and is a refusal on time."""
    from popsicle_py.engine.watched import WorkStalled, watched_calls
    from popsicle_py.failures import hung_check

    try:
        return watched_calls(check, stall_timeout=stall_timeout, name="output-checks",
                             hung_note=hung_check(os.path.dirname(output),
                                                  f"a check that {os.path.basename(output)} can "
                                                  "be written there"))
    except WorkStalled as exc:
        return [f"{os.path.dirname(output)} stopped answering while {os.path.basename(output)} "
                f"was checked: no answer for {exc.limit:g} s (is the disk or share it is on "
                "hung?); popsicle-py exits once it answers"]


