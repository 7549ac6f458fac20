"""Capacity probe: does a drive store what it claims, before an image is written to it?

A counterfeit stick claims, say, 64 GB and holds 8: addresses past its real size R wrap
around (offset ``x`` lands on ``x mod R``) or are silently dropped.  A flash that writes the
image front to back and verifies afterwards can be fooled by the wrap (a late write overwrites
an early one's physical block after it was checked), and an image smaller than R verifies
fine while the drive still lies about everything past R.

The probe, after f3probe's idea but simpler: write small *stamps* (a block naming this run's
nonce and its own offset) at chosen positions, flush the drive's caches, and read them back.
Every written position must read back its own stamp; a stamp of this run found at another
offset proves that two addresses share one physical block, and their distance is a multiple
of R.

Which positions, and what a reading concludes: :mod:`popsicle_py.probe_plan` (pure).

Write order matters on a wrap drive: a later write to an alias overwrites an earlier one's
block.  Positions are written highest first, so the lowest alias of each physical block is
written last and every position below R reads its own stamp; positions at or past R fail.
Detection does not depend on the order (both aliases are read back, one of them is wrong),
the estimate does.

The estimate of the real size: for a wrap, the gcd G of every alias distance is a multiple of
R; R itself is found by dividing G by its prime factors while "write at x, read at x + r"
still shows the fresh stamp (true exactly when R divides r).  For dropped writes, bisection
between the highest good and the lowest failing position.  Each of these test writes is
followed by a decoy write elsewhere: a drive that answers every address past R with its most
recent write (its write buffer) then shows the decoy, not the fresh stamp, past R; the
flush stamps (:func:`~popsicle_py.probe_plan.flush_runs`) follow, past a write cache.  Its
aliases have no period (G is not a multiple of R, which "write at x, read at x + G" shows),
so it is sized by the bisection.

:func:`probe` is the I/O edge: O_DIRECT block-aligned writes, fsync, BLKFLSBUF and
POSIX_FADV_DONTNEED, then O_DIRECT reads.  On a flash's opened drive (:func:`probe_device`)
the stamps go through a second descriptor without O_SYNC, so that each pass costs one cache
flush, not one per stamp.  A drive's probe puts back what its stamps overwrote, except, when
it passes, inside the ranges the flash writes next, and, in its head, where the flash's own
stamp overwrites them first (:func:`checker`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import stat
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import field
from typing import TYPE_CHECKING, Protocol

from popsicle_py import blockdev
from popsicle_py.blockdev import BlockDevice
from popsicle_py.buffers import aligned_buffer
from popsicle_py.errors import Counterfeit
from popsicle_py.events import JsonObject
from popsicle_py.probe_plan import (
    PROTECTED,
    Ranges,
    Reading,
    Verdict,
    flush_runs,
    judge,
    plan_positions,
    plan_reads,
    read_stamp,
    smallest_period,
    stamp,
)
from popsicle_py.records import record
from popsicle_py.units import format_size

if TYPE_CHECKING:
    from popsicle_py.bmap import Bmap

BLKFLSBUF = 0x1261
BLKSSZGET = 0x1268



# ----------------------------------------------------------------------------------------------
# Result


@record
class ProbeResult:
    """How a drive's probe ended.  ``real_estimate`` is None when I/O failed."""

    claimed: int
    real_estimate: int | None
    ok: bool
    elapsed: float
    error: str | None = None
    writes: int = 0
    reads: int = 0
    aliases: tuple[tuple[int, int], ...] = field(default=(), repr=False)
    #: Blocks written back after the probe (:meth:`DeviceIO.restore`), not in ``writes``.
    restored: int = 0

    @property
    def message(self) -> str:
        if self.error is not None:
            return f"probe failed: {self.error}"
        if self.ok:
            return f"genuine: holds all of {format_size(self.claimed)}"
        return (f"counterfeit: claims {format_size(self.claimed)}, holds about "
                f"{format_size(self.real_estimate or 0)}")

    def to_json(self) -> JsonObject:
        return {"claimed": self.claimed, "real_estimate": self.real_estimate, "ok": self.ok,
                "elapsed": round(self.elapsed, 3), "error": self.error,
                "message": self.message, "writes": self.writes, "reads": self.reads}


# ----------------------------------------------------------------------------------------------
# The I/O edge


class BlockIO(Protocol):
    """What the probe needs of a drive: whole-block I/O, and a way past every cache."""

    block: int
    writes: int
    reads: int

    def write(self, offset: int, data: bytes) -> None: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def settle(self) -> None: ...


