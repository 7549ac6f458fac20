"""Where a capacity probe writes its stamps and reads them back, and what it concludes (pure).

Which positions (:func:`plan_positions`, :func:`plan_reads`), pure functions:

- A wrap at R shows only if some written position ``p`` and some read position ``x`` differ by
  a multiple of R.  So stamps are written at "baby steps" ``64 KiB + i * unit`` (i < a) and
  read back at "giant steps" ``64 KiB + j * a * unit`` across the whole claim, plus the last
  ``a`` units: their differences are every multiple of ``unit`` up to the claimed size.  A
  wrap at any multiple of ``unit`` (64 KiB for claims up to 4 GiB, 1 MiB up to 64 GiB, then
  ``claim / 65536``) therefore shows, with about ``sqrt(claim / unit) / 2`` writes and four
  times as many reads; any R that has a multiple of ``unit`` below the claim shows too.
- The last block and every bucket boundary the image will use are stamped as well; the first
  64 KiB (partition table, boot code) are read, never written: a stamp found there is the
  last block wrapped onto them.
- A drive that drops writes past R fails at the last block whatever R is.
- A counterfeit's controller may keep its latest writes in a cache it answers reads from,
  past every flush the host asks for: a stamp still in it reads back right however the drive
  lost it (wrapped onto another block, or dropped), and a stamp not yet out of it is not where
  its alias is read.  So :data:`FLUSH` bytes of stamps are written last, before anything is
  read back (:func:`flush_runs`): they push every other stamp out of a cache of up to that
  size (a drive that caches more can pass for genuine).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence

from popsicle_py.records import record

#: Never written by the probe: MBR, GPT header and entries, ISO 9660 volume descriptors.
PROTECTED = 64 << 10
MIN_UNIT = 64 << 10
#: At most this many units in a claim: bounds the number of writes and reads.
MAX_UNITS = 1 << 16
#: Stamps over the drive's first MiB past :data:`PROTECTED` are written after the others and
#: before any read: a write cache up to 896 KiB (960 KiB but for the stamps among them) is
#: emptied of the others (see the module docstring).  A flash overwrites them with its head's stamp.
FLUSH = (1 << 20) - PROTECTED
MAGIC = b"POPSICLE-PROBE\0\0"
_HEADER = struct.Struct("<16s16sQI")  # magic, nonce, offset, sequence
#: Byte ranges of a drive as (offset, length) pairs.
Ranges = Sequence[tuple[int, int]]


# ----------------------------------------------------------------------------------------------
# Planning (pure)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@record
class Grid:
    """The baby-step / giant-step layout for one claimed size."""

    unit: int
    babies: int  # ``a``: stamps written at PROTECTED + i * unit, i < a
    last: int  # the last whole block's offset


def grid(claimed_size: int, block_size: int) -> Grid:
    """The layout: ``unit`` (the size granularity every wrap is detected at) and ``a``."""
    unit = max(MIN_UNIT, _pow2_ceil(-(-claimed_size // MAX_UNITS)), block_size)
    units = max(1, claimed_size // unit)
    babies = max(8, 1 << max(0, (units.bit_length() - 1) // 2 - 1))
    last = (claimed_size // block_size - 1) * block_size
    return Grid(unit, babies, last)


def plan_positions(claimed_size: int, block_size: int, boundaries: Iterable[int] = ()
                   ) -> list[int]:
    """Where stamps are written: baby steps, bucket boundaries, the last block (ascending).

    Every position is block-aligned and at or past :data:`PROTECTED`; a boundary inside
    the protected start is represented by the first baby step.
    """
    g = grid(claimed_size, block_size)
    if g.last < PROTECTED:
        return []
    found = {PROTECTED + i * g.unit for i in range(g.babies)}
    for b in boundaries:
        b -= b % block_size
        if PROTECTED <= b <= g.last:
            found.add(b)
    found.add(g.last)
    return sorted(p for p in found if p <= g.last)


def plan_reads(claimed_size: int, block_size: int, positions: Iterable[int] = ()) -> list[int]:
    """Where the probe only reads: giant steps and the last ``a`` units (ascending).

    A stamp of this run found at one of them is an alias of the position that wrote it.
    """
    g = grid(claimed_size, block_size)
    if g.last < PROTECTED:
        return []
    top = (g.last - PROTECTED) // g.unit
    found = {PROTECTED + j * g.babies * g.unit for j in range(1, top // g.babies + 1)}
    found.update(PROTECTED + m * g.unit for m in range(max(0, top - g.babies), top + 1))
    written = set(positions)
    return sorted(p for p in found if p <= g.last and p not in written)


def flush_runs(claimed_size: int, block_size: int, skip: Iterable[int] = ()
               ) -> list[tuple[int, int]]:
    """Where the :data:`FLUSH` stamps go, as (offset, length) runs of at most 64 KiB: the
    blocks of ``[PROTECTED, PROTECTED + FLUSH)`` on the drive, but for ``skip`` (the stamps
    they must not overwrite)."""
    skipped = set(skip)
    end = min(PROTECTED + FLUSH, grid(claimed_size, block_size).last + block_size)
    runs: list[tuple[int, int]] = []
    start = PROTECTED
    for at in range(PROTECTED, end + block_size, block_size):
        if at >= end or at in skipped or at - start >= MIN_UNIT:
            if at > start:
                runs.append((start, at - start))
            start = at + block_size if at in skipped else at
    return runs


# ----------------------------------------------------------------------------------------------
# Stamps and verdicts (pure)


def stamp(nonce: bytes, offset: int, block_size: int, sequence: int = 0) -> bytes:
    """One block naming this run and its own offset, every byte of it (a torn write shows)."""
    header = _HEADER.pack(MAGIC, nonce, offset, sequence)
    return (header * (block_size // len(header) + 1))[:block_size]


def read_stamp(data: bytes, nonce: bytes) -> tuple[int, int] | None:
    """(offset, sequence) of a whole, intact stamp of this run, or None."""
    if len(data) < _HEADER.size:
        return None
    magic, found, offset, sequence = _HEADER.unpack_from(data)
    if magic != MAGIC or found != nonce:
        return None
    if data != stamp(nonce, offset, len(data), sequence):
        return None
    return offset, sequence


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` with multiplicity, smallest first (trial division: n < 2**40)."""
    out: list[int] = []
    p = 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1 if p == 2 else 2
    if n > 1:
        out.append(n)
    return out


