"""A flash from start to end: open the checked targets, run the engine, report each drive.

This is the edge between the engine (which knows file objects and messages) and the views
(which know events).  It holds policy only: which engine options a flash uses, and how each
engine message becomes an event.  It never decides whether a drive may be written (that is
:mod:`popsicle_py.plan`'s job), and it moves no bytes itself (the engine and
:mod:`popsicle_py.blockdev` do).  Every event is emitted on the calling thread: views are
single-threaded.

Each drive is finished by the engine on its own timeline (see
:mod:`popsicle_py.engine.writer`): everything but the image's head (its first MiB), then
verification from the device (with a random stamp where the head goes), then, once the
image's checksum computed in the same pass matched, the head, and its verification.  A drive
that fails or is interrupted never holds the image's partition table or boot code.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from popsicle_py import blockdev, failures
from popsicle_py.blockdev import BlockDevice, OpenSpec
from popsicle_py.bmap import Bmap
from popsicle_py.engine import (
    DEFAULT_BUCKET_SIZE,
    DEFAULT_BUCKETS,
    AllDestinationsFailed,
    BusVerifier,
    BusWriter,
    Cancelled,
)
from popsicle_py.errors import Refused, Rejected, SourceStalled
from popsicle_py.events import (
    Cause,
    Download,
    DriveInfo,
    DriveResult,
    Event,
    Note,
    Phase,
    Progress,
    Result,
    Started,
    Status,
    Step,
    Summary,
)
from popsicle_py.grading import SpeedJudge, SpeedRule
from popsicle_py.images import Checksum, ChecksumTap, Image
from popsicle_py.images.stillness import holding_still
from popsicle_py.messages import (
    BusVerifierMessage,
    BusWriterMessage,
    VerifierMessage,
    WriterMessage,
)
from popsicle_py.protocols import Source
from popsicle_py.records import record

if TYPE_CHECKING:
    import io

    from popsicle_py.engine.config import Prepare, Selector

log = logging.getLogger(__name__)
Emit = Callable[[Event], None]
CancelCheck = Callable[[], bool]


class DriveLike(Protocol):
    """What the job needs of a drive (a :class:`popsicle_py.drives.Drive` has it all)."""

    @property
    def path(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def logical_block_size(self) -> int: ...

D = TypeVar("D", bound=DriveLike)


class OpenError(Refused):
    """Some targets could not be opened; nothing was written.  One line per target."""


#: A drive's step before its head (--customize): its descriptor, path and identity, and
#: ``progressed(n)`` for the bytes it moves (the stall clock), ``stopped()`` (see BeforeHead).
DriveStep = Callable[[int, str, DriveInfo | None, Callable[[int], None], CancelCheck], None]


#: Writes a verified drive's certificate from its result, the (extent, digest) pairs read back
#: and the run's start (wall clock); returns where (see popsicle_py.certify.writer).
Certify = Callable[[DriveResult, Sequence[tuple[tuple[int, int], bytes]], float], str]


@record
class FlashOptions:
    verify: bool = True
    bucket_size: int = DEFAULT_BUCKET_SIZE
    buckets: int = DEFAULT_BUCKETS
    stall_timeout: float | None = 60.0
    skip_identical: bool = False
    repair_attempts: int = 1
    bmap: Bmap | None = None
    #: Checked again in the write pass; the head is written only once it matched.
    checksum: Checksum | None = None
    #: Whether a checksum pass before writing matched (not with --checksum-while-writing).
    checksum_checked: bool = True
    #: Run on each opened drive before anything is written to it (the capacity probe).
    probe: Prepare | None = None
    #: Where a compressed image is spilled so every drive goes at its own pace ("": $TMPDIR
    #: or /var/tmp; None: keep the drives of a compressed image in lock-step).
    spill_dir: str | None = ""
    select: Selector | None = None  # a compressed image's trim (popsicle_py.app.trim)
    #: Run on each drive once written and verified, before its head (--customize): gets the
    #: drive's descriptor, path and identity; an exception fails that drive.
    before_head: DriveStep | None = None
    #: Minimum steady speeds: a drive below is rejected (cause slow) and not written further.
    speeds: SpeedRule | None = None
    #: Test the rest of each drive after verification (before its head): --surface-test.
    surface: bool = False
    #: ``certify(result, evidence, started)`` for each drive verified ok: writes its
    #: certificate (:class:`popsicle_py.certify.writer.CertificateWriter`), returns the path.
    certify: Certify | None = None
    #: Raises once the source is read if it cannot vouch for it (a master drive written to,
    #: an image file changed).
    source_check: Callable[[], None] | None = None


def open_targets(drives: Sequence[D], *, for_writing: bool = True,
                 check: Callable[[D], str | None] | None = None) -> list[BlockDevice]:
    """Open every drive, or none: a drive that cannot be opened stops the run before writing.

    ``check(drive)`` may refuse a drive that changed since it was selected; a drive with an
    ``identity`` is checked once more on the opened descriptor, before anything is written.
    """
    opened: list[BlockDevice] = []
    problems: list[str] = []
    for drive in drives:
        if check is not None and (problem := check(drive)):
            problems.append(problem)
            continue
        spec = OpenSpec(drive.path, drive.size, getattr(drive, "logical_block_size", 512))
        try:
            opener = blockdev.open_for_writing if for_writing else blockdev.open_for_reading
            opened.append(blockdev.confirmed(opener(spec), getattr(drive, "identity", None)))
        except OSError as exc:
            said = failures.failure(exc, drive.path)
            problems.append(said.text)
            if said.cause is Cause.PERMISSION:
                break  # refused (polkit): asking for the next drives' passwords is in vain
    if problems:
        for device in opened:
            device.close()
        raise OpenError(problems)
    return opened


def open_watched(image: Source, tap: ChecksumTap | None, stall_timeout: float | None,
                 cancel: CancelCheck) -> io.RawIOBase:
    """The image opened on a thread of its own: its share may have hung since it was checked
    (a watch session lasts hours), and a stop must still be heard."""
    from popsicle_py.engine.watched import WorkStalled, watched_reads

    if image.path.lower().startswith(("http://", "https://")):
        stall_timeout = None  # a socket's reads are not counted: the download's own clock
    try:
        source = watched_reads(lambda: image.open() if tap is None else image.open(tap),
                               cancel=cancel, stall_timeout=stall_timeout, name="image-open")
    except WorkStalled as exc:
        raise SourceStalled(exc.limit, 0) from None
    if source is None:
        raise Cancelled("cancelled")
    return source


def _both(*checks: Callable[[], None] | None) -> Callable[[], None] | None:
    """One vouching check made of those given (None: none to make)."""
    given = [c for c in checks if c is not None]
    if len(given) <= 1:
        return given[0] if given else None

    def check() -> None:
        for c in given:
            c()
    return check


class _Drive:
    """The job's record of one drive."""

    def __init__(self, device: BlockDevice, info: DriveInfo | None = None) -> None:
        self.device = device
        self.info = info
        self.path = device.path
        self.written = 0
        self.skipped = 0
        self.verified = 0
        self.repaired = 0
        self.device_sha256: str | None = None  # of the image's range, read back
        self.judge: SpeedJudge | None = None  # its speeds, with --min-*-speed
        self.status: Status | None = None  # final status once known
        self.cause: Cause | None = None
        self.error: str | None = None
        self.mismatch: int | None = None
        self.ended: float | None = None
        self.head_note: str | None = None  # said on a failure once the head began (HeadUndone)
        self.seconds: tuple[float | None, float | None] = (None, None)  # write, verify passes
        self.certificate: str | None = None  # its certificate's path, with --certificate
        self.certificate_error: str | None = None  # why an ok drive has none, when asked

    @property
    def live(self) -> bool:
        return self.status is None


