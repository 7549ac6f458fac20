"""Several drives read into several files in one run: ``read DEVICE OUTPUT [DEVICE OUTPUT]...``.

Each pair is prepared as :func:`popsicle_py.app.read.prepare_read` prepares one, and the pairs
are checked against each other (a drive named twice, two pairs writing the same file, or one
writing where flash looks for another's block map, an OUTPUT on any drive being read) before
anything is read.  ``run`` opens every drive first (a refusal: exit 2, nothing read), then
reads them all at once, one thread each under the engine's
:class:`~popsicle_py.engine.supervisor.Supervisor`, whose outbox hands every event to the
view on the calling thread; one drive's failure does not stop the others, a cancel stops
them all, and none leaves its OUTPUT under its final name.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from popsicle_py import drives, events, master, reading
from popsicle_py.app.read import (
    PreparedRead,
    ReadRequest,
    cancelled_before_reading,
    checked_read,
)
from popsicle_py.app.read_checks import creatable, watched_output
from popsicle_py.blockdev import BlockDevice
from popsicle_py.defaults import DEFAULT_STALL_TIMEOUT
from popsicle_py.errors import Refused
from popsicle_py.failures import failure
from popsicle_py.ports import drive_info
from popsicle_py.protocols import View
from popsicle_py.records import record
from popsicle_py.signals import Cancellation
from popsicle_py.units import format_size


@record
class ReadManyRequest:
    """Read each pair's DEVICE into its OUTPUT; the options apply to every pair."""

    pairs: tuple[tuple[str, str], ...]
    force: bool = False
    bmap: bool = False
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    bucket_size: int = reading.DEFAULT_BUCKET


