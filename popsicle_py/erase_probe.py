"""What ``wipefs`` and ``partx`` would find on a drive, asked of libblkid through the drive's
own open descriptor.

The tools open the device node by name, which a user without root cannot do: udisks2 hands
such a user a descriptor (``Block.OpenDevice``, polkit deciding), and that descriptor is all
erase has.  libblkid, which both tools are made of, probes any descriptor
(``blkid_probe_set_device``), so the same library finds the same signatures and the same
partitions for root and for everyone else, at a window of the drive if asked (as
``blkid -p -O -S`` does inside an old partition).

libblkid reads into buffers of its own, which O_DIRECT refuses: the descriptor's O_DIRECT is
turned off for the probe and back on after (the flag belongs to the open file, so a ``dup``
would not help).  Blocks we wrote with O_DIRECT are not in the page cache, so a buffered
read sees them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator
from functools import cache

# blkid.h
_SUBLKS_LABEL = 1 << 1
_SUBLKS_UUID = 1 << 3
_SUBLKS_TYPE = 1 << 5
_SUBLKS_USAGE = 1 << 7
_SUBLKS_MAGIC = 1 << 9
_SUBLKS_BADCSUM = 1 << 10
_PARTS_FORCE_GPT = 1 << 1
_PARTS_MAGIC = 1 << 3
#: What wipefs asks for (misc-utils/wipefs.c, new_probe()).
_WIPEFS_SUBLKS = (_SUBLKS_MAGIC | _SUBLKS_TYPE | _SUBLKS_USAGE | _SUBLKS_LABEL | _SUBLKS_UUID
                  | _SUBLKS_BADCSUM)
_WIPEFS_PARTS = _PARTS_MAGIC | _PARTS_FORCE_GPT

_P = ctypes.c_void_p


@cache
def _lib() -> ctypes.CDLL:
    try:  # its soname, stable since util-linux 2.15 (find_library would run ldconfig)
        lib = ctypes.CDLL("libblkid.so.1", use_errno=True)
    except OSError:
        raise OSError(errno.ENOENT, "libblkid is not installed (util-linux)") from None
    for function, restype, argtypes in (
            ("blkid_new_probe", _P, []),
            ("blkid_free_probe", None, [_P]),
            ("blkid_probe_set_device", ctypes.c_int, [_P, ctypes.c_int, ctypes.c_int64,
                                                      ctypes.c_int64]),
            ("blkid_probe_enable_superblocks", ctypes.c_int, [_P, ctypes.c_int]),
            ("blkid_probe_set_superblocks_flags", ctypes.c_int, [_P, ctypes.c_int]),
            ("blkid_probe_enable_partitions", ctypes.c_int, [_P, ctypes.c_int]),
            ("blkid_probe_set_partitions_flags", ctypes.c_int, [_P, ctypes.c_int]),
            ("blkid_do_probe", ctypes.c_int, [_P]),
            ("blkid_do_wipe", ctypes.c_int, [_P, ctypes.c_int]),
            ("blkid_probe_lookup_value", ctypes.c_int, [_P, ctypes.c_char_p,
                                                        ctypes.POINTER(ctypes.c_char_p),
                                                        ctypes.POINTER(ctypes.c_size_t)]),
            ("blkid_probe_get_partitions", _P, [_P]),
            ("blkid_partlist_numof_partitions", ctypes.c_int, [_P]),
            ("blkid_partlist_get_partition", _P, [_P, ctypes.c_int]),
            ("blkid_partition_get_start", ctypes.c_int64, [_P]),
            ("blkid_partition_get_size", ctypes.c_int64, [_P])):
        getattr(lib, function).restype = restype
        getattr(lib, function).argtypes = argtypes
    return lib


@contextlib.contextmanager
def _buffered(fd: int) -> Iterator[None]:
    """The descriptor without O_DIRECT while libblkid reads it; its flags restored after."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_DIRECT:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
    try:
        yield
    finally:
        if flags & os.O_DIRECT:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)


@contextlib.contextmanager
def _probe(fd: int, offset: int, size: int, what: str) -> Iterator[int]:
    lib = _lib()
    probe = lib.blkid_new_probe()
    if not probe:
        raise OSError(errno.ENOMEM, f"{what}: libblkid could not start a probe")
    try:
        with _buffered(fd):
            if lib.blkid_probe_set_device(probe, fd, offset, size) != 0:
                code = ctypes.get_errno() or errno.EIO
                raise OSError(code, f"{what}: libblkid cannot read it: {os.strerror(code)}")
            yield probe
    finally:
        lib.blkid_free_probe(probe)


def _value(probe: int, name: bytes) -> str | None:
    data = ctypes.c_char_p()
    length = ctypes.c_size_t()
    if _lib().blkid_probe_lookup_value(probe, name, ctypes.byref(data), ctypes.byref(length)):
        return None
    raw = data.value or b""
    return raw.decode(errors="replace")


def signatures(fd: int, what: str, offset: int = 0, size: int = 0) -> list[tuple[int, str]]:
    """(offset on the drive, type) of every signature ``wipefs --no-act`` would list, in the
    window at ``offset`` of ``size`` bytes (0: to the end)."""
    lib = _lib()
    found: list[tuple[int, str]] = []
    with _probe(fd, offset, size, what) as probe:
        lib.blkid_probe_enable_superblocks(probe, 1)
        lib.blkid_probe_set_superblocks_flags(probe, _WIPEFS_SUBLKS)
        lib.blkid_probe_enable_partitions(probe, 1)
        lib.blkid_probe_set_partitions_flags(probe, _WIPEFS_PARTS)
        while (result := lib.blkid_do_probe(probe)) == 0:
            kind = _value(probe, b"TYPE") or _value(probe, b"PTTYPE") or "?"
            at = _value(probe, b"SBMAGIC_OFFSET") or _value(probe, b"PTMAGIC_OFFSET")
            if at is not None:
                found.append((offset + int(at), kind))
            # As wipefs --no-act: the magic hidden in libblkid's memory only (dry run, nothing
            # written), so the next probe finds the same file system's other copies.
            if lib.blkid_do_wipe(probe, 1) != 0:
                break
        if result < 0:
            raise OSError(errno.EIO, f"{what}: libblkid could not read its signatures")
    return found


def partitions(fd: int, what: str) -> list[tuple[int, int]]:
    """(start, length) in bytes of the partitions the drive's table lists (as ``partx``
    reads them: nested tables included, no partition devices needed); [] without a table."""
    lib = _lib()
    with _probe(fd, 0, 0, what) as probe:
        lib.blkid_probe_enable_partitions(probe, 1)
        lib.blkid_probe_set_partitions_flags(probe, _PARTS_FORCE_GPT)
        table = lib.blkid_probe_get_partitions(probe)
        if not table:
            return []
        found = []
        for index in range(max(0, lib.blkid_partlist_numof_partitions(table))):
            part = lib.blkid_partlist_get_partition(table, index)
            if part:  # libblkid counts in 512-byte sectors, whatever the drive's block
                found.append((lib.blkid_partition_get_start(part) * 512,
                              lib.blkid_partition_get_size(part) * 512))
    return found
