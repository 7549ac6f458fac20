"""What every prepared job shares: the report sink, the run's end, the exit status."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from popsicle_py import events
from popsicle_py.app.requests import GradeOptions
from popsicle_py.drives import Drive
from popsicle_py.errors import EXIT_FAILED, EXIT_OK, Refused
from popsicle_py.images import Checksum
from popsicle_py.protocols import View
from popsicle_py.signals import Cancellation

if TYPE_CHECKING:  # imported for --certificate only (4 ms of every start)
    from popsicle_py.certify.writer import CertificateWriter, Place
    from popsicle_py.grading import SpeedRule
    from popsicle_py.report import Report

Emit = Callable[[events.WatchEvent], None]


def open_report(path: str | None, image: str, checksum: Checksum | None) -> Report | None:
    """The --report sink, opened before anything is written (a bad path is a refusal)."""
    if path is None:
        return None
    from popsicle_py.report import Report, ReportError  # with --report only

    sha256 = checksum.hexdigest.lower() if checksum is not None and checksum.algo == "sha256" \
        else ""
    try:
        return Report(path, image=image, sha256=sha256)
    except ReportError as exc:
        raise Refused([str(exc)]) from None


def check_grade(grade: GradeOptions, *, verify: bool) -> None:
    """Refuse grading options that contradict each other or the run (exit 2)."""
    if grade.tolerance and grade.capacity is None:
        raise Refused(["--tolerance goes with --capacity SIZE"])
    if grade.surface_test and not verify:
        raise Refused(["--surface-test and --no-verify contradict each other: the surface "
                       "test follows verification"])
    if grade.min_read_speed is not None and not verify:
        raise Refused(["--min-read-speed and --no-verify contradict each other: the read speed "
                       "is measured while the drive is read back"])


def speed_rule(grade: GradeOptions) -> SpeedRule | None:
    """The speed limits a drive must meet, if any (grading is imported only then)."""
    if grade.min_write_speed is None and grade.min_read_speed is None:
        return None
    from popsicle_py.grading import SpeedRule

    return SpeedRule(grade.min_write_speed, grade.min_read_speed)


def capacity_notes(grade: GradeOptions, drives: Sequence[Drive]) -> list[str]:
    """For the confirmation: the drives --capacity will reject before writing them."""
    if grade.capacity is None:
        return []
    from popsicle_py.grading import capacity_verdict

    notes = []
    for drive in drives:
        why = capacity_verdict(drive.size, grade.capacity, grade.tolerance)
        if why is not None:
            notes.append(f"{drive.path} will be rejected (not written): it {why}")
    return notes


def open_certificates(grade: GradeOptions, image: str, checksum: Checksum | None, *,
                      verify: bool, compressed: bool = False,
                      place: Place | None = None) -> CertificateWriter | None:
    """The --certificate writer, made before anything is written: the directory opened, the
    --sign-key tried; a certificate needs the drives read back."""
    if grade.certificate is None:
        if grade.sign_key is not None:
            raise Refused(["--sign-key signs certificates: give --certificate DIR too"])
        return None
    if not verify:
        raise Refused(["--certificate and --no-verify contradict each other: a certificate "
                       "says what was read back from the drive"])
    # A published digest is of the file: of the image only when the file is not compressed.
    sha256 = checksum.hexdigest.lower() if checksum is not None and checksum.algo == "sha256" \
        and not compressed else None
    name = image if "://" in image else os.path.basename(image)
    from popsicle_py.certify.writer import CertificateWriter

    return CertificateWriter(grade.certificate, grade.sign_key, name, sha256, place)


def open_sinks(grade: GradeOptions, report: str | None, image: str,
               checksum: Checksum | None, *, verify: bool, compressed: bool
               ) -> tuple[Report | None, CertificateWriter | None]:
    """The certificate writer and the report file, both opened before anything is written
    (either refused: neither is left open)."""
    check_grade(grade, verify=verify)
    certificates = open_certificates(grade, image, checksum, verify=verify,
                                     compressed=compressed)
    try:
        return open_report(report, image, checksum), certificates
    except Refused:
        if certificates is not None:
            certificates.close()
        raise


def emitter(view: View, report: Report | None) -> Emit:
    """Feed the report, then the view; a report that cannot be written says so in the view
    (a line on stderr would break a live display), once, and the drives go on."""
    if report is None:
        return view.handle
    from popsicle_py.report import fan_out

    report.warn = lambda line: view.handle(events.Note(line))
    return fan_out(report.handle, view.handle)


def cancelled_before_writing(devices: Sequence[str], infos: Sequence[events.DriveInfo],
                             emit: Emit) -> events.Summary:
    """A signal before the first write: every drive is reported cancelled, none was touched."""
    results = tuple(events.DriveResult(path, events.Status.CANCELLED, 0,
                                       "cancelled before writing", cause=events.Cause.CANCELLED,
                                       drive=info)
                    for path, info in zip(devices, infos, strict=True))
    summary = events.Summary(results, cancelled=True)
    emit(summary)
    return summary


def hear_cancel(cancel: Cancellation, limit: float | None = None) -> None:
    """Without root, drives are opened through udisks2, where polkit may wait at a password
    prompt: a signal (Ctrl-C, SIGTERM) must end that wait too, and a daemon silent for
    ``limit`` s (the run's --stall-timeout, when under D-Bus' 25 s) fails it.  Root never
    loads D-Bus."""
    if os.geteuid() != 0:
        from popsicle_py import udisks

        udisks.set_cancel(cancel)
        udisks.set_limit(limit)


T = TypeVar("T")


def open_or_cancelled(open_drives: Callable[[], T], cancel: Cancellation, view: View,
                      limit: float | None = None) -> T | None:
    """``open_drives()``, hearing signals at a polkit prompt: None when a signal came first or
    ended the prompt (the caller reports every drive cancelled: the agent's end is no
    refusal); a refusal otherwise is raised, the view closed first."""
    hear_cancel(cancel, limit)
    if cancel():
        return None
    try:
        return open_drives()
    except Refused:
        if cancel():
            return None
        view.close()
        raise


def exit_status(summary: events.Summary, cancel: Cancellation) -> int:
    """0 every drive ok, 1 one did not end ok, 128 + signal when a signal stopped the run."""
    if summary.cancelled or cancel():
        return cancel.exit_status
    return EXIT_OK if summary.ok else EXIT_FAILED


S = TypeVar("S", bound="HeldFiles")


class HeldFiles:
    """What a prepared job opens before its confirmation and closes however it ends: the
    ``--report`` file and the ``--certificate`` directory (``with prepare_x(...) as job``)."""

    report: Report | None = None
    certificates: CertificateWriter | None = None

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.report is not None:
            self.report.close()
        if self.certificates is not None:
            self.certificates.close()

