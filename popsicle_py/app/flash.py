"""The flash use case: every check and refusal first, then the run, for any front end.

``prepare_flash(request)`` opens the image, finds its checksum and block map, checks the
targets (:mod:`popsicle_py.plan`), the user's access and the report file, and raises
:class:`Refused` (exit 2) before anything is written; the :class:`PreparedFlash` it returns
holds the checked plan and what to confirm.  ``run(view, cancel)`` then downloads (a zip URL),
checks the checksum, unmounts, opens the drives (their identity checked once more) and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from popsicle_py import events, probe
from popsicle_py.app import customize, sources
from popsicle_py.app.access import require_access
from popsicle_py.app.common import (
    HeldFiles,
    cancelled_before_writing,
    capacity_notes,
    emitter,
    hear_cancel,
    open_sinks,
    speed_rule,
)
from popsicle_py.app.confirm import Confirmation, target_rows
from popsicle_py.app.requests import FlashRequest, available_memory, ring_refusal
from popsicle_py.app.trim import CERTIFICATE_READS_ALL, NONE, Trim, map_holes, plan_trim
from popsicle_py.blockdev import BlockDevice
from popsicle_py.bmap import Bmap
from popsicle_py.drives import still_same_each
from popsicle_py.engine import HEAD
from popsicle_py.engine.config import PutBack
from popsicle_py.errors import Refused
from popsicle_py.flash import FlashJob, FlashOptions, open_targets
from popsicle_py.grading import capacity_check, chain
from popsicle_py.plan import Plan, make_plan, unmount_targets
from popsicle_py.ports import drive_info, link_notes, link_of
from popsicle_py.probe_plan import Ranges
from popsicle_py.protocols import View
from popsicle_py.signals import Cancellation
from popsicle_py.units import format_size

if TYPE_CHECKING:
    from popsicle_py.certify.writer import CertificateWriter
    from popsicle_py.report import Report


def capacity_probe(image_size: int | None, bucket_size: int, written: Ranges = ()
                   ) -> Callable[[BlockDevice, Callable[[], None]], PutBack | None]:
    """The probe a flash runs on each drive: every bucket boundary and the image's end.
    Its stamps inside ``written`` are left for the flash to overwrite, those in the head for
    the head's stamp (put back if the drive stops before it)."""
    end = image_size or 0
    return probe.checker([*range(bucket_size, end, bucket_size), end], written, head=HEAD)


