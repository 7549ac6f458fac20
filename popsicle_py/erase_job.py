"""Erasing many drives at once: one thread per drive under the engine's supervisor, events on
the calling thread, every drive ending exactly once (as :class:`popsicle_py.flash.FlashJob`).

The steps and the bytes are :mod:`popsicle_py.erase`'s; this module holds their order per
drive and turns each drive's news into events.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Sequence

from popsicle_py import blockdev, erase, probe
from popsicle_py.blockdev import BlockDevice
from popsicle_py.buffers import aligned_buffer
from popsicle_py.engine import Cancelled
from popsicle_py.engine.supervisor import CancelCheck, Lane, Supervisor
from popsicle_py.errors import Counterfeit
from popsicle_py.events import Cause, DriveInfo, Note, Phase, Progress, Status, Step, Summary
from popsicle_py.flash import Emit, _Job
from popsicle_py.messages import BusWriterMessage
from popsicle_py.records import record

#: Zeros written to free space before the last read-back: past a drive's write cache.
PAST_CACHE = 16 << 20
#: How far a drive's erase got (:attr:`EraseJob._reached`), and a cancelled drive's result
#: for each: what the drive holds now, and what to do.
BEFORE, PROBING, WIPING, TABLE = range(4)
CANCELLED = (
    "cancelled before wiping began: the drive still holds what it held",
    "cancelled while its capacity was probed: the blocks the probe wrote were put back, "
    "unless the drive had stopped answering",
    "cancelled while wiping: the drive is partly wiped (its old partition table may be gone); "
    "erase it again",
    "cancelled while its new partition table was written: erase it again to be sure of it",
)


@record
class EraseOptions:
    """What to do to each drive (see :mod:`popsicle_py.erase`)."""

    fs: str | None = None  # None: FAT32 up to 32 GiB, exFAT above
    label: str | None = None
    zero: bool = False
    discard: bool = False
    stall_timeout: float | None = 60.0
    #: Where the file system is made before it is copied (None: $TMPDIR).
    workdir: str | None = None


@record
class _Step:
    id: int
    step: Step


@record
class _Moved:
    id: int
    step: Step
    done: int
    total: int


@record
class _Said:
    id: int
    text: str


@record
class _Finished:
    id: int
    written: int
    invalid: str | None = None
    offset: int | None = None


#: The file systems made (descriptor, extents), or why one was not, by (fs, partition).
_Made = dict[tuple[str, erase.Layout], tuple[int, list[tuple[int, int]]] | erase.ToolFailed]


def _close(made: _Made) -> None:
    for one in made.values():
        if not isinstance(one, erase.ToolFailed):
            os.close(one[0])


_Message = _Step | _Moved | _Said | _Finished | BusWriterMessage.Errored


class EraseJob(_Job):
    """Erase every opened drive in parallel; each is verified as it goes."""

    def __init__(self, devices: Sequence[BlockDevice], options: EraseOptions, emit: Emit,
                 cancel: CancelCheck, infos: Sequence[DriveInfo] = ()) -> None:
        super().__init__(devices, emit, cancel, infos)
        self.options = options
        self.verifies = True
        self._made: _Made = {}  # each file system made, or why not, by (fs, partition)
        #: How far each drive's erase got (an index of :data:`CANCELLED`), set by its lane
        #: just before the step's first write: a cancel says what the drive holds now.
        self._reached = [BEFORE] * len(self.drives)

    def run(self) -> Summary:
        supervisor = Supervisor([d.device for d in self.drives], self._on_message, self.cancel,
                                stall_timeout=self.options.stall_timeout,
                                errored=BusWriterMessage.Errored, name="erase")
        for drive in self.drives:
            self.emit(Phase(drive.path, Step.PROBING))
        try:
            if self._make_filesystems():
                supervisor.run(self._erase)
            else:
                self._cancel_rest()
        except Cancelled:
            self._cancel_rest()
        finally:
            _close(self._made)
            self._close_all()
            for drive in self.drives:
                if drive.status is Status.OK:
                    blockdev.reread_partitions(drive.path)
        for drive in self._live():
            self._end(drive, Status.FAILED, f"{drive.path}: did not finish", cause=Cause.ERROR)
        return self._summary()

    def _file_system(self, device: BlockDevice) -> tuple[str, erase.Layout] | None:
        """The file system and partition ``device`` gets (None: only wiped), in its own
        logical sectors."""
        fs = self.options.fs or erase.default_fs(device.size, device.block)
        return None if fs == "none" else (fs, erase.layout(device.size, fs, device.block))

    def _make_filesystems(self) -> bool:
        """Each file system the drives need, made before any drive is touched, on a watched
        worker (False: cancelled meanwhile).

        Made in $TMPDIR, not on a drive: on a drive's own lane, a $TMPDIR on a hung disk read
        as that healthy drive's stall, and held the run until the disk came back.  Here its
        own stall names $TMPDIR, on time, and Ctrl-C is heard at once."""
        options = self.options
        wanted = sorted({w for d in self.drives if (w := self._file_system(d.device))},
                        key=lambda w: (w[0], w[1].sector, w[1].length))

        def work(making: erase.Making, stopped: Callable[[], bool]) -> _Made | None:
            made: _Made = {}
            try:
                for fs, part in wanted:
                    try:
                        made[fs, part] = erase.make_filesystem(
                            fs, part, options.label, options.workdir, making, stopped)
                    except erase.ToolFailed as exc:
                        made[fs, part] = exc
                    if stopped():
                        raise erase.ToolCancelled(fs)
            except erase.ToolCancelled:  # nobody takes them: closed here
                _close(made)
                return None
            return made

        try:
            result = erase.watched_making(work, options.workdir, cancel=self.cancel,
                                          stall_timeout=options.stall_timeout)
        except erase.MakingStalled as exc:
            self.emit(Note(f"{exc.where}: a call there has not returned; popsicle-py exits "
                           "once it does (when the disk it is on answers again)"))
            self._made = {(fs, part): exc for fs, part in wanted}
            return True
        if result is None:
            return False
        self._made = result
        return True

    def _cancel_rest(self) -> None:
        """Every drive not ended is cancelled, saying what it holds now."""
        self.cancelled = True
        for drive, reached in zip(self.drives, self._reached, strict=True):
            self._end(drive, Status.CANCELLED, CANCELLED[reached], cause=Cause.CANCELLED)

    def _on_message(self, msg: _Message) -> None:
        drive = self.drives[msg.id]
        match msg:
            case _Step(step=step):
                self.emit(Phase(drive.path, step))
            case _Moved(step=step, done=done, total=total):
                if step is Step.WRITING:
                    drive.written = done
                self.emit(Progress(drive.path, step, done, total))
            case _Said(text=text):
                self.emit(Note(f"{drive.path}: {text}"))
            case _Finished(written=written, invalid=None):
                drive.written = written
                self._end(drive, Status.OK)
            case _Finished(invalid=str(text), offset=offset):
                self._end(drive, Status.INVALID, text, offset, cause=Cause.MISMATCH)
            case BusWriterMessage.Errored(why=why):
                self._fail(drive, why)

    # One drive, on its own thread

    def _erase(self, lane: Lane) -> None:
        lane.waiting = False
        lane.touch()
        try:
            written = self._steps(lane)
        except erase.NotErased as exc:
            lane.post(_Finished(lane.id, 0, exc.strerror, exc.offset))
            return
        if not lane.stopped:
            lane.post(_Finished(lane.id, written))

    def _steps(self, lane: Lane) -> int:
        device = lane.dest
        size = device.size

        def stopped() -> bool:
            return lane.stopped

        def moved(step: Step, total: int) -> Callable[[int], None]:
            count = [0]

            def progress(n: int) -> None:
                count[0] += n
                lane.advance(n)
                lane.post(_Moved(lane.id, step, count[0], total))
            return progress

        def step(s: Step) -> None:
            lane.touch()
            lane.post(_Step(lane.id, s))

        wanted = self._file_system(device)
        if wanted is None:
            written = self._wipe(lane, stopped, moved, step)
            edges = erase.wipe_ranges(size, ())
            if not lane.stopped and len(edges) == 2:
                zeros = erase.zeros_source()
                written += self._past_cache(lane, stopped, edges[0][1], edges[1][0], edges,
                                            zeros)
            return written
        fs, part = wanted
        # The file system was made first, in a file (see _make_filesystems): a mkfs that
        # failed has written nothing to the drive.
        made = self._made[fs, part]
        if isinstance(made, erase.ToolFailed):
            raise made
        fd, extents = made
        written = self._wipe(lane, stopped, moved, step)
        if lane.stopped:
            return written
        where = erase.copied_span(part.start, extents)
        source = erase.file_source(fd, part.start)
        erase.fill(device, where, source, pacer=lane.pacer, stopped=stopped,
                   progress=lambda n: lane.advance(n))
        erase.check(device, where, source, "the new file system", pacer=lane.pacer,
                    stopped=stopped, progress=lambda n: lane.advance(n))
        written += sum(n for _, n in where)

        def final(offset: int, n: int) -> memoryview:
            """The drive's bytes as this erase leaves them before its table: zeros, then
            the file system."""
            got = memoryview(bytearray(n))
            if offset + n > part.start:
                at = max(offset, part.start)
                got[at - offset:] = source(at, offset + n - at)
            return got
        tail = erase.wipe_ranges(size, ())[-1]
        end = max((o + n for o, n in where), default=part.start)
        if not lane.stopped:  # before the table: an interrupted drive still has none
            written += self._past_cache(lane, stopped, end, tail[0],
                                        erase.merge([(0, part.start), *where, tail], size),
                                        final)
        if lane.stopped:
            return written
        self._reached[lane.id] = TABLE
        table = memoryview(aligned_buffer(4096))  # the table last: an interrupted drive
        table[:512] = erase.mbr(part, secrets.token_bytes(4))  # has none
        head = [(0, 4096)]
        fixed = table
        erase.fill(device, head, lambda o, n: fixed[o:o + n], pacer=lane.pacer,
                   stopped=stopped, progress=lambda n: lane.advance(n))
        blockdev.sync(device)
        erase.check(device, head, lambda o, n: fixed[o:o + n], "the partition table",
                    pacer=lane.pacer, stopped=stopped, progress=lambda n: None)
        return written + 4096

    def _past_cache(self, lane: Lane, stopped: Callable[[], bool], start: int, end: int,
                    ranges: list[tuple[int, int]],
                    expected: Callable[[int, int], memoryview]) -> int:
        """Everything this erase promised read back once more, after :data:`PAST_CACHE`
        bytes of zeros written to [start, end), a place it leaves free: a drive that drops
        its writes but answers reads from a write cache of a few MiB (each step's own
        read-back came from that cache) fails here instead of being reported erased."""
        device = lane.dest
        start = -(-start // 4096) * 4096
        length = min(PAST_CACHE, end - start)
        length -= length % 4096
        if length <= 0:
            return 0
        erase.fill(device, [(start, length)], erase.zeros_source(),
                   pacer=lane.pacer, stopped=stopped, progress=lambda n: lane.advance(n))
        blockdev.sync(device)
        blockdev.drop_cache(device)
        erase.check(device, ranges, expected, "what was written before", pacer=lane.pacer,
                    stopped=stopped, progress=lambda n: lane.advance(n),
                    hint=" (it dropped writes a cache had answered for: the drive is failing)")
        return length

    def _wipe(self, lane: Lane, stopped: Callable[[], bool],
              moved: Callable[[Step, int], Callable[[int], None]],
              step: Callable[[Step], None]) -> int:
        """The capacity probe, [zeros | discard,] the signatures wiped and read back as zeros,
        none left: how many bytes were written."""
        options, device = self.options, lane.dest
        size = device.size
        written = 0
        zeros = erase.zeros_source()
        whole = [(0, size)]
        # A counterfeit stick fails here, before anything but the probe's stamps (put back)
        # is written: it must never be formatted to a size it does not hold.  Put back after
        # a Ctrl-C too, as by `probe`, unless the drive stopped answering (given up): they
        # were left on a drive the user had just told to stop.
        self._reached[lane.id] = PROBING
        result = probe.probe_device(device, stopped=stopped,
                                    overwritten=whole if options.zero else (),
                                    answered=lane.answered, given_up=lambda: lane.abandoned)
        if not lane.stopped and result.error is None:  # --zero keeps its stamps: zeros go next
            self._reached[lane.id] = WIPING if options.zero else BEFORE
        if lane.stopped:
            return written
        if result.error is not None:
            raise OSError(errno.EIO, result.message)
        if not result.ok:
            raise Counterfeit(result.message)
        step(Step.WRITING if options.zero else Step.ERASING)
        if options.zero or options.discard:  # the first write, or discard, comes next
            self._reached[lane.id] = WIPING
        if options.zero:
            erase.fill(device, whole, zeros, pacer=lane.pacer, stopped=stopped,
                       progress=moved(Step.WRITING, size))
            written = size
        elif options.discard:
            erase.discard(device, size)
        if options.zero or options.discard:
            step(Step.VERIFYING)
            erase.check(device, whole, zeros, "zeros", pacer=lane.pacer, stopped=stopped,
                        progress=moved(Step.VERIFYING, size),
                        hint="" if options.zero else (
                            " after discarding (this drive does not zero discarded blocks: "
                            "use --zero instead)"))
            step(Step.ERASING)
        if lane.stopped:
            return written
        found = erase.signatures(device)
        parts = erase.old_partitions(device)
        if found and not options.zero:
            lane.post(_Said(lane.id, "wiping " + ", ".join(sorted({t for _, t in found}))))
        ranges = erase.merge([*erase.wipe_ranges(size, [o for o, _ in found]),
                              *erase.partition_ranges(parts)], size)
        if not (options.zero or options.discard):  # already zeros everywhere otherwise
            self._reached[lane.id] = WIPING
            erase.fill(device, ranges, zeros, pacer=lane.pacer, stopped=stopped,
                       progress=lambda n: lane.advance(n))
            written += sum(n for _, n in ranges)
            # Read back from the drive: one that drops writes must not pass as wiped.
            erase.check(device, ranges, zeros, "zeros", pacer=lane.pacer, stopped=stopped,
                        progress=lambda n: lane.advance(n))
        if lane.stopped:
            return written
        left = [f"{t} at byte {o}" for o, t in erase.signatures(device)]
        left += erase.found_inside(device, parts)
        if left:
            raise OSError(errno.EIO, f"{device.path}: signatures left after wiping: "
                          + ", ".join(left))
        return written
