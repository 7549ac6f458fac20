"""Writing certificates where a symlink planted in the directory cannot redirect them.

Each file is written to a fresh temporary name opened with ``O_CREAT|O_EXCL|O_NOFOLLOW``
relative to the directory's descriptor, synced, then linked to its final name (a link never
follows nor replaces what is there: a name taken, or whose signature's name is, gets ``-2``,
``-3`` ...) and the temporary name removed; the directory is synced last.  A crash leaves
at most a ``.tmp`` file behind, never a half-written certificate under a certificate's name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets

from popsicle_py.errors import Refused

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Bytes written (and removed) at the start: room for a few certificates and signatures.
PROBE = 64 << 10
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def safe_part(text: str, limit: int = 48) -> str:
    """``text`` as a piece of a file name: letters, digits, ``.``, ``_`` and ``-`` only."""
    return _UNSAFE.sub("_", text).strip("._")[:limit]


def certificate_name(stamp: str, seq: int | None, serial: str, port: str | None) -> str:
    """``20261206T130501Z-3-4C5300012311.json``: when, the run's number, which stick."""
    parts = [stamp, str(seq) if seq is not None else "", safe_part(serial) or safe_part(port or "")]
    return "-".join(p for p in parts if p) + ".json"


def open_directory(path: str) -> int:
    """The certificate directory, made if missing; Refused (exit 2) when it cannot be used."""
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileExistsError:  # makedirs, on a name that is a file, a pipe, a device ...
        raise Refused([f"--certificate {path}: not a directory"]) from None
    except OSError as exc:
        raise Refused([f"--certificate {path}: {exc.strerror or exc}"]) from None
    if not os.access(f"/proc/self/fd/{fd}", os.W_OK):
        os.close(fd)
        raise Refused([f"--certificate {path}: the directory is not writable"])
    try:  # a full file system (or a quota) is found now, not after the drives are written
        os.unlink(_temporary(fd, "probe", bytes(PROBE)), dir_fd=fd)
    except OSError as exc:
        os.close(fd)
        raise Refused([f"--certificate {path}: cannot write a certificate there: "
                       f"{exc.strerror or exc}"]) from None
    return fd


def _temporary(directory: int, name: str, data: bytes) -> str:
    """``data`` synced under a fresh hidden name in the directory: that name."""
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, _FLAGS, 0o644, dir_fd=directory)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=directory)
        raise
    finally:
        os.close(fd)
    return tmp


def write_new(directory: int, name: str, data: bytes,
              sidecar: tuple[str, bytes] | None = None) -> str:
    """Write ``data`` under ``name`` (or ``name`` with ``-2`` ...) in the directory; the name
    used.  ``sidecar`` (suffix, bytes), a signature, goes under that very name plus its
    suffix: a name whose sidecar's name is taken is not used (the old sidecar would pass for
    this file's).  Raises OSError; a temporary file never stays."""
    made: list[str] = []
    try:  # the temporary files go whatever fails, a write to a full disk included
        made.append(_temporary(directory, name, data))
        if sidecar is not None:
            made.append(_temporary(directory, name + sidecar[0], sidecar[1]))
        stem, dot, ext = name.rpartition(".")
        for attempt in range(1, 1000):
            final = name if attempt == 1 else f"{stem}-{attempt}{dot}{ext}"
            try:
                os.link(made[0], final, src_dir_fd=directory, dst_dir_fd=directory,
                        follow_symlinks=False)
            except FileExistsError:
                continue
            if sidecar is not None:
                try:
                    os.link(made[1], final + sidecar[0], src_dir_fd=directory,
                            dst_dir_fd=directory, follow_symlinks=False)
                except FileExistsError:
                    os.unlink(final, dir_fd=directory)
                    continue
            os.fsync(directory)
            return final
        raise OSError(errno.EEXIST, f"{name}: every variant of the name is taken")
    finally:
        for tmp in made:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=directory)
