"""Duplicator mode: flash every eligible drive as it is plugged in, power it off when done.

A :class:`WatchSession` follows udev (pyudev's Monitor, whole disks only).  Each eligible drive
that appears gets its own :class:`~popsicle_py.flash.FlashJob` on its own thread at once: a
drive plugged in while others are being written does not wait for them.  Eligibility is the
one ``flash --all-usb`` uses (USB and SD drives, not system drives, not read-only, with a
medium, at most ``max_size``), plus what would make ``flash`` refuse the drive (smaller than
the image, mounted, held by LVM/RAID/encryption): such drives are announced and left alone.

The image is prepared once, before watching: its checksum checked, a compressed one
decompressed to a private raw copy (deleted at the end) that every drive's job opens itself.

A drive pulled while it is being written ("remove" uevent, or the medium gone from a reader)
always ends ``failed``, "the drive was removed".  A card put into a reader while the pulled
card's job is still ending arrives once that job is over.

A drive that is done and verified is powered off as udisks2 does it (flush, then write 1 to
its USB device's ``remove`` attribute; :mod:`popsicle_py.watch_power`), unless it is an SD
card in a built-in reader or another drive shares its USB device (a multi-slot card reader).

The session never touches click or Rich: it emits :mod:`popsicle_py.events` to a callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable

import pyudev

from popsicle_py import drives
from popsicle_py import probe as probe_mod
from popsicle_py.blockdev import BlockDevice
from popsicle_py.drives import Drive, SystemFacts
from popsicle_py.engine import HEAD, hear_signals_on_main_thread, keep_signals_for_main_thread
from popsicle_py.errors import EXIT_FAILED, EXIT_OK
from popsicle_py.events import (
    POWERED_OFF,
    Cause,
    DriveAdded,
    DriveRemoved,
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
    WatchEvent,
    Watching,
)
from popsicle_py.flash import Certify, DriveStep, FlashJob, FlashOptions, OpenError, open_targets
from popsicle_py.grading import SpeedRule, chain
from popsicle_py.images import (
    Checksum,
    ChecksumCancelled,
    Image,
    ImageError,
    decompress_to,
    open_image,
    verify_checksum,
)
from popsicle_py.images.stillness import ImageChanged, holding_still
from popsicle_py.plan import DEFAULT_MAX_AUTO_SIZE
from popsicle_py.ports import drive_info, link_notes, link_of
from popsicle_py.protocols import TrimPlan
from popsicle_py.records import record
from popsicle_py.signals import Cancellation
from popsicle_py.units import format_size
from popsicle_py.watch_power import power_off as power_off  # importable here too
from popsicle_py.watch_power import power_off_within
from popsicle_py.watch_seen import (
    Present,
    Seen,
    disks_present,
    node_gone,
    swapped,
    sysfs_number,
    was_present,
)

log = logging.getLogger(__name__)

Emit = Callable[[WatchEvent], None]
#: Plans what of a raw image the drives get (see :class:`TrimPlan`).
TrimRule = Callable[[Image], TrimPlan]

#: Smaller than flash's 16 MiB x 4: with eight drives in flight, each has its own ring.
WATCH_BUCKET_SIZE = 4 << 20
WATCH_BUCKETS = 4
#: How long the main loop waits for a uevent before looking at signals and finished drives.
POLL_INTERVAL = 0.1
#: Room kept free next to the raw copy (filesystems misbehave when completely full).
COPY_MARGIN = 64 << 20


def removed_message(path: str) -> str:
    """What a drive pulled before it was finished says (the words of ENODEV/ENXIO failures)."""
    return f"{path}: the drive was removed"


def default_tmpdir() -> str:
    """Where the raw copy of a compressed image goes: $TMPDIR, else /var/tmp (not a RAM disk)."""
    return os.environ.get("TMPDIR") or ("/var/tmp" if os.path.isdir("/var/tmp")
                                        else tempfile.gettempdir())


@record
class WatchOptions:
    #: End after this many drives finished (ok or failed); no more are started once reached.
    count: int | None = None
    verify: bool = True
    power_off: bool = True
    #: Also write the eligible drives plugged in before the session started.
    include_present: bool = False
    max_size: int = DEFAULT_MAX_AUTO_SIZE
    checksum: Checksum | None = None
    bucket_size: int = WATCH_BUCKET_SIZE
    buckets: int = WATCH_BUCKETS
    stall_timeout: float | None = 60.0
    #: Check each drive's real capacity before writing it (counterfeit sticks).
    probe: bool = True
    #: Parent of the private directory holding a decompressed copy (default: default_tmpdir()).
    tmpdir: str | None = None
    #: Why a drive, given the seq it gets if taken, is left alone before any rule, or None.
    admit: Callable[[Drive, int], str | None] | None = None
    #: Once set: take no new drive, end when the drives in flight are done (a station's stop).
    drain: threading.Event | None = None
    first_seq: int = 1  # the first drive's seq (a station's batch goes on where it was left)
    #: Each drive's step once written and verified, before its head (see FlashOptions).
    before_head: DriveStep | None = None
    #: Writes each verified drive's certificate (see :class:`FlashOptions`).
    certify: Certify | None = None
    #: Minimum steady speeds (see :class:`FlashOptions`).
    speeds: SpeedRule | None = None
    #: Test the rest of each drive after verification (--surface-test).
    surface: bool = False
    #: Run on each drive before anything is written to it: raises Rejected (--capacity).
    reject: Callable[[BlockDevice, Callable[[], None]], None] | None = None
    #: Plans, once, what of the raw image (or raw copy) the drives get: its file systems'
    #: free space is skipped (None: every byte).
    trim: TrimRule | None = None
    #: The image's stillness check taken earlier (a station's, before its SHA-256 was read).
    still: Callable[[], None] | None = None
    #: The disks plugged in when the session was asked for (None: when :meth:`run` starts):
    #: those are left alone, one plugged in since (while the image is prepared) is new.
    present: Present | None = None


@record
class WatchOutcome:
    summary: Summary
    #: 0 every started drive ok (or none started), 1 one failed, 128 + signal when a signal
    #: cancelled work in progress (a drive in flight, the checksum or the decompression).
    exit_status: int


def ineligibility(drive: Drive, image_size: int | None, max_size: int) -> str | None:
    """Why a drive that appeared will not be written, or None: ``--all-usb``'s rules and more.

    Beyond eligibility and ``max_size`` (as ``flash --all-usb`` skips), a drive that ``flash``
    would refuse (smaller than the image, mounted, held by LVM/RAID/encryption) is left alone.
    """
    found = drives.refusals(drive, image_size=image_size, max_size=max_size, auto=True)
    return found[0].reason if found else None


class WatchSession:
    """Follow udev and flash each eligible drive as it appears, until a count or a signal."""

    def __init__(self, image: Image, emit: Emit, cancel: Cancellation,
                 options: WatchOptions | None = None,
                 context: pyudev.Context | None = None) -> None:
        self.image = image
        self.options = options or WatchOptions()
        self.cancel = cancel
        self._emit_to = emit
        #: Events of the drives' own threads, delivered by the session's (the caller's) thread.
        self._outbox: queue.SimpleQueue[WatchEvent] = queue.SimpleQueue()
        self.context = context or pyudev.Context()
        self._source: Image = image  # what the jobs read: the image, or its raw copy
        self._trim: TrimPlan | None = None  # planned once the raw image is at hand
        self._copy_dir: str | None = None
        self._copy_devnums: frozenset[int] = frozenset()
        self._image_facts: SystemFacts | None = None  # the image's storage (see _facts)
        self._current: dict[int, Seen] = {}  # by device number, while present
        self._media: dict[int, int] = {}  # last size seen per device number (0: no medium)
        #: A card put into a reader while the pulled card's job is still ending, by device
        #: number: it arrives once that job is over (see _take_waiting).
        self._waiting: dict[int, pyudev.Device] = {}
        self._started: list[Seen] = []
        self._present_before = self.options.present
        #: Raises once the image file changed since the watch began: the sticks written
        #: after it would not be copies of one image (the checksum was checked at the start).
        self._still = self.options.still or holding_still(image.path)

    # ------------------------------------------------------------------------------------
    # Events

    def emit(self, event: WatchEvent) -> None:
        """Queue an event; :meth:`_deliver` hands it to the view on the session's thread."""
        self._outbox.put(event)

    def _emit_now(self, event: WatchEvent) -> None:
        """On the session's own thread: what was queued first, then this."""
        self._deliver()
        self._emit_to(event)

    def _deliver(self) -> None:
        while True:
            try:
                event = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._emit_to(event)

    def _job_event(self, seen: Seen, event: Event) -> None:
        """An event from a drive's FlashJob, as the session reports it.

        The job's own start and summary are the session's business.  A drive pulled before
        its job ended (written and verified) is reported failed with "the drive was removed",
        whatever the job saw: the cancellation the removal caused, or the ENODEV/ENXIO error
        of a write that got there first.  The job's end comes as a phase then a result, under
        its lock; the verdict is taken at the phase, so both always say the same.
        """
        if isinstance(event, (Started, Summary)):
            return
        if (isinstance(event, Phase) and event.phase in (Step.DONE, Step.FAILED)
                and event.device == seen.path and seen.result is None):
            seen.ended_removed = seen.removed.is_set() or event.cause is Cause.REMOVED
            if seen.ended_removed:
                event = Phase(seen.path, Step.FAILED, removed_message(seen.path), Cause.REMOVED)
        elif isinstance(event, Result) and event.result.device == seen.path:
            r = event.result
            if seen.ended_removed:  # decided with the phase: the two always agree
                r = dataclasses.replace(r, status=Status.FAILED,
                                        error=removed_message(seen.path), mismatch_offset=None,
                                        cause=Cause.REMOVED, verified=False)
            r = dataclasses.replace(r, drive=seen.info, bytes_unused=self._unused)
            event = Result(r)
            seen.result = r
        if isinstance(event, (Phase, Progress)) and seen.info is not None:
            event = dataclasses.replace(event, seq=seen.info.seq)  # whose, once a name is reused
        self.emit(event)

    # ------------------------------------------------------------------------------------
    # The run

    def run(self) -> WatchOutcome:
        """Prepare the image, watch until ``count`` drives finished or a signal; summarize.

        Raises ImageError (nothing written) when the image fails its checksum or cannot be
        decompressed.
        """
        try:
            if self._present_before is None:
                self._present_before = disks_present(self.context)
            if not self._prepare():
                summary = Summary((), cancelled=True)
                self._deliver()
                self._emit_to(summary)
                return WatchOutcome(summary, self.cancel.exit_status)
            # A signal while no drive is being written ends the session, and says so.
            self.cancel.idle = lambda: not any(s.in_flight for s in self._started)
            self._watch()
        finally:
            self._join_all()
            self._remove_copy()
            self._deliver()
        results = tuple(s.result or DriveResult(s.path, Status.CANCELLED, 0, "cancelled",
                                                cause=Cause.CANCELLED, drive=s.info)
                        for s in self._started)
        interrupted = any(r.status == Status.CANCELLED for r in results)
        summary = Summary(results, cancelled=interrupted, none_is_ok=True)
        self._emit_to(summary)
        # Not ok: a drive not ok, or an ok one whose certificate could not be written.
        status = self.cancel.exit_status if interrupted else EXIT_OK if summary.ok else EXIT_FAILED
        return WatchOutcome(summary, status)

    def _prepare(self) -> bool:
        """Checksum, then decompress once; False when a signal stopped it."""
        checksum = self.options.checksum
        if checksum is not None:
            self.emit(Phase(None, Step.CHECKSUM, checksum.source))
            try:
                verify_checksum(self.image.path, checksum,
                                 lambda done, total: self._emit_now(
                                     Progress(None, Step.CHECKSUM, done, total)),
                                 self.cancel, stall_timeout=self.options.stall_timeout)
            except ChecksumCancelled:
                return False
            self.emit(Note(f"checksum ok ({checksum.algo} from {checksum.source})"))
        if self.image.compressed:
            copy = self._decompress()
            if copy is None:
                return False
            self._source = copy
        if self.options.trim is not None and not self.cancel():
            self._trim = self.options.trim(self._source)
            for note in self._trim.notes:
                self.emit(Note(note))
        return not self.cancel()

    @property
    def _unused(self) -> int:
        """Bytes of the image no drive gets: its file systems' free space."""
        return 0 if self._trim is None else self._trim.unused

    def _decompress(self) -> Image | None:
        """The image as a raw file in a private temporary directory (None if cancelled)."""
        parent = self.options.tmpdir or default_tmpdir()
        size = self.image.size
        try:
            self._copy_dir = tempfile.mkdtemp(prefix="popsicle-py-watch-", dir=parent)
            free = shutil.disk_usage(self._copy_dir).free
        except OSError as exc:
            raise ImageError(f"cannot make a temporary directory in {parent} for the "
                             f"decompressed image: {exc.strerror or exc}; set TMPDIR") from None
        if size is not None and size + COPY_MARGIN > free:
            raise ImageError(f"not enough room in {parent} for the decompressed image "
                             f"({format_size(size)} needed, {format_size(free)} free); set "
                             "TMPDIR to a directory with more room")
        path = os.path.join(self._copy_dir, "image.raw")
        self.emit(Phase(None, Step.DECOMPRESSING, self.image.name))
        done = decompress_to(self.image, path, self.cancel, lambda n: self._emit_now(
            Progress(None, Step.DECOMPRESSING, n, size)), self.options.stall_timeout)
        if done is None:
            return None
        if self._still is not None:  # checked as it was at the start, decompressed as is now
            try:
                self._still()
            except ImageChanged as exc:
                raise ImageError(f"{self.image.name} changed while it was decompressed "
                                 f"({exc.how}): start again") from None
        self._still = holding_still(path)  # every drive is written from the copy from now on
        self.emit(Note(f"decompressed {self.image.name} once ({format_size(done)}) to a "
                       "temporary raw copy; every drive is written from it"))
        copy = open_image(path)
        with contextlib.suppress(OSError):
            self._copy_devnums = drives.stack_of(os.stat(path).st_dev)
        return copy

    def _remove_copy(self) -> None:
        if self._copy_dir is not None:
            shutil.rmtree(self._copy_dir, ignore_errors=True)
            self._copy_dir = None

    def _watch(self) -> None:
        monitor = pyudev.Monitor.from_netlink(self.context)
        monitor.filter_by("block", "disk")
        monitor.start()
        self._present()
        self.emit(Watching())
        while not self.cancel() and not self._count_done():
            hear_signals_on_main_thread()
            self._deliver()
            device = monitor.poll(timeout=POLL_INTERVAL)
            if device is not None:
                self._uevent(device)
            self._take_waiting()

    def _count_done(self) -> bool:
        if self.options.drain is not None and self.options.drain.is_set():
            return all(s.finished.is_set() for s in self._started)
        count = self.options.count
        return (count is not None and len(self._started) >= count
                and all(s.finished.is_set() for s in self._started))

    def _join_all(self) -> None:
        """Wait for every drive's thread; short joins keep the signal handlers running."""
        for seen in self._started:
            thread = seen.thread
            while thread is not None and thread.is_alive():
                hear_signals_on_main_thread()
                self._deliver()
                thread.join(POLL_INTERVAL)

    # ------------------------------------------------------------------------------------
    # Drives appearing and going

    def _facts(self) -> SystemFacts:
        """What holds which drive, now.  Where the image lies is looked at once: it is held
        still for the session, and its share hanging later must not hang the session."""
        facts = drives.gather_facts(None if self._image_facts else self.image.path)
        image = self._image_facts = self._image_facts or facts
        return dataclasses.replace(facts, image_inode=image.image_inode,
                                   image_files=image.image_files,
                                   image_devnums=image.image_devnums | self._copy_devnums)

    def _present(self) -> None:
        """Drives plugged in before the session was asked for: left alone (noted), unless
        include_present; one plugged in since, while the image was prepared, arrives now."""
        facts = self._facts()
        left: list[str] = []
        for device in self.context.list_devices(subsystem="block", DEVTYPE="disk"):
            drive = drives.build_discovered(device, facts)
            self._media[drive.devnum] = drive.size
            if self.options.include_present or not was_present(self._present_before or {},
                                                               drive):
                self._arrived(device, drive)
                continue
            seen = Seen(device, drive)
            seen.present_at_start = True
            self._current[drive.devnum] = seen
            if drive.bus in drives.AUTO_BUSES:
                left.append(drive.describe())
        if left:
            self.emit(Note(f"left alone (plugged in before the start): {', '.join(left)}; "
                           "--include-present writes them too"))

    def _uevent(self, device: pyudev.Device) -> None:
        action = device.action
        devnum = drives.devnum_of(device)
        log.debug("uevent: %s %s", action, device.sys_path)
        if action == "add":
            self._arrived(device)
        elif action == "remove":
            self._gone(devnum)
        elif action == "change":
            # A card reader's medium comes and goes without the disk itself being added.
            size = sysfs_number(device, "size") or 0  # sectors: only 0 or not matters
            before = self._media.get(devnum)
            seen = self._current.get(devnum)
            busy = seen is not None and seen.in_flight
            if size == 0:
                self._waiting.pop(devnum, None)  # a card waiting for its turn is out again
                if seen is not None and busy and not seen.removed.is_set():
                    self._gone(devnum, medium=True)
                elif seen is not None:  # out: the next card is new, however like this one
                    seen.removed.set()
            elif before == 0 and busy:
                # The pulled card's job is still ending, and may hold the device open
                # (O_EXCL): the new card arrives once it is over.
                self._waiting[devnum] = device
            elif before == 0 or (seen is not None and swapped(seen.drive, device)):
                # A card in an empty reader, or one swapped for another quicker than the
                # kernel's media poll: one "change" with a new diskseq and no empty reader
                # in between.  The card we knew is gone (a job writing it ends "removed").
                if seen is not None and before != 0:
                    self._gone(devnum, medium=True)
                if seen is not None and seen.in_flight:
                    self._waiting[devnum] = device  # once its job is over (see above)
                else:
                    if seen is not None:
                        seen.present_at_start = False  # a reader that was there
                    self._arrived(device)
            self._media[devnum] = size

    def _take_waiting(self) -> None:
        """Cards that came in while the pulled card's job was ending, once it is over."""
        for devnum, device in list(self._waiting.items()):
            seen = self._current.get(devnum)
            if seen is None or not seen.in_flight:
                del self._waiting[devnum]
                self._arrived(device)

    def _arrived(self, device: pyudev.Device, drive: Drive | None = None) -> None:
        drive = drive or drives.build_discovered(device, self._facts())
        self._media[drive.devnum] = drive.size
        previous = self._current.get(drive.devnum)
        if previous is not None and previous.known and not previous.removed.is_set():
            if drives.same_media(previous.drive.identity, drive.identity) is None:
                # An "add" queued before the drive was listed as present, or another for one
                # being or already written (``udevadm trigger --action=add``): the same
                # appearance, not a new drive to count and write again.
                log.debug("%s: add event for a drive already known; ignored", drive.path)
                return
            # Another medium under the same device number (diskseq, size or serial moved):
            # the one we knew is gone, whatever events were lost on the way.
            self._gone(drive.devnum)
        seen = Seen(device, drive)
        self._current[drive.devnum] = seen
        admit, drain, first = self.options.admit, self.options.drain, self.options.first_seq
        reason = ineligibility(drive, self._source.size, self.options.max_size)
        if reason is None and drain is not None and drain.is_set():
            reason = "stopping: no new drive is written"
        count = self.options.count
        if reason is None and count is not None and len(self._started) >= count:
            reason = f"--count {count} reached"
        if reason is None and admit is not None:  # last: what it takes is taken for good
            reason = admit(drive, len(self._started) + first)
        seen.announced = True
        seen.info = drive_info(drive, len(self._started) + first if reason is None else None)
        self.emit(DriveAdded(drive.path, drive.label, drive.size, reason is None, reason,
                             seen.info))
        if reason is not None:
            return
        for note in link_notes([(drive.path, link_of(drive))]):  # a USB 2.0 port: say so
            self.emit(Note(note))
        seen.thread = threading.Thread(target=self._run_drive, args=(seen,), daemon=True,
                                       name=f"popsicle-watch-{drive.name}")
        self._started.append(seen)
        seen.thread.start()

    def _gone(self, devnum: int, *, medium: bool = False) -> None:
        self._waiting.pop(devnum, None)
        seen = self._current.get(devnum)
        if seen is None:
            return
        if not medium:
            del self._current[devnum]
        seen.removed.set()  # a drive in flight ends "removed"; a finished one is unaffected
        if seen.announced:
            self.emit(DriveRemoved(seen.path))

    # ------------------------------------------------------------------------------------
    # One drive, on its own thread

    def _run_drive(self, seen: Seen) -> None:
        keep_signals_for_main_thread()  # a flush to a slow stick must not hold up Ctrl-C
        try:
            self._flash(seen)
            if (seen.result is not None and seen.result.ok and self.options.power_off
                    and not seen.removed.is_set()):
                self._power_off(seen)
        except Exception as exc:  # a bug must end this drive, not the session
            log.debug("%s: unexpected error", seen.path, exc_info=True)
            if seen.result is None:
                self._end_unstarted(seen, f"{seen.path}: {exc}")
        finally:
            if seen.result is None:
                self._end_unstarted(seen, "cancelled", status=Status.CANCELLED)
            seen.finished.set()

    def _flash(self, seen: Seen) -> None:
        def cancel() -> bool:
            return self.cancel() or seen.removed.is_set()

        try:
            opened = open_targets([seen.drive], check=drives.still_same)
        except OpenError as exc:
            if node_gone(seen.drive):  # pulled before its "remove" was heard: said as such
                seen.removed.set()
            self._end_unstarted(seen, exc.lines[0] if exc.lines else
                                f"{seen.path}: could not be opened")
            return
        size = self._source.size or 0
        bucket = self.options.bucket_size
        block_map = None if self._trim is None else self._trim.block_map
        written = probe_mod.certainly_written(size, block_map, head=HEAD)  # known ahead
        probe = chain(self.options.reject,
                      probe_mod.checker([*range(bucket, size, bucket), size], written,
                                        head=HEAD)
                      if self.options.probe else None)
        options = FlashOptions(verify=self.options.verify, bucket_size=bucket,
                               buckets=self.options.buckets,
                               stall_timeout=self.options.stall_timeout, probe=probe,
                               certify=self.options.certify, speeds=self.options.speeds,
                               surface=self.options.surface,
                               before_head=self.options.before_head,
                               bmap=block_map, source_check=self._still)
        FlashJob(self._source, opened, options, lambda e: self._job_event(seen, e),
                 cancel, [seen.info] if seen.info is not None else ()).run()

    def _end_unstarted(self, seen: Seen, why: str, status: Status = Status.FAILED,
                       cause: Cause = Cause.ERROR) -> None:
        """End a drive whose job never ran (it could not be opened, or something broke)."""
        if status is Status.CANCELLED:
            cause = Cause.CANCELLED
        elif self.cancel() and not seen.removed.is_set():
            status, why, cause = Status.CANCELLED, "cancelled", Cause.CANCELLED
        self._job_event(seen, Phase(seen.path, Step.FAILED, why, cause))
        self._job_event(seen, Result(DriveResult(seen.path, status, 0, why, cause=cause)))

    def _power_off(self, seen: Seen) -> None:
        """Within the stall timeout, and not past a stop: a dead stick holds no session."""
        why = power_off_within(seen.device, seen.drive, cancel=self.cancel,
                               limit=self.options.stall_timeout)
        if why is None:
            self._job_event(seen, Phase(seen.path, Step.DONE, POWERED_OFF))  # with its seq
        elif seen.drive.bus != "sd":  # a card in a built-in reader is simply taken out
            self.emit(Note(f"{seen.path}: done, but not powered off ({why}); "
                           "it can be pulled"))