class PreparedFlash(HeldFiles):
    """A flash that passed every check: the plan, the opened source, the checksum, the notes.

    Use it as a context manager (the report file is closed however it ends), show
    :attr:`confirmation`, then :meth:`run`.
    """

    def __init__(self, request: FlashRequest, source: sources.OpenedSource, plan: Plan,
                 block_map: Bmap | None, report: Report | None,
                 certificates: CertificateWriter | None = None,
                 personaliser: customize.Personaliser | None = None,
                 trim: Trim = NONE) -> None:
        self.request = request
        self.certificates = certificates
        self.source = source
        self.image = source.image
        self.checksum = source.checksum
        self.plan = plan
        self.block_map = block_map
        self.trim = trim
        self.report = report
        self.personaliser = personaliser  # --customize: each drive's step before its head
        self.infos = tuple(drive_info(d, i) for i, d in enumerate(plan.targets, 1))
        notes = list(plan.notes)
        if block_map is not None:
            notes.append(f"block map {block_map.path}: writing "
                         f"{format_size(block_map.mapped)} of "
                         f"{format_size(block_map.image_size)}")
            if block_map.unchecked is not None:
                notes.append(block_map.unchecked)
        notes.extend(trim.notes)
        #: What a person reads before the run (a terminal view shows them; JSON has none
        #: before its ``start`` event).
        self.notes = tuple(notes)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d.path for d in self.plan.targets)

    @property
    def labels(self) -> dict[str, str]:
        """Each target's model and size, for the rows of a terminal view."""
        return {d.path: d.label for d in self.plan.targets}

    @property
    def confirmation(self) -> Confirmation:
        count = len(self.plan.targets)
        these = "this drive" if count == 1 else f"these {count} drives"
        return Confirmation(
            f"Flash {self.image.path} ({format_size(self.image.size)})",
            target_rows(self.plan.targets, self.plan), self.plan.notes,
            f"Everything on {these} will be lost. Continue?")

    def run(self, view: View, cancel: Cancellation) -> events.Summary:
        """Write every target and verify it; the summary says how each drive ended.

        Refusals that come only now (a drive that changed since the plan, a drive that
        cannot be opened, a mount that cannot be undone) are raised, nothing written.
        """
        write, engine, grade = self.request.write, self.request.engine, self.request.grade
        emit = emitter(view, self.report)
        emit = self.trim.emitter(emit)  # each result says how much free space it skipped
        if self.personaliser is not None:
            emit = self.personaliser.emitter(emit)
        for note in self.source.notes:
            view.handle(events.Note(note))
        image = self.image
        sources.attach(image, view.handle, cancel)  # until the job relays it from its thread
        hear_cancel(cancel, self.request.engine.stall_timeout)  # Ctrl-C at a polkit prompt
        with contextlib.ExitStack() as downloads:
            try:
                if image.kind.needs_whole_file:  # a zip: its directory is at its end
                    from popsicle_py.watch import default_tmpdir

                    local = sources.download_first(
                        image, view.handle, cancel, default_tmpdir(), downloads,
                        judged=(self.request.source.image, self.request.source.force),
                        stall_timeout=engine.stall_timeout)
                    if local is None:
                        return self._cancelled(emit, view)
                    image = local
                if self.checksum is not None and write.checksum_while_writing \
                        and not image.tappable:
                    view.handle(events.Note(
                        f"{self.checksum.source}: a {image.format} is read through its "
                        "directory, not front to back, so its checksum is checked before "
                        "writing (--checksum-while-writing cannot)"))
                if self.checksum is not None and (not write.checksum_while_writing
                                                  or not image.tappable):
                    sources.check_checksum(image, self.checksum, view.handle, cancel,
                                           engine.stall_timeout)
                if self.request.targets.unmount and not cancel():
                    for line in unmount_targets(self.plan):
                        view.handle(events.Note(line))
                if cancel():
                    return self._cancelled(emit, view)
                opened = open_targets(self.plan.targets,
                                      check=still_same_each(self.plan.targets))
            except Refused:
                if cancel():
                    return self._cancelled(emit, view)
                view.close()
                raise
            size = image.size if self.block_map is None else self.block_map.image_size
            block_map = self.block_map or self.trim.block_map
            written = probe.certainly_written(size, block_map, head=HEAD,
                                              skip_identical=write.skip_identical,
                                              streamed=self.trim.select is not None)
            options = FlashOptions(
                verify=write.verify, bucket_size=engine.bucket_size, buckets=engine.buckets,
                stall_timeout=engine.stall_timeout, skip_identical=write.skip_identical,
                repair_attempts=write.repair_attempts,
                bmap=block_map, select=self.trim.select,
                checksum=self.checksum, checksum_checked=not write.checksum_while_writing,
                probe=chain(capacity_check(grade.capacity, grade.tolerance),
                            capacity_probe(size, engine.bucket_size, written)
                            if write.probe else None),
                speeds=speed_rule(grade), surface=grade.surface_test,
                certify=None if self.certificates is None
                else self.certificates.until(cancel),  # a signature ends at a Ctrl-C
                before_head=customize.step_of(self.personaliser),
                # A master drive written to, or an image file changed, meanwhile: all fail.
                source_check=sources.source_check(self.source))
            job = FlashJob(image, opened, options, emit, cancel, self.infos)
            sources.attach(image, job.relay, cancel)  # download news from the reader thread
            summary = job.run()
            view.close()
        self.close()
        return summary

    def _cancelled(self, emit: sources.Emit, view: View) -> events.Summary:
        summary = cancelled_before_writing(self.devices, self.infos, emit)
        view.close()
        return summary