class _Device:
    """Block-sized O_DIRECT I/O on one descriptor, with cache flushing between passes."""

    def __init__(self, fd: int, block_size: int) -> None:
        self.fd = fd
        self.block = block_size
        self.buf = aligned_buffer(max(block_size, PROTECTED))
        self.is_block_device = stat.S_ISBLK(os.fstat(fd).st_mode)
        self.writes = 0
        self.reads = 0

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(self.buf)[: len(data)]
        view[:] = data
        try:
            if os.pwrite(self.fd, view, offset) != len(data):
                raise OSError(errno.EIO, "short write")
        finally:
            view.release()
        self.writes += 1

    def read(self, offset: int, length: int) -> bytes:
        view = memoryview(self.buf)[:length]
        try:
            n = os.preadv(self.fd, [view], offset)
            data = bytes(view[:n])
        finally:
            view.release()
        self.reads += 1
        return data

    def settle(self) -> None:
        """Make the next reads come from the drive: fsync, BLKFLSBUF, drop the page cache."""
        os.fsync(self.fd)
        if self.is_block_device:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, BLKFLSBUF, 0)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self.buf.close()


class DeviceIO:
    """:class:`BlockIO` over an opened :class:`~popsicle_py.blockdev.BlockDevice`.

    Every call goes through the device, so closing it while a call hangs is as safe as for
    the flash's own writes; ``stopped()`` is checked before each call (a cancel, a stall),
    ``answered()`` is told after each (the stall clock: see
    :data:`~popsicle_py.pacing.SMALL_REQUEST`).
    """

    def __init__(self, device: BlockDevice,
                 stopped: Callable[[], bool] = lambda: False,
                 answered: Callable[[], None] = lambda: None) -> None:
        self.device = device
        self.answered = answered
        self.block = max(512, getattr(device, "block", 512))
        self.buf = memoryview(aligned_buffer(max(self.block, PROTECTED)))
        self.stopped = stopped
        self.writes = 0
        self.reads = 0
        #: What each written block held before its first stamp, in the order first written.
        self.saved: dict[int, bytes] = {}
        #: Blocks written back by :meth:`restore` so far (even by a call that raised).
        self.restored = 0

    def _check(self) -> None:
        if self.stopped():
            raise OSError(errno.ECANCELED, "probe stopped")

    def write(self, offset: int, data: bytes) -> None:
        """Write whole blocks, each first saved as it was before the probe's first write
        to it (one entry a block: a run over earlier stamps keeps their first content)."""
        self._check()
        blocks = range(offset, offset + len(data), self.block)
        if any(at not in self.saved for at in blocks):
            old = self._read(offset, len(data))
            for at in blocks:
                self.saved.setdefault(at, old[at - offset:at - offset + self.block])
        self._write(offset, data)
        self.writes += len(blocks)

    def _write(self, offset: int, data: bytes) -> None:
        view = self.buf[: len(data)]
        view[:] = data
        if isinstance(self.device, BlockDevice):  # aligned blocks from an aligned buffer
            n = self.device.at(offset, view, write=True, synced=False)  # flushed per pass
        else:
            n = blockdev.write_at(self.device, offset, view)
        self.answered()
        if n != len(data):
            raise OSError(errno.EIO, "short write")

    def _read(self, offset: int, length: int) -> bytes:
        view = self.buf[:length]
        if isinstance(self.device, BlockDevice):
            n = self.device.at(offset, view)
        else:
            n = blockdev.read_at(self.device, offset, view)
        self.answered()
        return bytes(view[:n])

    def restore(self, overwritten: Ranges = (), later: Ranges = ()) -> int:
        """Put back what the stamps overwrote, last written first, and flush it once; how
        many blocks were written back.

        So a probe leaves the drive as it was (a genuine one exactly; on a counterfeit one,
        whose blocks alias, as nearly as its aliasing allows), and a flash changes nothing past
        the image.  Blocks wholly inside ``overwritten`` (what the flash writes next) are left
        stamped: putting them back would be a write for nothing.  Those inside ``later`` are
        kept for a second call, which puts them back.

        A block that cannot be written does not stop the others (the first one put back is
        the last stamped: often the very block whose stamp failed): every block is tried, the
        rest flushed, then :class:`NotPutBack` names the first that failed; the blocks inside
        ``overwritten`` are then kept too (a drive that fails is not written next).
        """
        restored = 0
        left: dict[int, bytes] = {}  # not put back by this call, last written first
        spared: set[int] = set()
        failed: list[tuple[int, OSError]] = []
        runs: list[tuple[int, bytes]] = []  # adjacent blocks put back in one write
        for offset, data in reversed(self.saved.items()):
            if len(data) != self.block:
                continue
            if covered(offset, self.block, overwritten):
                left[offset] = data
                spared.add(offset)
            elif covered(offset, self.block, later):
                left[offset] = data
            elif runs and runs[-1][0] == offset + self.block \
                    and len(runs[-1][1]) < len(self.buf):
                runs[-1] = (offset, data + runs[-1][1])
            else:
                runs.append((offset, data))
        for offset, data in runs:
            try:
                self._write(offset, data)
            except OSError as exc:
                if len(data) == self.block:
                    failed.append((offset, exc))
                    continue
                runs.extend((at, data[at - offset:at - offset + self.block])  # one by one
                            for at in range(offset, offset + len(data), self.block))
                continue
            restored += len(data) // self.block
        flush: OSError | None = None
        if restored:
            try:
                blockdev.sync(self.device)
                self.answered()
            except OSError as exc:
                flush = exc
        self.restored += restored
        if not failed and flush is None:
            left = {offset: data for offset, data in left.items() if offset not in spared}
        self.saved = dict(reversed(left.items()))
        if failed or flush is not None:
            raise NotPutBack(failed, flush)
        return restored

    def read(self, offset: int, length: int) -> bytes:
        self._check()
        self.reads += 1
        return self._read(offset, length)

    def settle(self) -> None:
        blockdev.sync(self.device)
        blockdev.drop_cache(self.device)
        self.answered()


