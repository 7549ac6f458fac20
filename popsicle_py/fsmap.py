"""Which blocks of a drive its file systems leave free, so a block map can leave them out.

Free blocks often hold old data (deleted files), which a map of "blocks that are not zero"
would copy for nothing.  Only a file system whose own tool vouches for its free blocks is used:
ext2/3/4 through ``dumpe2fs`` (e2fsprogs reads the partition in place with ``DEV?offset=N``),
and only when it is clean (no journal to replay: its bitmaps could be behind).  Anything else
(FAT, a dirty ext4, no table at all) keeps every block that is not zero: a block wrongly left
out would be a copy that is not one.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence

EXT_TYPES = ("ext2", "ext3", "ext4")


def parse_dumpe2fs(text: str) -> tuple[int, list[tuple[int, int]]] | None:
    """(block size, free (first, last) block ranges) from ``dumpe2fs``'s output, or None when
    the file system is not clean or the output is not understood."""
    size = re.search(r"^Block size:\s+(\d+)$", text, re.M)
    state = re.search(r"^Filesystem state:\s+(.*)$", text, re.M)
    features = re.search(r"^Filesystem features:\s+(.*)$", text, re.M)
    if size is None or state is None or state.group(1).strip() != "clean":
        return None
    if features is None or "needs_recovery" in features.group(1).split():
        return None
    free: list[tuple[int, int]] = []
    for match in re.finditer(r"^\s+Free blocks: (.*)$", text, re.M):
        for part in match.group(1).split(","):
            part = part.strip()
            if not part:
                continue
            first, _, last = part.partition("-")
            if not first.isdigit() or (last and not last.isdigit()):
                return None
            free.append((int(first), int(last or first)))
    return int(size.group(1)), free


def parse_partx(text: str) -> list[tuple[int, int]]:
    """(start, length) in bytes of each partition partx lists (512-byte sectors)."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            found.append((int(fields[0]) * 512, int(fields[1]) * 512))
    return found


def free_mask(free: Sequence[tuple[int, int]], size: int, block: int) -> bytearray:
    """One byte per map block of the drive: 1 where the whole block lies in a free range."""
    mask = bytearray(-(-size // block))
    for offset, length in free:
        first = -(-offset // block)
        last = (offset + length) // block  # exclusive
        if last > first:
            mask[first:last] = b"\x01" * (last - first)
    return mask


def _run(args: Sequence[str]) -> str | None:
    try:
        result = subprocess.run(list(args), capture_output=True, text=True, check=False,
                                env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        return None
    return result.stdout if result.returncode == 0 else None


def _fs_type(path: str, start: int, length: int) -> str | None:
    out = _run(["blkid", "-p", "-O", str(start), "-S", str(length), "-o", "export", path])
    for line in (out or "").splitlines():
        if line.startswith("TYPE="):
            return line[5:]
    return None


def free_ranges(path: str, size: int) -> tuple[list[tuple[int, int]], list[str]]:
    """Free byte ranges of the drive's clean ext2/3/4 file systems, and what was used (for a
    note: ``ext4 at byte 1048576``).  Read with the tools, before the drive itself is read."""
    parts = parse_partx(_run(["partx", "--raw", "--noheadings", "-o", "START,SECTORS", path])
                        or "") or [(0, size)]
    ranges: list[tuple[int, int]] = []
    used: list[str] = []
    for start, length in parts:
        kind = _fs_type(path, start, length)
        if kind not in EXT_TYPES:
            continue
        parsed = parse_dumpe2fs(_run(["dumpe2fs", f"{path}?offset={start}"]) or "")
        if parsed is None:
            continue
        block, free = parsed
        ranges += [(start + a * block, min((b - a + 1) * block, length - a * block))
                   for a, b in free if a * block < length]
        used.append(f"{kind} at byte {start}")
    return ranges, used
