"""Page-aligned buffers, so that every bucket can go straight to an O_DIRECT file descriptor."""

from __future__ import annotations

import ctypes
import mmap

PAGE = mmap.PAGESIZE


def aligned_buffer(size: int) -> mmap.mmap:
    """An anonymous mapping: page-aligned, zero-filled, and returned to the OS when closed."""
    return mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def address_of(buffer: object) -> int:
    """The address of a writable buffer's first byte (to check its alignment)."""
    view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
    if len(view) == 0 or view.readonly:
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def is_aligned(buffer: object, alignment: int = PAGE) -> bool:
    """True when the buffer starts on an ``alignment`` boundary and is writable."""
    try:
        address = address_of(buffer)
    except (TypeError, ValueError):
        return False
    return address != 0 and address % alignment == 0
