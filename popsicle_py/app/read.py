"""The read use case: a drive read once into an image file, with its checksum and block map.

``prepare_read(request)`` checks the drive (it must hold still: not mounted read-write, not
open for writing, see :mod:`popsicle_py.master`) and OUTPUT (not there unless ``force``, never
anything but a file, not on the drive being read, room for it when its size is known, its
directory writable) and raises :class:`Refused` (exit 2) before anything is read.  A block map
beside OUTPUT that this read does not write (flash would trust it for the new image) is
refused too; ``force`` removes it before the new image is published.  ``run(view, cancel)``
reads into a temporary file beside OUTPUT (created with O_EXCL|O_NOFOLLOW) and renames it only
once everything is written and synced: OUTPUT never exists half-written under its final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

from popsicle_py import drives, events, fsmap, master, reading
from popsicle_py.app.access import require_access
from popsicle_py.app.read_checks import creatable, output_refusals, temp_name, watched_output
from popsicle_py.blockdev import BlockDevice, OpenSpec, confirmed, open_for_reading
from popsicle_py.defaults import DEFAULT_STALL_TIMEOUT
from popsicle_py.drives import Drive
from popsicle_py.errors import Refused, Stalled
from popsicle_py.failures import describe_error, failure, hung_call, hung_output
from popsicle_py.pacing import STALL_BYTES, Clock
from popsicle_py.ports import drive_info
from popsicle_py.protocols import View
from popsicle_py.records import record
from popsicle_py.signals import Cancellation, keep_signals_for_main_thread
from popsicle_py.units import format_size

if TYPE_CHECKING:
    from popsicle_py.usage.ranges import Range


@record
class ReadRequest:
    """Read ``device`` into ``output`` (compressed by its suffix: .zst, .xz, .gz, or raw)."""

    device: str
    output: str
    #: Replace an existing OUTPUT (and its .sha256 and .bmap).
    force: bool = False
    #: Also write bmaptool's block map of the blocks that hold data.
    bmap: bool = False
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    bucket_size: int = reading.DEFAULT_BUCKET


class OutputError(OSError):
    """OUTPUT (or its sidecars) could not be written: the file system's fault, not the drive's."""


class PreparedRead:
    """A read that passed every check: the drive, OUTPUT's format and the files to write."""

    def __init__(self, request: ReadRequest, drive: Drive, output: str, files: tuple[str, ...],
                 stale: tuple[str, ...] = ()) -> None:
        self.request = request
        self.drive = drive
        self.output = output
        self.format = reading.format_for(output)
        self.files = files  # OUTPUT, its .sha256, [its .bmap]
        self.stale = stale  # old block maps flash would take for OUTPUT: --force removes them
        self.info = drive_info(drive, 1)

    @property
    def labels(self) -> dict[str, str]:
        return {self.drive.path: self.drive.label}

    @property
    def notes(self) -> tuple[str, ...]:
        what = "raw" if self.format == "raw" else f"{self.format}-compressed"
        return (f"reading {self.drive.path} ({format_size(self.drive.size)}) into "
                f"{self.output} ({what})",)

    def run(self, view: View, cancel: Cancellation) -> events.Summary:
        """Read the drive once into OUTPUT; the summary's one result says how it ended."""
        from popsicle_py.app.common import open_or_cancelled  # images: not at start-up

        device = open_or_cancelled(self.open, cancel, view, self.request.stall_timeout)
        if device is None:  # a signal first, or at a polkit prompt: nothing read
            return cancelled_before_reading((self,), view)
        return self.read_opened(device, view, cancel)

    def open(self) -> BlockDevice:
        """The drive, opened to be read, still the one checked; or :class:`Refused`."""
        return _open(self.drive)

    def read_opened(self, device: BlockDevice, view: View, cancel: Cancellation,
                    stopped: Callable[[], bool] | None = None) -> events.Summary:
        """Read the opened drive (closed here, however it ends) once into OUTPUT; ``stopped``
        (default: ``cancel``) ends it early.  A second signal's quit at once removes the
        temporary files too."""
        path = self.drive.path
        started = time.monotonic()
        temps = [temp_name(f) for f in self.files]
        with cancel.removed_on_quit(temps):
            result = self._read_into(temps, device, view, stopped or cancel, started)
        if result.elapsed is None:  # how long it ran before it failed or was stopped
            result = dataclasses.replace(result, elapsed=time.monotonic() - started)
        ok = result.status is events.Status.OK
        view.handle(events.Phase(path, events.Step.DONE if ok else events.Step.FAILED,
                                 result.error or result.status.value, result.cause))
        view.handle(events.Result(result))
        summary = events.Summary((result,), cancelled=result.status is events.Status.CANCELLED)
        view.handle(summary)
        view.close()
        return summary

    def _read_into(self, temps: list[str], device: BlockDevice, view: View,
                   stopped: Callable[[], bool], started: float) -> events.DriveResult:
        """The read, its files published or removed: how it ended."""
        path = self.drive.path
        files = _Files(os.path.dirname(self.output), self.request.stall_timeout)
        result: events.DriveResult | None = None
        publishing = False
        try:
            still = master.Stillness(path)
            view.handle(events.Phase(path, events.Step.READING))
            done = self._read(device, temps, view, stopped, files)
            if done is None:
                result = events.DriveResult(path, events.Status.CANCELLED, 0, "cancelled",
                                            cause=events.Cause.CANCELLED, drive=self.info)
            else:
                still.check()
                publishing = True  # a hang from here on may leave what it named
                files.call(lambda: _publish(temps, self.files, self.stale,
                                            lambda: files.hung))
                elapsed = time.monotonic() - started
                result = events.DriveResult(path, events.Status.OK, self.drive.size,
                                            elapsed=elapsed, drive=self.info)
                view.handle(events.Note(f"{self.output}: {format_size(done.written)}, sha256 "
                                        f"{done.sha256}"))
        except reading.OutputStalled as exc:
            files.hung = True
            result = events.DriveResult(path, events.Status.FAILED, 0, _stalled(
                self.output, exc.limit), cause=events.Cause.ERROR, drive=self.info)
        except OutputError as exc:
            cause = events.Cause.NO_SPACE if exc.errno == errno.ENOSPC else events.Cause.ERROR
            text = _stalled(self.output, exc.limit) if isinstance(exc, _FilesStalled) else \
                f"{self.output}: {exc.strerror}"
            result = events.DriveResult(path, events.Status.FAILED, 0, text, cause=cause,
                                        drive=self.info)
        except master.DriveChanged as exc:
            result = events.DriveResult(path, events.Status.FAILED, 0,
                                        f"{path} changed while it was read ({exc.how}): "
                                        f"{self.output} was not written",
                                        cause=events.Cause.SOURCE, drive=self.info)
        except OSError as exc:
            why = failure(exc, path)
            result = events.DriveResult(path, events.Status.FAILED, 0, why.text,
                                        cause=why.cause, drive=self.info)
        finally:
            device.close()
            if device.in_call:  # the reading thread is still in the kernel: the exit waits
                view.handle(events.Note(hung_call(path)))
            if (result is None or result.status is not events.Status.OK) \
                    and not files.remove(temps, hurry=stopped() or result is None):
                view.handle(events.Note(hung_output(files.folder,
                                                    self.output if publishing else None)))
            files.close()
        return result

    def _read(self, device: BlockDevice, temps: list[str], view: View,
              stopped: Callable[[], bool], files: _Files) -> reading.Read | None:
        size, path = self.drive.size, self.drive.path
        sink = _GuardedSink(files.call(lambda: _create(temps[0])))
        files.sink = sink
        try:
            mapper = None
            if self.request.bmap:  # on a watched thread: a drive that hangs here fails
                found = _watched_free_ranges(device, size, self.request.stall_timeout, stopped)
                if found is None:
                    return None
                free, used, kept = found
                block = reading.BMAP_BLOCK
                mapper = reading.Mapper(free=fsmap.keep_edges(fsmap.free_mask(free, size, block),
                                                              block))
                if used:
                    view.handle(events.Note("block map: free blocks left out, as the file "
                                            f"systems say ({'; '.join(used)})"))
                for line in kept:  # a file system not trusted: why its free blocks are kept
                    view.handle(events.Note(f"block map: {line}"))

            def progress(done: int) -> None:
                view.handle(events.Progress(path, events.Step.READING, done, size))

            done = reading.read_drive(
                device, size, reading.encoder(self.format, sink, size), sink, mapper=mapper,
                bucket=self.request.bucket_size, progress=progress, stopped=stopped,
                stall_timeout=self.request.stall_timeout)
            if done is None:
                return None
            fd = sink.fd
            files.call(lambda: _guarded(os.fsync, fd), moved=_writes_of(fd))
            if stopped():  # Ctrl-C during that sync (a slow disk): cancelled, never ok
                return None
        finally:
            sink.close()
        name = os.path.basename(self.output)
        files.call(lambda: _write_small(temps[1], reading.sidecar_line(done.sha256, name)))
        if mapper is not None:
            text = reading.render_bmap(size, mapper.block, mapper.finish(size))
            files.call(lambda: _write_small(temps[2], text))
        return done


