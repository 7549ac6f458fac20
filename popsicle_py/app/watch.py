"""The duplicator use case: one image, every eligible drive plugged in, each on its own."""

from __future__ import annotations

import contextlib
import functools

from popsicle_py import drives, events
from popsicle_py import watch as watch_mod
from popsicle_py.app import customize, sources
from popsicle_py.app.access import require_future_access
from popsicle_py.app.common import HeldFiles, emitter, hear_cancel, open_sinks, speed_rule
from popsicle_py.app.confirm import Confirmation, target_rows
from popsicle_py.app.requests import WatchRequest
from popsicle_py.app.trim import CERTIFICATE_READS_ALL, plan_trim
from popsicle_py.certify.writer import CertificateWriter
from popsicle_py.drives import Drive
from popsicle_py.errors import Refused
from popsicle_py.grading import capacity_check
from popsicle_py.protocols import View
from popsicle_py.report import Report
from popsicle_py.signals import Cancellation
from popsicle_py.units import format_size
from popsicle_py.watch_seen import disks_present


class PreparedWatch(HeldFiles):
    """A duplicator session that passed every check; :meth:`run` watches until the count or a
    signal.  Use it as a context manager: the report file is closed however it ends."""

    def __init__(self, request: WatchRequest, source: sources.OpenedSource,
                 present: tuple[Drive, ...], udev_note: str | None, image_note: str | None,
                 report: Report | None, certificates: CertificateWriter | None = None,
                 personaliser: customize.Personaliser | None = None) -> None:
        self.request = request
        self.certificates = certificates
        self.source = source
        self.image = source.image
        self.present = present
        self.udev_note = udev_note
        self.image_note = image_note
        self.report = report
        self.personaliser = personaliser  # --customize: each drive's step before its head
        self.exit_status = 0

    @property
    def notes(self) -> tuple[str, ...]:
        """What a person reads before the run (JSON has none before its first event)."""
        return () if self.image_note is None else (self.image_note,)

    @property
    def confirmation(self) -> Confirmation:
        notes = tuple(n for n in (self.udev_note, self.image_note, self.customize_note)
                      if n is not None)
        return Confirmation(
            f"Duplicator mode: {self.image.path} ({format_size(self.image.size)})",
            target_rows(self.present), notes, "Continue?", watch=True,
            warning="Every eligible USB/SD drive plugged in from now on will be overwritten.")

    @property
    def customize_note(self) -> str | None:
        options = self.request.customize
        if self.personaliser is None or options is None:
            return None
        return customize.note(options, self.personaliser)

    def _trim_rule(self) -> watch_mod.TrimRule | None:
        """How the session plans, once the raw image (or raw copy) is at hand, what the drives
        get: flash's rules (a certificate reads every byte back, so nothing is skipped)."""
        if not self.request.trim:
            return None
        whole_because = None if self.certificates is None else CERTIFICATE_READS_ALL
        return functools.partial(plan_trim, wanted=True, whole_because=whole_because)

    def run(self, view: View, cancel: Cancellation, *,
            hooks: watch_mod.WatchOptions | None = None) -> events.Summary:
        """Download (a URL), check, decompress once, then write each drive as it comes.

        ``hooks`` brings a station's ``admit``, ``drain``, ``first_seq`` and ``still`` (the
        rest of it is ignored).

        :attr:`exit_status` says how the session ended (a signal while no drive was being
        written is the normal end of an open-ended session).
        """
        request = self.request
        present = disks_present()  # left alone; one plugged in from now on is new
        hear_cancel(cancel, request.stall_timeout)  # as flash's: a signal, a hung daemon
        if self.udev_note is not None:
            view.handle(events.Note(self.udev_note))
        emit = emitter(view, self.report)
        admit = hooks.admit if hooks else None
        if self.personaliser is not None:
            emit = self.personaliser.emitter(emit)
            admit = customize.first_reason(admit, self.personaliser.admit)
        options = watch_mod.WatchOptions(count=request.count, verify=request.verify,
                                         power_off=request.power_off,
                                         include_present=request.include_present,
                                         max_size=request.max_size,
                                         stall_timeout=request.stall_timeout,
                                         checksum=self.source.checksum, probe=request.probe,
                                         admit=admit, before_head=customize.step_of(
                                             self.personaliser),
                                         drain=hooks.drain if hooks else None,
                                         first_seq=hooks.first_seq if hooks else 1,
                                         still=hooks.still if hooks else None,
                                         certify=None if self.certificates is None
                                         else self.certificates.until(cancel),
                                         speeds=speed_rule(request.grade),
                                         surface=request.grade.surface_test,
                                         reject=capacity_check(request.grade.capacity,
                                                               request.grade.tolerance),
                                         trim=self._trim_rule(), present=present)
        for note in self.source.notes:
            view.handle(events.Note(note))
        with contextlib.ExitStack() as downloads:
            try:
                image = sources.download_first(
                    self.image, view.handle, cancel, watch_mod.default_tmpdir(), downloads,
                    judged=(self.request.source.image, self.request.source.force),
                    stall_timeout=self.request.stall_timeout)
                if image is None:
                    summary = events.Summary((), cancelled=True)
                    view.handle(summary)
                    view.close()
                    self.exit_status = cancel.exit_status
                    return summary
                outcome = watch_mod.WatchSession(image, emit, cancel, options).run()
            except Refused:
                view.close()
                raise
            finally:
                self.close()
            view.close()
        self.exit_status = outcome.exit_status
        return outcome.summary


def prepare_watch(request: WatchRequest) -> PreparedWatch:
    """Open and judge the image, check this user may write drives plugged in later, find the
    drives present (``include_present``); raises :class:`Refused`."""
    def image_checks() -> tuple[sources.OpenedSource, str | None]:
        source = sources.open_source(request.source)
        sources.require_still(source.image.path)
        return source, sources.sanity_note(source, request.source.image, request.source.force)

    source, image_note = sources.watched_checks(image_checks, request.source.image,
                                                request.stall_timeout)
    require_future_access(request.stall_timeout)
    present: tuple[Drive, ...] = ()
    if request.include_present:
        present = tuple(d for d in drives.discover(image_path=source.image.path)
                        if watch_mod.ineligibility(d, source.image.size, request.max_size)
                        is None)
    udev_note = drives.udev_hint()
    personaliser = customize.for_watch(request.customize, source.image)
    if personaliser is not None and request.grade.certificate is not None:
        raise Refused(["--certificate vouches that a drive holds the image byte for byte, "
                       "and --customize changes its boot partition: give one"])
    report, certificates = open_sinks(request.grade, request.report, source.image.path,
                                      source.checksum, verify=request.verify,
                                      compressed=source.image.compressed)
    return PreparedWatch(request, source, present, udev_note, image_note, report,
                         certificates, personaliser)
