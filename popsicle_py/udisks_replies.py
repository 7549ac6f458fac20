"""What udisks2's answers mean (pure): which block object is the drive, and an error reply
in the user's words, one line naming the drive (see :mod:`popsicle_py.udisks`)."""

from __future__ import annotations

import errno
import os
from typing import Any

from popsicle_py.records import record

BLOCK = "org.freedesktop.UDisks2.Block"
FILESYSTEM = "org.freedesktop.UDisks2.Filesystem"
ERROR = "org.freedesktop.UDisks2.Error."

#: D-Bus values as jeepney gives them: (signature, value), the value of any D-Bus type; an
#: interface's properties; GetManagedObjects' answer.
Variant = tuple[str, Any]
Props = dict[str, Variant]
Objects = dict[str, dict[str, Props]]


class UdisksError(OSError):
    """udisks refused or failed; ``line`` is what the user reads (one line, the drive named)."""

    def __init__(self, code: int, line: str, name: str = "") -> None:
        super().__init__(code, line)
        self.line = line
        self.name = name

    def __str__(self) -> str:
        return self.line


@record
class BlockObject:
    """What udisks says of one block device; only ``devnum`` is used to choose it."""

    object_path: str
    device: str
    devnum: int
    drive: str
    hint_system: bool
    mount_points: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Pure decisions


def block_for_devnum(objects: Objects, devnum: int
                     ) -> BlockObject | None:
    """The block object of ``GetManagedObjects``' answer whose device number is ``devnum``."""
    for path, interfaces in objects.items():
        block = interfaces.get(BLOCK)
        if block is None or _value(block, "DeviceNumber") != devnum:
            continue
        fs = interfaces.get(FILESYSTEM)
        mounts = tuple(_bytes_path(m) for m in _value(fs, "MountPoints") or ()) if fs else ()
        return BlockObject(path, _bytes_path(_value(block, "Device") or b""), devnum,
                           str(_value(block, "Drive") or "/"),
                           bool(_value(block, "HintSystem")), mounts)
    return None


def _value(props: Props | None, name: str) -> Any:
    if not props or name not in props:
        return None
    return props[name][1]


def _bytes_path(value: Any) -> str:
    """udisks sends paths as NUL-terminated byte arrays."""
    data = bytes(value) if not isinstance(value, str) else value.encode()
    return data.rstrip(b"\0").decode(errors="surrogateescape")


_STRERROR = {os.strerror(code): code for code in sorted(errno.errorcode, reverse=True)}


def errno_of(message: str) -> int | None:
    """The errno behind udisks' "Error opening device /dev/sdb: Device or resource busy"."""
    for text, code in _STRERROR.items():
        if message.endswith(text):
            return code
    return None


def describe_refusal(name: str, message: str, what: str, path: str) -> OSError:
    """The error for a udisks error reply: polkit's refusals as one line (:class:`UdisksError`),
    the kernel's refusals as a plain OSError with their errno, which
    :func:`popsicle_py.failures.describe_error` words as for root (busy, read-only...).

    ``what`` is the verb ("open", "unmount", "power off").
    """
    short = name.removeprefix(ERROR)
    if short == "NotAuthorizedDismissed":
        return UdisksError(errno.EACCES, f"not authorized to {what} {path} "
                           "(authentication dismissed)", name)
    if short == "NotAuthorizedCanObtain":
        return UdisksError(errno.EACCES, f"not authorized to {what} {path} (polkit refused: "
                           "a password is needed and no authentication agent could ask)", name)
    if short.startswith("NotAuthorized") or name.endswith(".AccessDenied"):
        return UdisksError(errno.EACCES, f"not authorized to {what} {path} (polkit refused)",
                           name)
    code = errno_of(message)
    if code is not None:
        return OSError(code, os.strerror(code))
    if short == "DeviceBusy":
        return UdisksError(errno.EBUSY, f"{path}: busy: {message}", name)
    return UdisksError(errno.EIO, f"could not {what} {path} through udisks2: {message}", name)