def _whole_because(request: FlashRequest, source: sources.OpenedSource) -> str | None:
    """Why a flash must read every byte of the image, so trim cannot skip its free space."""
    if request.grade.certificate is not None:
        return CERTIFICATE_READS_ALL
    if request.write.checksum_while_writing and source.checksum is not None:
        return "--checksum-while-writing reads every byte"
    return None


def _image_checks(request: FlashRequest
                  ) -> tuple[sources.OpenedSource, str | None, Bmap | None, Trim]:
    """Every check that reads the image: it is opened, judged, its map and free space found."""
    write = request.write
    source = sources.open_source(request.source)
    sources.require_still(source.image.path)
    image_note = sources.sanity_note(source, request.source.image, request.source.force)
    block_map = sources.block_map(source.image, write.bmap, write.no_bmap)
    trim = map_holes(source.image, block_map) if block_map is not None else plan_trim(
        source.image, wanted=write.trim, whole_because=_whole_because(request, source))
    return source, image_note, block_map, trim


def prepare_flash(request: FlashRequest) -> PreparedFlash:
    """Every check of a flash, before anything is written; raises :class:`Refused`."""
    targets, write = request.targets, request.write
    if not targets.devices and not targets.all_usb:
        raise Refused(["no target drives: name devices or use --all-usb"])
    ring = ring_refusal(request.engine, available_memory(), len(targets.devices))
    if ring is not None:  # here, not in the CLI: a library's request is checked too
        raise Refused([ring])
    if write.no_bmap and write.bmap is not None:
        raise Refused([f"--bmap {write.bmap} and --no-bmap contradict each other; give one"])
    if write.skip_identical and request.grade.min_write_speed is not None:
        # Bytes found already there move at reading speed: a slow writer would pass.
        raise Refused(["--min-write-speed judges how fast a drive writes, and "
                       "--skip-identical does not write what the drive already holds: "
                       "give one"])
    try:
        source, image_note, block_map, trim = sources.watched_checks(
            lambda: _image_checks(request), request.source.image, request.engine.stall_timeout)
        size = source.image.size if block_map is None else block_map.image_size
        plan = make_plan(targets.devices, all_usb=targets.all_usb, image_path=source.image.path,
                         image_size=size, unmount=targets.unmount,
                         max_auto_size=targets.max_size)
    except Refused as exc:
        raise Refused([*exc.notes, *exc.lines]) from None
    if targets.all_usb:  # how many drives, known only now
        ring = ring_refusal(request.engine, available_memory(), len(plan.targets))
        if ring is not None:
            raise Refused([ring])
    if image_note is not None:
        plan = dataclasses.replace(plan, notes=(image_note, *plan.notes))
    personaliser = customize.for_flash(
        request.customize, source.image, [d.path for d in plan.targets],
        [drive_info(d, i) for i, d in enumerate(plan.targets, 1)])
    if personaliser is not None and request.customize is not None:
        if request.grade.certificate is not None:
            raise Refused(["--certificate vouches that a drive holds the image byte for byte, "
                           "and --customize changes its boot partition: give one"])
        plan = dataclasses.replace(
            plan, notes=(*plan.notes, customize.note(request.customize, personaliser)))
    links = [*link_notes([(d.path, link_of(d)) for d in plan.targets]),
             *capacity_notes(request.grade, plan.targets)]
    if links:
        plan = dataclasses.replace(plan, notes=(*plan.notes, *links))
    require_access([d.path for d in plan.targets], writing=True,
                   limit=request.engine.stall_timeout)
    if write.checksum_while_writing and source.checksum is not None and block_map is not None:
        # The write pass reads only the mapped ranges: the checksum would never be checked.
        raise Refused([f"--checksum-while-writing cannot check the checksum: the block map "
                       f"{block_map.path} reads only its ranges; drop it or give --no-bmap"])
    if request.grade.certificate is not None and block_map is not None:
        raise Refused([f"--certificate needs the whole image read back, and the block map "
                       f"{block_map.path} leaves holes unread: give --no-bmap"])
    report, certificates = open_sinks(request.grade, request.report, source.image.path,
                                      source.checksum, verify=write.verify,
                                      compressed=source.image.compressed)
    return PreparedFlash(request, source, plan, block_map, report, certificates,
                        personaliser, trim)
