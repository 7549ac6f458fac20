"""The `popsicle-py` command: flash, verify, probe, watch, list, cache, polkit-rule.

The CLI parses options into a request of the application layer (:mod:`popsicle_py.app`),
shows the prepared job's confirmation and picks a view; the job does the rest.  Only the
vocabulary (events, errors, units) and the application layer are imported here, and the
heavy parts only once a command runs, so ``--help`` and ``--version`` answer at once.

Exit status: 0 every drive written and verified; 1 at least one drive failed or did not verify;
2 bad usage or input, nothing written; 128 + signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP)
when a signal stopped the run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import TYPE_CHECKING

import click

from popsicle_py import events
from popsicle_py._version import __version__
from popsicle_py.app.requests import (
    CustomizeOptions,
    EngineOptions,
    FlashRequest,
    GradeOptions,
    ProbeRequest,
    SourceOptions,
    TargetOptions,
    VerifyRequest,
    WriteOptions,
)
from popsicle_py.cli import life
from popsicle_py.cli.ask import (
    NotesAfterStart,
    confirm,
    make_view,
    make_watch_view,
    said_without_asking,
)
from popsicle_py.cli.check import check as check_command
from popsicle_py.cli.guard import DocumentCommand, Group, run_guarded, running
from popsicle_py.cli.options import (
    DEVICE,
    FORCE_HELP,
    IMAGE,
    NO_PROBE_HELP,
    OutputOptions,
    Session,
    customize_options,
    engine_options,
    grade_options,
    output_options,
    report_option,
    session_options,
    source_options,
    stall_timeout_option,
    target_options,
    write_options,
    yes_option,
)
from popsicle_py.cli.output import print_table, table, write_text
from popsicle_py.cli.station import register as register_station
from popsicle_py.errors import PROG
from popsicle_py.units import format_link_speed, format_size

if TYPE_CHECKING:
    from popsicle_py.app.flash import PreparedFlash
    from popsicle_py.app.verify import PreparedProbe, PreparedVerify
    from popsicle_py.app.watch import PreparedWatch
    from popsicle_py.protocols import View

__all__ = ["FORCE_HELP", "NO_PROBE_HELP", "main"]


def _run(job: PreparedFlash | PreparedVerify | PreparedProbe, view: View) -> int:
    """Run a prepared job with the signals handled: the first stops the drives, a second
    exits at once; the exit status says how it ended."""
    from popsicle_py.app.common import exit_status
    from popsicle_py.cli.hangup import HangUpView
    from popsicle_py.signals import Cancellation

    cancel = Cancellation()
    cancel.announce = view.announce
    with running(cancel):
        summary = job.run(HangUpView(view), cancel)
    return exit_status(summary, cancel)


def _show_notes(view: View, job: PreparedFlash | PreparedWatch, yes: bool,
                output: OutputOptions) -> None:
    """The notes of the confirmation, again in the run's output (JSON: flash's come after its
    ``start`` event, :class:`~popsicle_py.cli.ask.NotesAfterStart`; watch has none, and says
    them first, as ``note`` events: a script passed --yes and saw no confirmation); with
    --yes, first what is written where, as nothing asked it."""
    if output.json:
        if not isinstance(view, NotesAfterStart):
            for note in job.notes:
                view.handle(events.Note(note))
        return
    if yes:
        view.handle(events.Note(said_without_asking(job.confirmation)))
    for note in job.notes:
        view.handle(events.Note(note))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name=PROG)
def main() -> None:
    """Write one disk image to many USB drives at once, then verify each from the device.

    The image is read once for all drives; each drive gets its own progress, and the exit
    status says whether every drive was written and verified (0), some failed (1), the input
    was refused and nothing was written (2), or a signal stopped the run (128 + signal).
    """


@main.command()
@source_options
@target_options
@yes_option()
@write_options
@engine_options
@grade_options
@report_option()
@customize_options
@output_options()
def flash(source: SourceOptions, targets: TargetOptions, yes: bool, write: WriteOptions,
          engine: EngineOptions, grade: GradeOptions, report: str | None,
          customize: CustomizeOptions | None,
          output: OutputOptions) -> None:
    """Write IMAGE to every DEVICE in parallel, then verify each.

    IMAGE may be raw or compressed (gzip, xz, bzip2, zstd, or a zip holding one image), a
    file or an http(s):// URL (downloaded once while the drives are written).
    """

    def body() -> int:
        from popsicle_py.app.flash import prepare_flash

        request = FlashRequest(source, targets, engine, write, report, grade, customize)
        with prepare_flash(request) as job:
            confirm(job.confirmation, yes)
            view = make_view(output.json, job.labels)
            if output.json:
                view = NotesAfterStart(view, job.notes)
            _show_notes(view, job, yes, output)
            return _run(job, view)

    run_guarded(output.debug, output.json, body)


@main.command()
@click.argument("image", type=IMAGE)
@click.argument("devices", nargs=-1, required=True, type=DEVICE)
@stall_timeout_option("Fail a drive whose reads make no progress for SECONDS.")
@output_options()
def verify(image: str, devices: tuple[str, ...], stall_timeout: float,
           output: OutputOptions) -> None:
    """Compare each DEVICE with IMAGE (a file or an http(s):// URL); report the first bad offset."""

    def body() -> int:
        from popsicle_py.app.verify import prepare_verify

        job = prepare_verify(VerifyRequest(image, devices, stall_timeout))
        return _run(job, make_view(output.json, job.labels, writes=False))

    run_guarded(output.debug, output.json, body)


@main.command(name="probe")
@click.argument("devices", nargs=-1, required=True, type=DEVICE, metavar="DEVICE...")
@yes_option()
@click.option("-u", "--unmount", is_flag=True,
              help="Unmount mounted partitions of the drives first (otherwise refuse).")
@stall_timeout_option("Fail a drive whose probe has not finished after SECONDS (a hung drive).")
@output_options()
def probe_command(devices: tuple[str, ...], yes: bool, unmount: bool, stall_timeout: float,
                  output: OutputOptions) -> None:
    """Check that each DEVICE stores as much as it claims (counterfeit drives), no flashing.

    Writes small test stamps spread over each drive (never its first 64 KiB) and reads them
    back, then puts back what they overwrote. Exit 0 when every drive is genuine, 1 when
    some drive is counterfeit or failed, 2 when refused.
    """

    def body() -> int:
        from popsicle_py.app.verify import prepare_probe

        job = prepare_probe(ProbeRequest(devices, unmount, stall_timeout))
        confirm(job.confirmation, yes)
        return _run(job, make_view(output.json, job.labels))

    run_guarded(output.debug, output.json, body)


@main.command()
@source_options
@session_options
@grade_options
@yes_option()
@customize_options
@output_options()
def watch(source: SourceOptions, session: Session, grade: GradeOptions, yes: bool,
          customize: CustomizeOptions | None, output: OutputOptions) -> None:
    """Duplicator mode: write IMAGE to every eligible drive as it is plugged in.

    Each drive is written and verified on its own as soon as it appears, then powered off
    so that it can be pulled. Ends after --count drives, or on Ctrl-C. An http(s):// IMAGE
    is downloaded once, before watching, and every drive is written from that copy.
    """

    def body() -> int:
        from popsicle_py.app.watch import prepare_watch
        from popsicle_py.cli.hangup import HangUpView
        from popsicle_py.signals import Cancellation

        request = dataclasses.replace(session.request(source), grade=grade,
                                      customize=customize)
        with prepare_watch(request) as job:
            confirm(job.confirmation, yes)
            view = make_watch_view(output.json, job.image.path, job.image.size,
                                   request.count, request.verify)
            _show_notes(view, job, yes, output)
            cancel = Cancellation()
            cancel.announce = view.announce
            with running(cancel):
                job.run(HangUpView(view), cancel)
            return job.exit_status

    run_guarded(output.debug, output.json, body)


@main.command(name="list", cls=DocumentCommand)
@click.option("--all", "show_all", is_flag=True,
              help="Every disk, and why it is not eligible.")
@output_options("One JSON array of drives on stdout (nothing when refused).")
def list_drives(show_all: bool, output: OutputOptions) -> None:
    """List USB and SD drives (with --all, every disk) and whether each may be written."""

    def body() -> int:
        from popsicle_py.app.listing import list_drives_with_notes

        found, notes = list_drives_with_notes(include_all=show_all)
        if output.json:
            return write_text(json.dumps([d.json for d in found], indent=None) + "\n")
        if not found:
            return write_text(("no USB or SD drives found" if not show_all
                               else "no disks found") + "\n")
        rows = [(d.path, d.port or "", d.label or "?", format_size(d.size), d.bus,
                 format_link_speed(d.link_speed) if d.link_speed else "",
                 ", ".join(d.mountpoints), "yes" if d.eligible else f"no: {d.reason}")
                for d in found]
        status = print_table(table(("Device", "Port", "Drive", "Size", "Bus", "Link",
                                    "Mounted at", "Eligible"), rows,
                                   optional=("Port", "Link", "Mounted at")))
        return status or write_text("".join(f"note: {n}\n" for n in notes))

    run_guarded(output.debug, False, body)  # JSON: an array, or nothing (DocumentCommand)


@main.group(name="cache")
def cache_group() -> None:
    """The downloads kept by --cache, in $XDG_CACHE_HOME/popsicle-py (~/.cache/popsicle-py)."""


@cache_group.command(name="list", cls=DocumentCommand)
@output_options("One JSON array of entries on stdout (nothing when refused).")
def cache_list(output: OutputOptions) -> None:
    """List the cached downloads: URL, size, file."""

    def body() -> int:
        from popsicle_py.app.listing import cache_entries

        root, found = cache_entries()
        if output.json:
            return write_text(json.dumps([{"url": e.url, "validator": e.validator,
                                           "size": e.size, "path": str(e.path),
                                           "created": round(e.created, 3)}
                                          for e in found]) + "\n")
        if not found:
            return write_text(f"no cached downloads in {root}\n")
        return print_table(table(("URL", "Size", "File"),
                                 [(e.url, format_size(e.size), str(e.path)) for e in found]))

    run_guarded(output.debug, False, body)  # JSON: an array, or nothing (DocumentCommand)


@cache_group.command(name="clean")
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def cache_clean(debug: bool) -> None:
    """Remove every cached download (and any partial one)."""

    def body() -> int:
        from popsicle_py.app.listing import clean_cache

        root, count, freed = clean_cache()
        what = "1 cached download" if count == 1 else f"{count} cached downloads"
        return write_text(f"removed {what}, {format_size(freed)} freed ({root})\n")

    run_guarded(debug, False, body)


main.add_command(life.read_command)
main.add_command(life.erase_command)

POLKIT_RULE = "50-popsicle-py.rules"


@main.command(name="polkit-rule")
def polkit_rule() -> None:
    """Print the opt-in polkit rule: group "popsicle" may write USB drives without sudo.

    Members of the group may then open removable USB drives through udisks2 without a
    password; nothing else changes. Install it, and make the group, with:

    \b
    popsicle-py polkit-rule | sudo tee /etc/polkit-1/rules.d/50-popsicle-py.rules
    sudo groupadd --system popsicle && sudo usermod -aG popsicle "$USER"
    """
    from importlib import resources

    text = (resources.files("popsicle_py") / "data" / POLKIT_RULE).read_text()
    sys.exit(write_text(text))


register_station(main)  # station, slots, records (popsicle_py/cli/station.py)
main.add_command(check_command)  # check (popsicle_py/cli/check.py)