def pairs_of(args: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``DEVICE OUTPUT [DEVICE OUTPUT]...`` as pairs; raises :class:`Refused` when odd."""
    if not args or len(args) % 2:
        raise Refused(f"read takes DEVICE OUTPUT pairs: {len(args)} argument"
                      f"{'' if len(args) == 1 else 's'} given, the last OUTPUT missing")
    return tuple((args[i], args[i + 1]) for i in range(0, len(args), 2))


def _same_file_key(path: str) -> tuple[str, str]:
    """One file however it is spelled: its directory's real path and its name, case folded
    (on FAT, exFAT or NTFS, where images are often kept, ``A.img`` and ``a.img`` are one
    file: the second rename would replace the first pair's image, both reported ok)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.realpath(folder), name.casefold()


def _clash(job: PreparedRead, holder: PreparedRead, name: str) -> str:
    """The line for ``name`` of ``job`` that is also a file of ``holder``."""
    if job.output == holder.output:
        return (f"{job.output} is the OUTPUT of two pairs ({holder.request.device}, "
                f"{job.request.device}): give each pair its own OUTPUT")
    what = "" if name == job.output else f" ({os.path.basename(name)})"
    theirs = next((f for f in holder.files if _same_file_key(f) == _same_file_key(name)),
                  name)
    if os.path.basename(theirs) != os.path.basename(name) and \
            os.path.basename(theirs).casefold() == os.path.basename(name).casefold():
        return (f"{job.output}{what} and {theirs} differ only in case: on a FAT, exFAT or "
                "NTFS file system they are one file; give each pair its own OUTPUT")
    return (f"{job.output}{what} would overwrite a file of {holder.output}: give each pair "
            "its own OUTPUT")


def cross_refusals(jobs: Sequence[PreparedRead]) -> list[str]:
    """Why the pairs cannot run together (empty: they can), one line each."""
    lines: list[str] = []
    seen_drives: dict[int, PreparedRead] = {}
    for job in jobs:
        first = seen_drives.setdefault(job.drive.devnum, job)
        if first is not job:
            lines.append(f"{job.drive.path} is named twice ({first.request.device}, "
                         f"{job.request.device}): read each drive once")
    owner: dict[tuple[str, str], PreparedRead] = {}
    clashes: set[tuple[int, int]] = set()  # one line for two pairs, however many files clash
    for job in jobs:
        for name in job.files:
            holder = owner.setdefault(_same_file_key(name), job)
            if holder is job or (id(job), id(holder)) in clashes:
                continue
            clashes.add((id(job), id(holder)))
            lines.append(_clash(job, holder, name))
    for job in jobs:  # a file one pair writes where flash looks for another's block map
        for name in job.stale:
            holder = owner.get(_same_file_key(name), job)
            if holder is not job:
                what = "" if name == holder.output else f" ({os.path.basename(name)})"
                lines.append(f"{holder.output}{what} would be where flash looks for the block "
                             f"map of {job.output}: give each pair its own OUTPUT")
    for job in jobs:
        devnums, _ = drives.path_storage(os.path.dirname(job.output))
        for other in jobs:
            if other is not job and devnums & master.family(other.drive.devnum):
                lines.append(f"{job.output} is on {other.drive.path}, a drive being read; "
                             "write it elsewhere")
    return list(dict.fromkeys(lines + _room_refusals(jobs)))


def _room_refusals(jobs: Sequence[PreparedRead]) -> list[str]:
    """Raw OUTPUTs sharing a file system need room for all of them (each alone was checked)."""
    needed: dict[int, list[PreparedRead]] = {}
    for job in jobs:
        if job.format == "raw":
            needed.setdefault(os.stat(os.path.dirname(job.output)).st_dev, []).append(job)
    lines: list[str] = []
    for group in needed.values():
        if len(group) < 2:
            continue
        folder = os.path.dirname(group[0].output)
        st = os.statvfs(folder)
        room, total = st.f_bavail * st.f_frsize, sum(job.drive.size for job in group)
        if room < total:
            names = ", ".join(job.output for job in group)
            lines.append(f"not enough room for {names}: {format_size(total)} needed, "
                         f"{format_size(room)} free in {folder}")
    return lines


def prepare_reads(request: ReadManyRequest) -> ReadMany:
    """Every check of every pair, before anything is read; raises :class:`Refused`."""
    jobs: list[PreparedRead] = []
    lines: list[str] = []
    for device, output in request.pairs:
        try:
            jobs.append(checked_read(ReadRequest(
                device, output, force=request.force, bmap=request.bmap,
                stall_timeout=request.stall_timeout, bucket_size=request.bucket_size)))
        except Refused as exc:
            lines += exc.lines
    if not lines:
        lines = cross_refusals(jobs)
    if not lines:  # last: it creates (and removes) a file beside each OUTPUT
        lines = [line for job in jobs for line in watched_output(
            functools.partial(creatable, job.output, job.files), job.output,
            request.stall_timeout)]
    if lines:
        raise Refused(list(dict.fromkeys(lines)))
    for number, job in enumerate(jobs, 1):  # numbered as flash numbers its drives
        job.info = drive_info(job.drive, number)
    return ReadMany(tuple(jobs))


@record
class _Event:
    id: int
    event: events.WatchEvent


@record
class _Errored:
    id: int
    error: OSError


class _LaneView:
    """A read's view inside its thread: every event posted to the supervisor's outbox; the
    summary and the closing are the whole run's, not one read's."""

    def __init__(self, post: object, lane_id: int) -> None:
        self._post = post
        self._id = lane_id

    def handle(self, event: events.WatchEvent) -> None:
        if not isinstance(event, events.Summary):
            self._post(_Event(self._id, event))  # type: ignore[operator]

    def close(self) -> None:
        pass

    def announce(self, text: str) -> None:
        pass


def _open_each(jobs: Sequence[PreparedRead]) -> list[BlockDevice]:
    """Every pair's drive opened, or none: every refusal said, in one :class:`Refused`."""
    opened: list[BlockDevice] = []
    lines: list[str] = []
    for job in jobs:
        try:
            opened.append(job.open())
        except Refused as exc:
            lines += exc.lines
            why = exc.__cause__
            if isinstance(why, OSError) and failure(why, "").cause is events.Cause.PERMISSION:
                break  # refused (polkit): asking for the next drives' passwords is in vain
    if lines:
        for device in opened:
            device.close()
        raise Refused(lines)
    return opened


class ReadMany:
    """Reads that passed every check, alone and together."""

    def __init__(self, jobs: tuple[PreparedRead, ...]) -> None:
        self.jobs = jobs

    @property
    def labels(self) -> dict[str, str]:
        return {path: label for job in self.jobs for path, label in job.labels.items()}

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(note for job in self.jobs for note in job.notes)

    def run(self, view: View, cancel: Cancellation) -> events.Summary:
        """Read every drive at once; the summary holds one result per drive, in pair order."""
        if len(self.jobs) == 1:
            return self.jobs[0].run(view, cancel)
        from popsicle_py.app.common import open_or_cancelled
        from popsicle_py.engine import Cancelled
        from popsicle_py.engine.supervisor import Lane, Supervisor

        # Every drive opened before any is read, as flash opens all before writing: a
        # refusal (polkit's, a drive changed) is exit 2 with nothing read.
        devices = open_or_cancelled(lambda: _open_each(self.jobs), cancel, view,
                                    self.jobs[0].request.stall_timeout)
        if devices is None:
            return cancelled_before_reading(self.jobs, view)

        results: dict[int, events.DriveResult] = {}

        def deliver(message: object) -> None:
            if isinstance(message, _Event):
                if isinstance(message.event, events.Result):
                    results[message.id] = message.event.result
                view.handle(message.event)
            elif isinstance(message, _Errored):
                job = self.jobs[message.id]
                result = events.DriveResult(job.drive.path, events.Status.FAILED, 0,
                                            str(message.error.strerror or message.error),
                                            cause=events.Cause.ERROR, drive=job.info)
                results[message.id] = result
                view.handle(events.Phase(job.drive.path, events.Step.FAILED, result.error,
                                         result.cause))
                view.handle(events.Result(result))

        def task(lane: Lane) -> None:
            lane_view = _LaneView(lane.post, lane.id)
            self.jobs[lane.id].read_opened(devices[lane.id], lane_view, cancel,
                                           lambda: lane.stopped)

        supervisor = Supervisor([job.drive.path for job in self.jobs], deliver, cancel,
                                stall_timeout=None, errored=_Errored, name="read")
        cancelled = False
        try:
            supervisor.run(task)
        except Cancelled:
            cancelled = True
        finally:
            for device in devices:  # a lane that never started (each read closes its own)
                device.close()
        for i, job in enumerate(self.jobs):
            if i not in results:
                result = events.DriveResult(job.drive.path, events.Status.CANCELLED, 0,
                                            "cancelled", cause=events.Cause.CANCELLED,
                                            drive=job.info)
                results[i] = result
                view.handle(events.Phase(job.drive.path, events.Step.FAILED, "cancelled",
                                         result.cause))
                view.handle(events.Result(result))
        ordered = tuple(results[i] for i in range(len(self.jobs)))
        cancelled = cancelled or any(r.status is events.Status.CANCELLED for r in ordered)
        summary = events.Summary(ordered, cancelled=cancelled)
        view.handle(summary)
        view.close()
        return summary