def _watched_free_ranges(device: BlockDevice, size: int, stall_timeout: float,
                        stopped: Callable[[], bool]
                        ) -> tuple[list[Range], list[str], list[str]] | None:
    """:func:`fsmap.free_ranges` on a thread of its own (None: stopped): the drive's
    metadata read before the read proper is on the stall clock, and Ctrl-C is heard."""
    from popsicle_py.engine.watched import WorkStalled, watched_reads

    try:
        return watched_reads(lambda: fsmap.free_ranges(device, size),
                             stall_timeout=stall_timeout, cancel=stopped, name="free-blocks")
    except WorkStalled as exc:
        raise Stalled(f"stalled: no progress for {exc.limit:g} s while its file systems' "
                      "free blocks were read") from None


def cancelled_before_reading(jobs: tuple[PreparedRead, ...], view: View) -> events.Summary:
    """A signal before any drive was read: every pair reported cancelled, no OUTPUT made."""
    results = []
    for job in jobs:
        result = events.DriveResult(job.drive.path, events.Status.CANCELLED, 0,
                                    "cancelled before reading", cause=events.Cause.CANCELLED,
                                    drive=job.info)
        view.handle(events.Phase(job.drive.path, events.Step.FAILED, result.error,
                                 result.cause))
        view.handle(events.Result(result))
        results.append(result)
    summary = events.Summary(tuple(results), cancelled=True)
    view.handle(summary)
    view.close()
    return summary


