"""The erase use case: drives back to ordinary sticks (wiped, one partition, formatted).

``prepare_erase(request)`` checks the drives as a flash checks its targets
(:func:`popsicle_py.plan.make_plan`: never a system drive, a mounted one only with
``unmount``), the options (file system, label, its tool installed; a label is tried on a
small file system in a file first) and the user's access, and raises :class:`Refused`
(exit 2) before anything is written.  ``run(view, cancel)`` erases
every drive in parallel (:mod:`popsicle_py.erase_job`).

Without root the drives are opened as for a flash, through udisks2's ``Block.OpenDevice``
(polkit's ``open-device`` actions decide), and everything after goes through that descriptor
(:mod:`popsicle_py.erase`): no other udisks2 method, so no other polkit permission, is needed.
"""

from __future__ import annotations

from popsicle_py import drives, erase, events
from popsicle_py.app.access import require_access
from popsicle_py.app.common import cancelled_before_writing, open_or_cancelled
from popsicle_py.app.confirm import Confirmation, target_rows
from popsicle_py.blockdev import BlockDevice
from popsicle_py.defaults import DEFAULT_STALL_TIMEOUT
from popsicle_py.drives import Drive
from popsicle_py.erase_job import EraseJob, EraseOptions
from popsicle_py.errors import Refused
from popsicle_py.flash import open_targets
from popsicle_py.plan import Plan, make_plan, unmount_targets
from popsicle_py.ports import drive_info
from popsicle_py.protocols import View
from popsicle_py.records import record
from popsicle_py.signals import Cancellation


@record
class EraseRequest:
    """Erase ``devices``: ``fs`` None is FAT32 up to 32 GiB and exFAT above; "none" only
    wipes.  ``zero`` writes zeros everywhere first, ``discard`` discards every block."""

    devices: tuple[str, ...]
    fs: str | None = None
    label: str | None = None
    zero: bool = False
    discard: bool = False
    unmount: bool = False
    stall_timeout: float = DEFAULT_STALL_TIMEOUT


def fs_for(request: EraseRequest, drive: Drive) -> str:
    return request.fs or erase.default_fs(drive.size, _sector(drive))


def _sector(drive: Drive) -> int:
    """The drive's logical sector, the unit of its table and its file system."""
    return max(512, drive.logical_block_size)


def request_refusals(request: EraseRequest) -> list[str]:
    """Problems with the options themselves, one line each."""
    lines: list[str] = []
    if request.zero and request.discard:
        lines.append("--zero and --discard contradict each other; give one")
    if request.fs is not None and request.fs not in erase.FILESYSTEMS:
        lines.append(f"--fs {request.fs}: choose one of {', '.join(erase.FILESYSTEMS)}")
    if request.label is not None and request.fs == "none":
        lines.append("--label names a file system, and --fs none makes none")
    if request.fs is not None and (line := erase.label_problem(request.fs, request.label)):
        lines.append(line)
    return lines


class PreparedErase:
    """An erase that passed every check: the plan and the options."""

    def __init__(self, request: EraseRequest, plan: Plan) -> None:
        self.request = request
        self.plan = plan
        self.infos = tuple(drive_info(d, i) for i, d in enumerate(plan.targets, 1))

    @property
    def labels(self) -> dict[str, str]:
        return {d.path: d.label for d in self.plan.targets}

    @property
    def notes(self) -> tuple[str, ...]:
        request = self.request
        how = " after zeros everywhere" if request.zero else (
            " after discarding every block" if request.discard else "")
        return tuple(f"{d.path}: {erase.made(d.size, fs_for(request, d), _sector(d))}{how}"
                     for d in self.plan.targets)

    @property
    def confirmation(self) -> Confirmation:
        count = len(self.plan.targets)
        these = "this drive" if count == 1 else f"these {count} drives"
        return Confirmation("Erase (signatures wiped, then one partition, formatted)",
                            target_rows(self.plan.targets, self.plan),
                            (*self.plan.notes, *self.notes),
                            f"Everything on {these} will be lost. Continue?")

    def run(self, view: View, cancel: Cancellation) -> events.Summary:
        """Unmount if asked, open every drive (identity checked again), erase them all."""
        request = self.request

        def open_drives() -> list[BlockDevice]:
            if request.unmount:
                for line in unmount_targets(self.plan):
                    view.handle(events.Note(line))
            if cancel():
                return []
            return open_targets(self.plan.targets,
                                check=drives.still_same_each(self.plan.targets))

        opened = open_or_cancelled(open_drives, cancel, view, request.stall_timeout)
        if opened is None or cancel():  # Ctrl-C at a polkit prompt: no refusal
            for device in opened or ():
                device.close()
            return self._cancelled(view)
        options = EraseOptions(fs=request.fs, label=request.label, zero=request.zero,
                               discard=request.discard, stall_timeout=request.stall_timeout)
        summary = EraseJob(opened, options, view.handle, cancel, self.infos).run()
        view.close()
        return summary

    def _cancelled(self, view: View) -> events.Summary:
        summary = cancelled_before_writing([d.path for d in self.plan.targets], self.infos,
                                           view.handle)
        view.close()
        return summary


def prepare_erase(request: EraseRequest) -> PreparedErase:
    """Every check of an erase, before anything is written; raises :class:`Refused`."""
    lines = request_refusals(request)
    if lines:
        raise Refused(lines)
    plan = make_plan(request.devices, all_usb=False, image_path=None, image_size=None,
                     unmount=request.unmount)
    needed = {fs_for(request, d) for d in plan.targets}
    lines = [line for fs in sorted(needed) if (line := erase.missing_tool(fs)) is not None]
    if request.fs is None:  # the label's rules are those of each drive's file system
        lines += [line for fs in sorted(needed)
                  if (line := erase.label_problem(fs, request.label)) is not None]
    lines += [f"{d.path} is too small to partition" for d in plan.targets
              if d.size < erase.PART_START + (1 << 20) and fs_for(request, d) != "none"]
    if request.fs == "fat32":  # asked for by name: FAT32 or a refusal, never another FAT
        lines += [line for d in plan.targets
                  if (line := erase.no_fat32(d.path, d.size, _sector(d)))]
    if request.fs == "exfat":  # below mkfs.exfat's least: a refusal, not a run that fails
        lines += [line for d in plan.targets
                  if (line := erase.no_exfat(d.path, d.size, _sector(d)))]
    if request.discard:  # the kernel says so: refused now, not a drive failed once confirmed
        lines += [f"{d.path}: {erase.NO_DISCARD}" for d in plan.targets
                  if erase.discards(d.devnum) is False]
    if request.label and not lines:  # what the tool itself says of the label, tried on a file
        lines += [line for fs in sorted(needed - {"none"})
                  if (line := erase.refused_label(fs, request.label,
                                                  stall_timeout=request.stall_timeout))
                  is not None]
    if lines:
        raise Refused(lines)
    require_access([d.path for d in plan.targets], writing=True, limit=request.stall_timeout)
    return PreparedErase(request, plan)
