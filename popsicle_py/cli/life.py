"""The rest of a stick's life: ``read`` (a drive into an image file) and ``erase`` (back to an
ordinary stick).  Like every command, each parses options into a request of the application
layer, confirms, picks a view and runs; the heavy parts are imported in the command's body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import click

from popsicle_py import events
from popsicle_py.cli.ask import confirm, make_view
from popsicle_py.cli.guard import run_guarded, running
from popsicle_py.cli.options import (
    DEVICE,
    DevicePath,
    OutputOptions,
    output_options,
    stall_timeout_option,
    yes_option,
)

if TYPE_CHECKING:
    from popsicle_py.protocols import View
    from popsicle_py.signals import Cancellation


class _Job(Protocol):
    def run(self, view: View, cancel: Cancellation) -> events.Summary: ...


def _run(job: _Job, view: View) -> int:
    """Run with the signals handled (the first stops the job); the exit status it means.

    A terminal that goes away (EIO from the view) is a hang-up, as for flash: the job is
    cancelled and exits 129, not an "unexpected error" that left the drive mid-erase.
    """
    from popsicle_py.app.common import exit_status
    from popsicle_py.cli.hangup import HangUpView
    from popsicle_py.signals import Cancellation

    cancel = Cancellation()
    cancel.announce = view.announce
    with running(cancel):
        summary = job.run(HangUpView(view), cancel)
    return exit_status(summary, cancel)


@click.command(name="read")
@click.argument("pairs", nargs=-1, required=True, metavar="DEVICE OUTPUT [DEVICE OUTPUT]...",
                type=DevicePath(path_type=str, readable=False))  # no stat: a hung share
@click.option("--bmap", is_flag=True,
              help="Also write a block map (bmaptool's format) of the blocks holding data, "
                   "named as bmaptool and flash look for it (disk.img.zst -> disk.img.bmap).")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT (and its sidecars).")
@stall_timeout_option()
@output_options()
def read_command(pairs: tuple[str, ...], bmap: bool, force: bool,
                 stall_timeout: float, output: OutputOptions) -> None:
    """Read DEVICE once into the image file OUTPUT, with its SHA-256 in OUTPUT.sha256.

    OUTPUT is compressed by its suffix: .zst (zstd, every core), .xz, .gz, or raw. It
    appears under its name only once complete; an existing OUTPUT is refused without --force.
    Several DEVICE OUTPUT pairs are read at once, one thread per drive.
    """

    def body() -> int:
        from popsicle_py.app.read_many import ReadManyRequest, pairs_of, prepare_reads

        job = prepare_reads(ReadManyRequest(pairs_of(pairs), force=force, bmap=bmap,
                                            stall_timeout=stall_timeout))
        view = make_view(output.json, job.labels, writes=False)
        for note in job.notes:  # JSON too (first: no start event), as flash says its own
            view.handle(events.Note(note))
        return _run(job, view)

    run_guarded(output.debug, output.json, body)



@click.command(name="erase")
@click.argument("devices", nargs=-1, required=True, type=DEVICE, metavar="DEVICE...")
@click.option("--fs", type=click.Choice(["fat32", "exfat", "none"]), default=None,
              help="File system of the one partition (default: fat32 up to 32 GiB, exfat "
                   "above; fat32 on a drive with 4096-byte sectors); none only wipes.")
@click.option("--label", metavar="NAME",
              help="Volume label (FAT: 11 ASCII characters; exFAT: 11, any script).")
@click.option("--zero", is_flag=True, help="Write zeros over the whole drive first, and "
              "read them back.")
@click.option("--discard", is_flag=True, help="Discard every block first (BLKDISCARD), and "
              "read zeros back.")
@yes_option()
@click.option("-u", "--unmount", is_flag=True,
              help="Unmount mounted partitions of the drives first (otherwise refuse).")
@stall_timeout_option()
@output_options()
def erase_command(devices: tuple[str, ...], fs: str | None, label: str | None, zero: bool,
                  discard: bool, yes: bool, unmount: bool, stall_timeout: float,
                  output: OutputOptions) -> None:
    """Give each DEVICE back as an ordinary stick: old signatures wiped, a new MBR with one
    partition over the drive, formatted FAT32 or exFAT (readable by Windows, macOS, Linux).
    """

    def body() -> int:
        from popsicle_py.app.erase import EraseRequest, prepare_erase

        job = prepare_erase(EraseRequest(devices, fs=fs, label=label, zero=zero,
                                         discard=discard, unmount=unmount,
                                         stall_timeout=stall_timeout))
        confirm(job.confirmation, yes)
        view = make_view(output.json, job.labels)
        for note in job.notes:  # JSON too: a script (--yes) saw no confirmation
            view.handle(events.Note(note))
        return _run(job, view)

    run_guarded(output.debug, output.json, body)