class _Job:
    """State and reporting shared by flashing and verifying: every drive ends exactly once."""

    #: An ok drive was read back and matched (False for a flash with --no-verify).
    verifies = True

    def __init__(self, devices: Sequence[BlockDevice], emit: Emit, cancel: CancelCheck,
                 infos: Sequence[DriveInfo] = ()) -> None:
        self._emit = emit
        self.cancel = cancel
        self.infos = tuple(infos)
        self.drives = [_Drive(d, self.infos[i] if i < len(self.infos) else None)
                       for i, d in enumerate(devices)]
        self.started = time.monotonic()
        self.cancelled = False
        self._closed = False

    def emit(self, event: Event) -> None:
        if not self._closed:  # the summary is the last event
            self._emit(event)

    def _end(self, drive: _Drive, status: Status, error: str | None = None,
             mismatch: int | None = None, cause: Cause | None = None) -> None:
        if self._settle(drive, status, error, mismatch, cause):
            self._announce(drive)

    def _settle(self, drive: _Drive, status: Status, error: str | None = None,
                mismatch: int | None = None, cause: Cause | None = None) -> bool:
        """Fix how a drive ended (once: False when it already had); :meth:`_announce` says
        it.  Apart, so that an ok drive's certificate is in its result."""
        if not drive.live:
            return False
        if status is not Status.OK and drive.head_note is not None:
            error = f"{error or status.value}; {drive.head_note}"
        drive.status, drive.error, drive.mismatch = status, error, mismatch
        drive.cause = None if status is Status.OK else (cause or Cause.ERROR)
        drive.ended = time.monotonic()
        return True

    def _announce(self, drive: _Drive) -> None:
        status = drive.status or Status.CANCELLED
        self.emit(Phase(drive.path, Step.DONE if status is Status.OK else Step.FAILED,
                        drive.error or status.value, drive.cause))
        self.emit(Result(self._result(drive)))

    def _result(self, drive: _Drive) -> DriveResult:
        elapsed = None if drive.ended is None else drive.ended - self.started
        return DriveResult(drive.path, drive.status or Status.CANCELLED, drive.written,
                           drive.error, drive.mismatch, elapsed, drive.skipped, drive.repaired,
                           drive.cause if drive.status is not None else Cause.CANCELLED,
                           verified=drive.status is Status.OK and self.verifies,
                           drive=drive.info, device_sha256=drive.device_sha256
                           if drive.status is Status.OK else None,
                           write_seconds=drive.seconds[0], verify_seconds=drive.seconds[1],
                           certificate=drive.certificate,
                           certificate_error=drive.certificate_error)

    def _fail(self, drive: _Drive, exc: BaseException) -> None:
        why = failures.failure(exc, drive.path)
        status = Status.REJECTED if isinstance(exc, Rejected) else Status.FAILED
        self._end(drive, status, why.text, cause=why.cause)

    def _cancel_rest(self) -> None:
        self.cancelled = True
        for drive in self.drives:
            self._end(drive, Status.CANCELLED, "cancelled", cause=Cause.CANCELLED)

    def _live(self) -> list[_Drive]:
        return [d for d in self.drives if d.live]

    def _close_all(self) -> None:
        """Free every descriptor, whatever the drive's end (see BlockDevice.close).

        A drive whose last call has not returned (hung in the kernel) gets a note: the summary
        comes now, but the process can only end once the kernel gives that call up."""
        for drive in self.drives:
            with contextlib.suppress(OSError):
                drive.device.close()
            if (line := failures.call_not_returned(drive.path, drive.device)) is not None:
                self.emit(Note(line))

    def _summary(self) -> Summary:
        summary = Summary(tuple(self._result(d) for d in self.drives), self.cancelled)
        self.emit(summary)
        self._closed = True
        return summary


