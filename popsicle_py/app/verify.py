"""The verify and probe use cases: drives read (verify) or stamped and put back (probe)."""

from __future__ import annotations

import contextlib

from popsicle_py import drives, events
from popsicle_py.app import sources
from popsicle_py.app.access import require_access
from popsicle_py.app.common import cancelled_before_writing, open_or_cancelled
from popsicle_py.app.confirm import Confirmation, target_rows
from popsicle_py.app.requests import ProbeRequest, VerifyRequest
from popsicle_py.blockdev import BlockDevice
from popsicle_py.drives import Drive
from popsicle_py.flash import VerifyJob, open_targets
from popsicle_py.plan import Plan, make_plan, make_read_plan, unmount_targets
from popsicle_py.ports import drive_info
from popsicle_py.probe_job import ProbeJob
from popsicle_py.protocols import Source, View
from popsicle_py.signals import Cancellation


class ReadsDrives:
    """What a job that only reads drives (verify, check) shares: the drives, who they are, and
    opening them, a drive another program now writes refused once more just before."""

    def __init__(self, targets: tuple[Drive, ...]) -> None:
        self.targets = targets
        self.infos = tuple(drive_info(d, i) for i, d in enumerate(targets, 1))

    @property
    def labels(self) -> dict[str, str]:
        return {d.path: d.label for d in self.targets}

    def open_drives(self, view: View, cancel: Cancellation, limit: float | None = None
                    ) -> list[BlockDevice] | None:
        """Every drive opened read-only, or Refused (the view closed first); None when a
        signal came first or ended a polkit prompt (or a daemon silent for ``limit`` s)."""
        return open_or_cancelled(
            lambda: open_targets(self.targets, for_writing=False,
                                 check=drives.writers_each(self.targets)), cancel, view, limit)

    def cancelled(self, view: View) -> events.Summary:
        """Every drive reported cancelled, none read."""
        summary = cancelled_before_writing([d.path for d in self.targets], self.infos,
                                           view.handle)
        view.close()
        return summary


class PreparedVerify(ReadsDrives):
    """A comparison that passed every check: the image and the drives to read."""

    def __init__(self, request: VerifyRequest, image: Source, targets: tuple[Drive, ...]):
        super().__init__(targets)
        self.request = request
        self.image = image

    def run(self, view: View, cancel: Cancellation) -> events.Summary:
        """Read every drive against the image (read once for all of them); a zip at a URL
        is downloaded first, as flash does (its directory is at its end)."""
        with contextlib.ExitStack() as downloads:
            image: Source | None = self.image
            if image is not None and image.kind.needs_whole_file:
                from popsicle_py.watch import default_tmpdir

                sources.attach(image, view.handle, cancel)
                try:
                    image = sources.download_first(
                        image, view.handle, cancel, default_tmpdir(), downloads,
                        stall_timeout=self.request.stall_timeout)
                except Exception:
                    view.close()
                    raise
            if image is None:  # cancelled while downloading: no drive was read
                return self.cancelled(view)
            opened = self.open_drives(view, cancel, self.request.stall_timeout)
            if opened is None:
                return self.cancelled(view)
            job = VerifyJob(image, opened, view.handle, cancel, self.request.stall_timeout,
                            self.infos)
            sources.attach(image, job.relay, cancel)  # download news from the reader thread
            summary = job.run()
            view.close()
        return summary


def prepare_verify(request: VerifyRequest) -> PreparedVerify:
    """Open the image and resolve the drives; raises :class:`Refused` (nothing is read)."""
    image = sources.watched_checks(lambda: sources.open_for_reading(request.image),
                                   request.image, request.stall_timeout)
    local = "/dev/stdin" if request.image == "-" else request.image  # where it is stored
    targets = make_read_plan(request.devices, image.size, image_path=local).targets
    require_access([d.path for d in targets], writing=False, limit=request.stall_timeout)
    return PreparedVerify(request, image, targets)


class PreparedProbe:
    """A capacity probe that passed every check (the plan a flash without an image makes)."""

    def __init__(self, request: ProbeRequest, plan: Plan) -> None:
        self.request = request
        self.plan = plan

    @property
    def labels(self) -> dict[str, str]:
        return {d.path: d.label for d in self.plan.targets}

    @property
    def confirmation(self) -> Confirmation:
        count = len(self.plan.targets)
        these = "this drive" if count == 1 else f"these {count} drives"
        return Confirmation(
            "Probe the capacity of (test stamps are written, then put back)",
            target_rows(self.plan.targets, self.plan), self.plan.notes,
            f"Test stamps will be written to {these}. Continue?")

    def run(self, view: View, cancel: Cancellation) -> events.Summary:
        """Unmount if asked, open every drive (identity checked again), probe them all."""
        def open_drives() -> list[BlockDevice]:
            if self.request.unmount:
                for line in unmount_targets(self.plan):
                    view.handle(events.Note(line))
            return open_targets(self.plan.targets,
                                check=drives.still_same_each(self.plan.targets))

        infos = [drive_info(d, i) for i, d in enumerate(self.plan.targets, 1)]
        opened = open_or_cancelled(open_drives, cancel, view, self.request.stall_timeout)
        if opened is None:
            summary = cancelled_before_writing([d.path for d in self.plan.targets], infos,
                                               view.handle)
            view.close()
            return summary
        summary = ProbeJob(opened, view.handle, cancel, self.request.stall_timeout,
                           infos).run()
        view.close()
        return summary


def prepare_probe(request: ProbeRequest) -> PreparedProbe:
    """Check the drives as a flash would (no image); raises :class:`Refused`."""
    plan = make_plan(request.devices, all_usb=False, image_path=None, image_size=None,
                     unmount=request.unmount)
    require_access([d.path for d in plan.targets], writing=True, limit=request.stall_timeout)
    return PreparedProbe(request, plan)