def smallest_period(multiple: int, block_size: int, wraps_at: Callable[[int], bool]) -> int:
    """R from a multiple of it: divide out prime factors while ``wraps_at(r)`` holds.

    ``wraps_at(r)`` must be true exactly when R divides r.  At most one test per prime factor
    of ``multiple / block_size``.
    """
    r = multiple
    for p in sorted(set(prime_factors(multiple // block_size))):
        while (r // block_size) % p == 0 and wraps_at(r // p):
            r //= p
    return r


@record
class Reading:
    """What one read position showed: its own stamp, another's (an alias), or neither."""

    offset: int
    found: int | None  # the offset named by a stamp of this run, or None


@record
class Verdict:
    """The first pass judged: which written positions failed and which aliases were seen."""

    failing: tuple[int, ...]
    aliases: tuple[tuple[int, int], ...]  # (where read, whose stamp)

    @property
    def ok(self) -> bool:
        return not self.failing and not self.aliases

    @property
    def alias_gcd(self) -> int:
        return math.gcd(*(abs(a - b) for a, b in self.aliases)) if self.aliases else 0


def judge(written: Iterable[int], readings: Iterable[Reading]) -> Verdict:
    """A written position is good only if it reads its own stamp; a foreign stamp anywhere
    is an alias."""
    wrote = set(written)
    failing: list[int] = []
    aliases: list[tuple[int, int]] = []
    for r in readings:
        if r.found is not None and r.found != r.offset:
            aliases.append((r.offset, r.found))
        if r.offset in wrote and r.found != r.offset:
            failing.append(r.offset)
    return Verdict(tuple(sorted(failing)), tuple(aliases))