class FlashJob(_Job):
    """Write one image to many opened drives; each is verified from the device and finished
    on its own timeline, so a fast drive is done (and can be pulled) while a slow one is
    still being written."""

    def __init__(self, image: Source, devices: Sequence[BlockDevice], options: FlashOptions,
                 emit: Emit, cancel: CancelCheck, infos: Sequence[DriveInfo] = ()) -> None:
        super().__init__(devices, emit, cancel, infos)
        self.image = image
        self.options = options
        self.verifies = options.verify
        if options.speeds is not None and options.speeds.active:
            for drive in self.drives:
                drive.judge = SpeedJudge(options.speeds)
        self._writer: BusWriter | None = None
        self._wall_start = time.time()
        self._early: list[Event] = []
        self._lock = threading.Lock()

    def relay(self, event: Event) -> None:
        """From any thread (a download's progress): emitted on the job's own thread, in order."""
        with self._lock:
            writer = self._writer
            if writer is None:
                self._early.append(event)
                return
        writer.post(event)

    @property
    def total(self) -> int | None:
        """Bytes each drive gets: the mapped ones only, with a block map."""
        bmap = self.options.bmap
        return bmap.mapped if bmap is not None else self.image.size

    def run(self) -> Summary:
        try:
            shown = getattr(self.image, "url", None) or self.image.path  # a download's copy
            self.emit(Started(shown, self.image.format, self.image.size,
                              tuple(d.path for d in self.drives), verify=self.options.verify,
                              drives=self.infos))
            self._write()
        except Cancelled:
            self._cancel_rest()
        except Exception as exc:  # a bug of ours: every unfinished drive says so, none is ok
            log.debug("flash stopped by an unexpected error", exc_info=True)
            for drive in self._live():
                self._end(drive, Status.FAILED, f"{drive.path}: internal error: {exc}",
                          cause=Cause.INTERNAL)
        finally:
            self._close_all()
            for drive in self.drives:
                if drive.status is Status.OK:
                    blockdev.reread_partitions(drive.path)
        return self._summary()

    def _tap(self) -> ChecksumTap | None:
        """The in-pass checksum, where the whole file is read in order (not with a block map)."""
        checksum = self.options.checksum
        if checksum is None or self.options.bmap is not None \
                or not getattr(self.image, "tappable", False):
            return None
        return ChecksumTap(checksum, checked_before=self.options.checksum_checked)

    def _before_head(self, options: FlashOptions
                     ) -> Callable[[BlockDevice, Callable[[int], None], CancelCheck], None] | None:
        """The engine's per-drive step, given each drive's descriptor, path and identity."""
        step = options.before_head
        if step is None:
            return None
        infos = {id(d.device): d.info for d in self.drives}

        def run(device: BlockDevice, moved: Callable[[int], None], stopped: CancelCheck) -> None:
            step(device.fileno(), device.path, infos.get(id(device)), moved, stopped)
        return run

    def _write(self) -> None:
        options = self.options
        total = self.total

        def on_message(msg: WriterMessage | Phase | Progress | Note | Download) -> None:
            drive = self.drives[getattr(msg, "id", 0)]
            match msg:
                case BusWriterMessage.Written(bytes_written=n, at=at):
                    drive.written = n
                    self.emit(Progress(drive.path, Step.WRITING, n + drive.skipped, total))
                    self._judge(drive, "write", n + drive.skipped, at)
                case BusWriterMessage.Skipped(bytes_skipped=n, at=at):
                    drive.skipped = n
                    self.emit(Progress(drive.path, Step.WRITING, drive.written + n, total))
                    self._judge(drive, "write", drive.written + n, at)  # its pace through it
                case BusWriterMessage.Stage(step=step):
                    self.emit(Phase(drive.path, step))
                case BusWriterMessage.Verified(bytes_read=n, at=at):
                    drive.verified = n
                    self.emit(Progress(drive.path, Step.VERIFYING, n, total))
                    self._judge(drive, "read", n, at)
                case BusWriterMessage.Repaired(buckets=k):
                    drive.repaired += k
                    self.emit(Note(f"{drive.path}: repaired {k} bucket(s)"))
                case BusWriterMessage.Invalid(offset=offset, end=end, ended=ended):
                    self._invalid(drive, offset, end, ended)
                case BusWriterMessage.Errored(why=why):
                    self._fail(drive, why)
                case BusWriterMessage.HeadUndone(length=length, done=done):
                    drive.head_note = failures.head_undone(length, done)
                    if not drive.live:  # given up (a stall) while its head was at risk
                        drive.error = f"{drive.error}; {drive.head_note}"
                        self.emit(Note(f"{drive.path}: {drive.head_note}"))
                case BusWriterMessage.Completed(sha256=digest):
                    drive.device_sha256 = digest
                    drive.seconds = (msg.write_seconds, msg.verify_seconds)
                    if self._settle(drive, Status.OK):
                        self._certify(drive)
                        self._announce(drive)
                case Phase() | Progress() | Note() | Download():  # relayed: the download's news
                    self.emit(msg)
                case BusWriterMessage.LockStep(reason=reason):
                    self.emit(Note(f"every drive goes at the slowest one's pace from here on: "
                                   f"no spill file for the decompressed image ({reason})"))

        first = Step.PROBING if options.probe is not None else Step.WRITING
        for drive in self.drives:
            self.emit(Phase(drive.path, first))
        source = None
        tap = self._tap()
        try:
            writer = BusWriter(None, [d.device for d in self.drives], on_message, self.cancel)
            with self._lock:
                for event in self._early:
                    writer.post(event)
                self._early.clear()
                self._writer = writer
            source = open_watched(self.image, tap, options.stall_timeout, self.cancel)
            (
                writer.from_source(source)
                .bucket_size(options.bucket_size)
                .buckets(options.buckets)
                .stall_timeout(options.stall_timeout)
                .skip_identical(options.skip_identical)
                .prepare_each(options.probe)
                .before_head_each(self._before_head(options))
                .spill_to(options.spill_dir).select(options.select)
                .surface_test(options.surface)
                .vouch(_both(tap.vouch if tap is not None else None, options.source_check))
                .finish_each(verify=options.verify, repairs=options.repair_attempts,
                             source_at=None if self.image.seekable_raw
                             else getattr(self.image, "read_at", None))
            )
            bmap = options.bmap
            if bmap is None:
                writer.expect_size(self.image.size)
            else:
                writer.only_extents([(e.offset, e.length, e.checksum) for e in bmap.extents],
                                    bmap.algo)
                writer.expect_size(bmap.image_size)  # a stream is read to its end and counted
            writer.write()
        except (Cancelled, KeyboardInterrupt):
            raise Cancelled("cancelled") from None
        except AllDestinationsFailed:
            pass
        except Exception as exc:  # the image could not be read: no drive holds it
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            for drive in self._live():
                self._end(drive, Status.FAILED, f"{drive.path}: {why}", cause=Cause.SOURCE)
        finally:
            still_reading = self._writer is not None and self._writer.reading()
            if source is not None and not still_reading:
                with contextlib.suppress(Exception):
                    source.close()
            if still_reading and isinstance(self.image, Image) and self._stuck_reading():
                self.emit(Note(failures.hung_check(self.image.path, "a read of the image")))
        for drive in self._live():  # given up by the engine without a message of its own
            self._end(drive, Status.FAILED, f"{drive.path}: did not finish", cause=Cause.ERROR)

    def _stuck_reading(self) -> bool:
        """The reader still inside a read of the image file a second after the run ended: its
        disk or share hangs (a FUSE daemon, a dead master drive), and the kernel lets the
        process end only once that read returns: said, or the shell seems to hang unexplained.
        (A download's socket or a pipe ends with the process: never said for those.)"""
        deadline = time.monotonic() + 1.0
        while self._writer is not None and self._writer.reading():
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.02)
        return False

    def _judge(self, drive: _Drive, phase: str, done: int, at: float) -> None:
        """A drive below --min-write-speed or --min-read-speed at steady state is rejected at
        once: the engine gives it up (no further write, never the image's head).  ``at``: when
        the drive's thread posted ``done`` (this thread may have been held meanwhile)."""
        if drive.judge is None or not drive.live or self._writer is None:
            return
        index = self.drives.index(drive)
        why = drive.judge.feed(phase, done, at, waited=self._writer.starved(index))
        if why is not None:
            self._writer.give_up(index, Rejected(Cause.SLOW.value, why))

    def _certify(self, drive: _Drive) -> None:
        """The certificate of a drive that read back as the image, when asked for, before its
        result (which names it); a note says where it is, or why there is none.  The drive
        stays ok (its bytes are right), but a run asked for certificates that lacks one is
        not (exit 1): a script that hands out certified sticks must be able to tell."""
        certify, writer = self.options.certify, self._writer
        if certify is None or writer is None or not self.verifies:
            return
        read = writer.source_read()
        try:
            drive.certificate = certify(self._result(drive), list(
                zip(read.extents, read.digests, strict=True)), self._wall_start)
        except (OSError, ValueError) as exc:
            drive.certificate_error = str(exc) or type(exc).__name__
            self.emit(Note(f"{drive.path}: no certificate: {drive.certificate_error}"))
            return
        self.emit(Note(f"{drive.path}: certificate {drive.certificate}"))

    def _invalid(self, drive: _Drive, offset: int, end: int | None, ended: bool) -> None:
        if ended:
            text = f"the drive ends at byte {offset}, before the image does"
        elif end is None:
            text = f"the drive differs from the image at byte {offset}"
        else:
            text = f"the drive differs from the image somewhere in bytes {offset}-{end - 1}"
        tried = (f" (still after {self.options.repair_attempts} repair attempts)"
                 if self.options.repair_attempts else "")
        self._end(drive, Status.INVALID, f"{drive.path}: verification failed: {text}{tried}",
                  offset, cause=Cause.MISMATCH)