class NotPutBack(OSError):
    """Blocks the probe stamped that could not be written back (the first one named), and
    the put-back's flush if it failed."""

    def __init__(self, failed: Sequence[tuple[int, OSError]],
                 flush: OSError | None = None) -> None:
        self.failed = tuple(failed)
        self.flush = flush
        first = failed[0][1] if failed else flush
        assert first is not None
        why = first.strerror or str(first)
        if failed:
            count = len(failed)
            text = (f"{count} block{'s' if count > 1 else ''} the probe wrote not put back: "
                    f"{why} at offset {failed[0][0]}")
        else:
            text = f"the blocks the probe wrote put back but not flushed: {why}"
        super().__init__(first.errno or errno.EIO, text)

    def more(self, other: NotPutBack) -> NotPutBack:
        """This failure, and ``other`` after it."""
        return NotPutBack((*self.failed, *other.failed), self.flush or other.flush)


def covered(offset: int, length: int, ranges: Ranges) -> bool:
    """Whether ``[offset, offset + length)`` lies wholly inside one of ``ranges``."""
    return any(start <= offset and offset + length <= start + size for start, size in ranges)


def probe_device(device: BlockDevice, boundaries: Iterable[int] = (),
                 stopped: Callable[[], bool] = lambda: False,
                 overwritten: Ranges = (),
                 answered: Callable[[], None] = lambda: None,
                 given_up: Callable[[], bool] | None = None) -> ProbeResult:
    """Probe an opened drive for its whole claimed size (``device.size``).

    What the stamps overwrote is put back unless the probe was stopped and the drive given
    up (``given_up``, default ``stopped``: a Ctrl-C leaves a drive that answers its own);
    when the drive passes, not inside ``overwritten`` (the ranges a flash writes next).  A
    drive that fails or errs is put back whole: nothing will be written to it.
    ``answered()`` is told after each request (the caller's stall clock).
    """
    return _probe(device, boundaries, stopped, overwritten, answered=answered,
                  given_up=given_up or stopped)[0]


def _probe(device: BlockDevice, boundaries: Iterable[int], stopped: Callable[[], bool],
           overwritten: Ranges, head: int = 0, answered: Callable[[], None] = lambda: None,
           given_up: Callable[[], bool] = lambda: True) -> tuple[ProbeResult, DeviceIO]:
    """:func:`probe_device`; a drive that passes keeps its stamps in the first ``head`` bytes
    too, saved in the returned :class:`DeviceIO` to be put back later."""
    started = time.monotonic()
    io = DeviceIO(device, stopped, answered)
    positions = plan_positions(device.size, io.block, boundaries)
    reads = plan_reads(device.size, io.block, positions)
    result = run_probe(io, device.size, positions, reads, started=started)
    if not stopped() or not given_up():
        try:
            if result.ok:
                io.restore(overwritten, ((0, head),))
            else:
                io.restore()
        except NotPutBack as exc:
            failure = exc
            if result.ok:  # it fails now, so nothing is written: the rest goes back too
                try:
                    io.restore()
                except NotPutBack as more:
                    failure = exc.more(more)
            result = not_put_back(result, failure)
    done = dataclasses.replace(result, elapsed=time.monotonic() - started,
                               restored=io.restored)
    return done, io