class _GuardedSink(reading.Sink):
    """The sink, its errors turned into :class:`OutputError` (the file's, not the drive's)."""

    def put(self, data: bytes | memoryview) -> int:
        try:
            return super().put(data)
        except OSError as exc:
            raise OutputError(exc.errno, exc.strerror) from None


def _stalled(output: str, limit: float) -> str:
    return (f"writing {output} stalled: no call to {os.path.dirname(output)} returned for "
            f"{limit:g} s (is the disk it is on hung?)")


class _FilesStalled(OutputError):
    """A call to OUTPUT's file system did not return (or a sync made no progress) in time."""

    def __init__(self, limit: float) -> None:
        super().__init__(errno.ETIMEDOUT, f"no call returned for {limit:g} s")
        self.limit = limit


T = TypeVar("T")


class _Files:
    """OUTPUT's file system calls (create, sync, sidecars, renames, removals), one at a time
    and in order on a thread of their own, waited for in short steps: a file system that
    stops answering (a hung disk or share, a frozen file system) fails the read after the
    stall timeout instead of holding the process, Ctrl-C unheard, for good.  In order, so a
    removal never runs before a late create."""

    def __init__(self, folder: str, stall_timeout: float | None) -> None:
        self.folder = folder
        self.stall_timeout = stall_timeout
        #: A call did not return in time (or OUTPUT's writes stalled): later calls wait
        #: behind it, and the removal of the partial files is not waited for.
        self.hung = False
        #: OUTPUT's sink, once made: a write of it that has not returned means the same.
        self.sink: reading.Sink | None = None
        self._calls: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        keep_signals_for_main_thread()
        while (call := self._calls.get()) is not None:
            call()

    def close(self) -> None:
        """The thread ends once the calls given are made."""
        self._calls.put(None)

    def _submit(self, work: Callable[[], T]) -> tuple[threading.Event, list[T | BaseException]]:
        done, out = threading.Event(), cast("list[T | BaseException]", [])

        def run() -> None:
            try:
                out.append(work())
            except BaseException as exc:  # raised in the waiting thread
                out.append(exc)
            finally:
                done.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="popsicle-files",
                                            daemon=True)
            self._thread.start()
        self._calls.put(run)
        return done, out

    def _wait(self, done: threading.Event, moved: Callable[[], int] | None = None) -> None:
        """Until ``done``; :class:`_FilesStalled` (and ``hung``) once the call has not
        returned for the stall timeout (``moved``: bytes written since last asked, for a
        sync that is slow but moving)."""
        clock = Clock()
        clock.waiting = False
        while not done.wait(_POLL):
            if moved is not None:
                clock.advance(moved())
            limit = self.stall_timeout
            if limit is not None and clock.stalled(time.monotonic(), limit):
                self.hung = True
                raise _FilesStalled(limit)

    def call(self, work: Callable[[], T], moved: Callable[[], int] | None = None) -> T:
        """``work()``'s result or exception, once it returns (see :meth:`_wait`)."""
        done, out = self._submit(work)
        self._wait(done, moved)
        result = out[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def remove(self, paths: list[str], hurry: bool) -> bool:
        """Remove ``paths`` (after the calls before); True once done.  Waited for at most
        ``_REMOVE_GRACE`` when OUTPUT hangs: on a file system that answers, removing takes
        far less; on one that does not, the call is then in the kernel, and completes before
        the process can end (see :func:`hung_output`).  ``hurry`` (a stop) waits that long
        too, then by the stall rule only while a call before it (a slow sync) goes on."""
        begun = threading.Event()

        def unlink_all() -> None:
            begun.set()
            for path in paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        done, _ = self._submit(unlink_all)
        hung = self.hung or (self.sink is not None and self.sink.in_call)
        if hurry or hung:
            if done.wait(_REMOVE_GRACE):
                return True
            if hung or begun.is_set():  # in the kernel, or behind a call that is
                return False
        try:
            self._wait(done)
        except _FilesStalled:
            return False
        return True


#: How often a wait for OUTPUT's file system looks at the clock (and hears a signal).
_POLL = 0.1
#: See :meth:`_Files.remove`.
_REMOVE_GRACE = 1.0


def _writes_of(fd: int) -> Callable[[], int]:
    """Bytes written to the disk under ``fd``'s file system since last asked (its block
    device's count, in /sys), for a sync that takes long on a slow disk: such a sync moves,
    a hung one does not.  Where no device can be seen (NFS, tmpfs, btrfs), a sync is never
    called stalled: a stall that cannot be seen is never called."""
    st = os.fstat(fd)
    stat_file = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    seen: int | None = None

    def moved() -> int:
        nonlocal seen
        try:
            with open(stat_file, "rb") as f:
                sectors = int(f.read().split()[6])
        except (OSError, ValueError, IndexError):
            return STALL_BYTES
        before, seen = seen, sectors
        return 0 if before is None else (sectors - before) * 512
    return moved


def _guarded(call: object, *args: object) -> None:
    try:
        call(*args)  # type: ignore[operator]
    except OSError as exc:
        raise OutputError(exc.errno, exc.strerror) from None


def _open(drive: Drive) -> BlockDevice:
    """The drive, opened to be read from the device (O_DIRECT), still the one checked and
    still free to be read: the rules of a drive read (:func:`master.refusals`) asked again,
    not those of a drive written (a read-only mount is no reason to refuse it).

    (Not through :func:`popsicle_py.flash.open_targets`: ``read`` needs none of the engine,
    whose import costs a start-up it does not need.)"""
    changed = drives.media_changed(drive)
    problems = [changed] if changed else master.refusals(drive.path)
    if problems:
        raise Refused(problems)
    spec = OpenSpec(drive.path, drive.size, drive.logical_block_size)
    try:
        return confirmed(open_for_reading(spec), drive.identity)
    except OSError as exc:
        raise Refused([describe_error(exc, drive.path)]) from exc  # read_many: polkit's?


def _create(path: str) -> int:
    """A new file that is ours alone: never an existing one, never through a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        raise OutputError(exc.errno, f"cannot create {path}: {exc.strerror}") from None


def _write_small(path: str, text: str | bytes) -> None:
    fd = _create(path)
    try:
        data = text.encode() if isinstance(text, str) else text
        _guarded(os.write, fd, data)
        _guarded(os.fsync, fd)
    finally:
        os.close(fd)


def _publish(temps: list[str], finals: tuple[str, ...], stale: tuple[str, ...],
             given_up: Callable[[], bool] = lambda: False) -> None:
    """Old block maps gone first (never a new OUTPUT beside an old map, even for a moment:
    the one replaced by this read's map too), then OUTPUT, then its sidecars; the directory
    synced so the names last a power cut.  Once ``given_up()`` (a call here outlasted the
    stall timeout, and the read was reported failed), no further name is given, and those
    given are taken back: a failure leaves nothing under OUTPUT's name."""
    for name in (*stale, *finals[2:]):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(exc.errno, f"cannot remove {name}: {exc.strerror}") from None
    for done, (temp, final) in enumerate(zip(temps, finals, strict=True)):
        if given_up():
            for name in finals[:done]:
                with contextlib.suppress(OSError):
                    os.unlink(name)
            raise OutputError(errno.ETIMEDOUT, "given up")
        _guarded(os.rename, temp, final)
    folder = os.path.dirname(finals[0])
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _guarded(os.fsync, fd)
    finally:
        os.close(fd)


def checked_read(request: ReadRequest) -> PreparedRead:
    """Every check of a read but :func:`creatable`; raises :class:`Refused`."""
    if not request.output:  # "" would be taken for the current directory
        raise Refused(["the output's name is empty (an unset variable?); name a file such "
                       "as stick.img.zst"])
    if request.output == "-":  # flash's standard input: never a file named "-" instead
        raise Refused(["read writes a file, not standard output (-): name a file such as "
                       "stick.img.zst (and its .sha256 is written beside it)"])
    drive = drives.drive_for_path(request.device)
    output = os.path.abspath(request.output)
    written = reading.bmap_path_for(output) if request.bmap else None
    files = (output, reading.sidecar_path_for(output), *((written,) if written else ()))
    stale = tuple(name for name in reading.map_paths_for(output) if name != written)
    lines = master.refusals(drive.path)
    if not drive.size:
        lines.append(f"{drive.path} holds nothing to read ({drive.reason or 'size 0'})")
    lines += watched_output(lambda: output_refusals(output, files, request.force, drive,
                                                    reading.format_for(output), stale),
                            output, request.stall_timeout)
    if lines:
        raise Refused(lines)
    require_access([drive.path], writing=False, limit=request.stall_timeout)
    return PreparedRead(request, drive, output, files, stale)


def prepare_read(request: ReadRequest) -> PreparedRead:
    """Every check of a read, before anything is read; raises :class:`Refused`."""
    job = checked_read(request)
    lines = watched_output(lambda: creatable(job.output, job.files), job.output,
                           request.stall_timeout)
    if lines:
        raise Refused(lines)
    return job