class VerifyJob(_Job):
    """Compare drives with an image, reading the image once for all of them."""

    def __init__(self, image: Source, devices: Sequence[BlockDevice], emit: Emit,
                 cancel: CancelCheck, stall_timeout: float | None = 60.0,
                 infos: Sequence[DriveInfo] = ()) -> None:
        super().__init__(devices, emit, cancel, infos)
        self.image = image
        self.stall_timeout = stall_timeout
        self._verifier = BusVerifier(None, [d.device for d in self.drives], self._on_message,
                                     cancel)

    def relay(self, event: Event) -> None:
        """From any thread (a download's progress): emitted on the job's own thread, in order."""
        self._verifier.post(event)

    def _on_message(self, msg: VerifierMessage | Phase | Progress | Note | Download) -> None:
        if isinstance(msg, (Phase, Progress, Note, Download)):
            self.emit(msg)
            return
        drive = self.drives[msg.id]
        size = self.image.size
        match msg:
            case BusVerifierMessage.Read(bytes_read=n):
                self.emit(Progress(drive.path, Step.VERIFYING, n, size))
            case BusVerifierMessage.Valid(sha256=digest, seconds=seconds):
                drive.device_sha256, drive.seconds = digest, (None, seconds)
                self._end(drive, Status.OK)
            case BusVerifierMessage.Invalid(offset=offset):
                self._end(drive, Status.INVALID, f"{drive.path}: differs from the image at "
                          f"byte {offset}", offset, cause=Cause.MISMATCH)
            case BusVerifierMessage.Errored(why=why):
                self._fail(drive, why)

    def run(self) -> Summary:
        size = self.image.size
        shown = getattr(self.image, "url", None) or self.image.path  # a download's copy
        self.emit(Started(shown, self.image.format, size,
                          tuple(d.path for d in self.drives), drives=self.infos))
        for drive in self.drives:
            self.emit(Phase(drive.path, Step.VERIFYING))
        source = None
        try:
            source = open_watched(self.image, None, self.stall_timeout, self.cancel)
            still = holding_still(self.image.path) if isinstance(self.image, Image) else None
            self._verifier.from_source(source).stall_timeout(self.stall_timeout).expect_size(
                size, still).verify()  # cut short or changed mid-read: no drive matches it
        except Cancelled:
            self._cancel_rest()
        except Exception as exc:
            why = getattr(exc, "strerror", None) or exc
            for drive in self._live():
                self._end(drive, Status.FAILED, f"{drive.path}: {why}", cause=Cause.SOURCE)
        finally:
            if source is not None and not self._verifier.reading():  # else it is left to it
                with contextlib.suppress(Exception):
                    source.close()
            self._close_all()
        return self._summary()