def not_put_back(result: ProbeResult, exc: OSError) -> ProbeResult:
    """``result`` failed (an I/O error) by a put-back that raised ``exc``; what the probe
    found or its own error is said first."""
    why = exc.strerror or str(exc)
    if result.error is not None:
        error = f"{result.error}; {why}"
    elif not result.ok:
        error = f"{result.message}; {why}"
    else:
        error = why
    return dataclasses.replace(result, ok=False, error=error)


def certainly_written(size: int | None, block_map: Bmap | None, *, head: int,
                      skip_identical: bool = False, streamed: bool = False
                      ) -> tuple[tuple[int, int], ...]:
    """The ranges a flash writes whatever the drive holds (none known: a compressed image's
    trim, decided as it streams; --skip-identical, where a stamp would make an identical
    bucket be rewritten).  Never the image's first ``head`` bytes: written last, only once
    the rest read back right, a drive that fails keeps them as they were."""
    if skip_identical or streamed or not size:
        return ()
    extents = ((0, size),) if block_map is None else \
        tuple((e.offset, e.length) for e in block_map.extents)
    return tuple((max(start, head), start + length - max(start, head))
                 for start, length in extents if start + length > head)


def checker(boundaries: Iterable[int], overwritten: Ranges = (), *, head: int = 0
            ) -> Callable[[BlockDevice, Callable[[], None]], Callable[[int], None] | None]:
    """What a flash runs on each drive before writing it: raises Counterfeit if it lies.

    The last boundary is the image's end: when the image fits in what the drive really
    holds, the refusal says so and names ``--no-probe`` (verification still checks it).
    ``overwritten``: the byte ranges the flash certainly writes after a passing probe (none
    known: every stamp is put back).  The stamps in the first ``head`` bytes of a drive that
    passes are put back by what ``check`` returns, called with how many of the drive's first
    bytes the flash has overwritten by then (its head's stamp, written first; 0 if it stopped
    before): when the flash goes on, they need no writes at all.
    """
    spots = tuple(boundaries)
    written = tuple(overwritten)

    def check(device: BlockDevice, answered: Callable[[], None]) -> Callable[[int], None] | None:
        result, io = _probe(device, spots, lambda: False, written, head, answered)
        if result.error is not None:
            raise OSError(errno.EIO, result.message)
        if not result.ok:
            raise Counterfeit(refusal(result, max(spots, default=0)))
        if not io.saved:
            return None

        def put_back(stamped: int) -> None:
            # The stamp was written in whole blocks, so its last, partly stamped block is
            # covered too: putting it back would write over the stamp's tail, which
            # verification then found changed ("repaired 1 bucket" on a sound drive).
            whole = -(-stamped // io.block) * io.block
            io.restore(((0, whole),) if stamped else ())

        return put_back

    return check


def refusal(result: ProbeResult, image_size: int) -> str:
    """Why a flash does not write a counterfeit drive, and, when the image fits in what it
    holds, that ``--no-probe`` writes it anyway."""
    real = result.real_estimate
    if result.ok or not real or not 0 < image_size <= real:
        return result.message
    return (f"{result.message}; the image ({format_size(image_size)}) fits in what it holds:"
            " use --no-probe to write it anyway")


def _logical_block_size(fd: int) -> int:
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        return 512
    buf = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
    return max(512, int(struct.unpack("i", buf)[0]))


def open_for_probe(path: str) -> int:
    """O_RDWR | O_DIRECT | O_EXCL: nobody else writes while stamps are checked."""
    return os.open(path, os.O_RDWR | os.O_DIRECT | os.O_EXCL | os.O_CLOEXEC)


def probe(target: int | str, claimed: int, positions: Sequence[int] | None = None, *,
          block_size: int | None = None, reads: Sequence[int] | None = None,
          boundaries: Iterable[int] = (), nonce: bytes | None = None,
          clock: Callable[[], float] = time.monotonic) -> ProbeResult:
    """Write stamps at ``positions``, read them and ``reads`` back, judge, estimate.

    ``target`` is an open descriptor (O_DIRECT, as the flash opens drives; left open) or a
    device path (opened with :func:`open_for_probe` and closed).  Positions and reads default
    to :func:`plan_positions` / :func:`plan_reads` for ``claimed``.  Data at the stamp
    positions and over the rest of the first MiB is destroyed; the first 64 KiB are never
    written.
    """
    started = clock()
    fd = open_for_probe(target) if isinstance(target, str) else target
    try:
        block = block_size or _logical_block_size(fd)
        if positions is None:
            positions = plan_positions(claimed, block, boundaries)
        if reads is None:
            reads = plan_reads(claimed, block, positions)
        if any(p < PROTECTED or p % block for p in positions):
            raise ValueError("probe positions must be block-aligned and past the first 64 KiB")
        dev = _Device(fd, block)
        try:
            return run_probe(dev, claimed, positions, reads, nonce=nonce, clock=clock,
                             started=started)
        finally:
            dev.close()
    finally:
        if isinstance(target, str):
            os.close(fd)


def run_probe(dev: BlockIO, claimed: int, positions: Sequence[int], reads: Sequence[int], *,
              nonce: bytes | None = None, clock: Callable[[], float] = time.monotonic,
              started: float | None = None) -> ProbeResult:
    """The probe over any :class:`BlockIO` (:func:`probe` gives it a real drive)."""
    block = dev.block
    nonce = nonce or os.urandom(16)
    started = clock() if started is None else started

    def done(ok: bool, real: int | None, error: str | None = None,
             verdict: Verdict | None = None) -> ProbeResult:
        return ProbeResult(claimed, real, ok, clock() - started, error, dev.writes, dev.reads,
                           verdict.aliases if verdict else ())

    at = 0

    def flush(*fresh: int) -> None:
        """:data:`~popsicle_py.probe_plan.FLUSH` bytes of stamps past a write cache (all
        but the stamps written and ``fresh``): what is read next comes from the drive."""
        nonlocal at
        for at, length in flush_runs(claimed, block, {*positions, *fresh}):
            dev.write(at, b"".join(stamp(nonce, at + k, block) for k in range(0, length, block)))

    try:
        for at in sorted(positions, reverse=True):  # highest first: see the module docstring
            dev.write(at, stamp(nonce, at, block))
        flush()
        at = 0
        dev.settle()
        readings: list[Reading] = []
        window = dev.read(0, PROTECTED)
        for off in range(0, len(window) - block + 1, block):
            found = read_stamp(window[off:off + block], nonce)
            readings.append(Reading(off, found[0] if found else None))
        for at in sorted({*positions, *reads}):
            found = read_stamp(dev.read(at, block), nonce)
            readings.append(Reading(at, found[0] if found else None))
        verdict = judge(positions, readings)
        if verdict.ok:
            return done(True, claimed)
        sequence = 0

        def fresh(offset: int, decoy: int, flushed: bool = False) -> bytes:
            """A new stamp at ``offset``, then one at ``decoy``: a drive that answers
            addresses it does not have with its most recent write shows the decoy there.
            ``flushed``: then the flush stamps too, out of a write cache's reach."""
            nonlocal sequence, at
            sequence += 2
            data = stamp(nonce, offset, block, sequence - 1)
            at = offset
            dev.write(offset, data)
            dev.write(decoy, stamp(nonce, decoy, block, sequence))
            if flushed:
                flush(offset, decoy)
            dev.settle()
            return data

        if verdict.aliases:
            # A write at x shows at x + r exactly when R divides r; a stamp written at
            # x carries x's offset, so compare the whole block with what was just written.
            # Tried without the flush stamps, then with them (a write cache): they would
            # overwrite a wrap at most FLUSH long, and never make a stamp show where it is not.
            def check(r: int) -> bool:
                nonlocal at
                if PROTECTED + r > claimed - block:
                    return False
                for flushed in (False, True):
                    data = fresh(PROTECTED, PROTECTED + block, flushed)
                    at = PROTECTED + r
                    if dev.read(at, block) == data:
                        return True
                return False

            # The aliases' gcd is a multiple of R only for a true wrap; a drive that answers
            # every address past R with its latest write shows aliases of no period.  (A gcd
            # too large to test this way comes from a stamp wrapped into the first 64 KiB,
            # which only a wrap does.)
            gcd = verdict.alias_gcd
            if PROTECTED + gcd > claimed - block or check(gcd):
                real = smallest_period(verdict.alias_gcd, block, check)
                return done(False, real, verdict=verdict)
        bad = verdict.failing or tuple(sorted(a for a, _ in verdict.aliases))
        lowest_bad = bad[0]
        good = [p for p in positions if p < lowest_bad and p not in verdict.failing]
        lo, hi = (good[-1] if good else PROTECTED - block), lowest_bad
        while hi - lo > block:
            mid = (lo + hi) // 2
            mid -= mid % block
            if mid <= lo:
                mid = lo + block
            data = fresh(mid, PROTECTED if mid != PROTECTED else PROTECTED + block, True)
            at = mid
            if dev.read(mid, block) == data:
                lo = mid
            else:
                hi = mid
        return done(False, hi, verdict=verdict)
    except OSError as exc:
        return done(False, None, f"{exc.strerror or exc} at offset {at}")
