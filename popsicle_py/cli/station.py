"""The station's commands: ``station`` (serve and write), ``slots`` (learn a slot map),
``records`` (export the journal).  Options in, a request of the application layer out."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

import click

from popsicle_py import events
from popsicle_py.app.requests import CustomizeOptions, GradeOptions, SourceOptions
from popsicle_py.cli.ask import confirm
from popsicle_py.cli.guard import DocumentCommand, run_guarded, running
from popsicle_py.cli.options import (
    OptionGroup,
    OutputOptions,
    Session,
    customize_options,
    grade_options,
    output_options,
    session_options,
    source_options,
    yes_option,
)
from popsicle_py.cli.output import write_text
from popsicle_py.defaults import DEFAULT_LISTEN
from popsicle_py.errors import EXIT_OK
from popsicle_py.records import record

FILE = click.Path(dir_okay=False, path_type=str)


@record
class Place:
    """What only a station has: its slots, its address and token, its journal, its hook."""

    slots: str | None
    listen: str
    token_file: str | None
    journal: str | None
    batch: str
    operator: str
    name: str | None
    hook: str | None


#: The station's own options.
place_options = OptionGroup(
    "place", Place,
    click.option("--slots", "slots", type=FILE, metavar="FILE",
                 help="The slot map (TOML, made by `popsicle-py slots`): write only the drives "
                      "on its ports; a drive elsewhere is announced and never opened."),
    click.option("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT", show_default=True,
                 help="Where the page and the API are served: HOST:PORT, HOST, PORT (on "
                      "127.0.0.1), :PORT, [IPv6] or [IPv6]:PORT; port 0: a free one."),
    click.option("--token-file", type=FILE, metavar="FILE",
                 help="The token POST requests need (made, mode 0600, when missing; default: "
                      "station.token beside the journal)."),
    click.option("--journal", type=FILE, metavar="FILE",
                 help="The SQLite journal (default: /var/lib/popsicle-py/journal.sqlite as "
                      "root, else ~/.local/share/popsicle-py/journal.sqlite)."),
    click.option("--batch", default="", metavar="NAME",
                 help="The batch the records belong to."),
    click.option("--operator", default="", metavar="NAME", help="Who runs the station."),
    click.option("--name", default=None, metavar="NAME",
                 help="The station's name in records and on the page (default: the host "
                      "name)."),
    click.option("--hook", metavar="CMD",
                 help="Run CMD for each drive that ends (POPSICLE_SLOT, POPSICLE_RESULT ... in "
                      "its environment): a sound, a light."),
)


@click.command()
@source_options
@place_options
@session_options
@grade_options
@yes_option()
@customize_options
@output_options()
def station(source: SourceOptions, place: Place, session: Session, grade: GradeOptions,
            yes: bool, customize: CustomizeOptions | None, output: OutputOptions
            ) -> None:
    """A duplicator station: watch's writing, with slots, a web page, an HTTP API and a
    journal of every drive.

    Serves the page (the slots, live) and the API at --listen; POST requests need the
    token. Ends after --count drives, on POST /api/stop (the drives being written are
    finished, exit 0), or on a signal.
    """

    def body() -> int:
        from popsicle_py.app.station import prepare_station
        from popsicle_py.app.station_requests import StationRequest
        from popsicle_py.signals import Cancellation
        from popsicle_py.station.view import SlotJsonView, SlotPlainView, Terminal

        watch = replace(session.request(source), grade=grade, customize=customize)
        request = StationRequest(watch, **asdict(place))
        with prepare_station(request) as job:
            confirm(job.confirmation, yes)
            terminal: Terminal = SlotJsonView() if output.json else SlotPlainView()
            for note in job.notes:  # JSON too: a script (--yes) saw no confirmation
                terminal.handle(events.Note(note), None)
            cancel = Cancellation()
            cancel.announce = terminal.announce  # else a stuck stdout reader held the end
            with running(cancel):
                job.run(terminal, cancel)
            return job.exit_status

    run_guarded(output.debug, output.json, body)


@click.command(name="slots")
@click.argument("file", type=FILE)
@click.option("--count", type=click.IntRange(1, 256), metavar="N",
              help="Learn N slots, labelled 1 to N.")
@click.option("--labels", metavar="A,B,...", help="Learn these slots, in this order.")
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def slots_command(file: str, count: int | None, labels: str | None, debug: bool) -> None:
    """Make a slot map in FILE: plug a stick into each slot in turn when asked.

    The port of each stick is read as it appears; nothing is opened or written. The map
    (TOML) keeps the order given, which is the order of the station's page.
    """

    def body() -> int:
        from popsicle_py.app.station import learn_slots
        from popsicle_py.app.station_requests import LearnRequest
        from popsicle_py.errors import Refused
        from popsicle_py.signals import Cancellation
        from popsicle_py.station.slots import SlotMapError, learn_labels

        try:
            wanted = learn_labels(count, labels)
        except SlotMapError as exc:
            raise Refused([str(exc)]) from None
        where = os.path.dirname(os.path.abspath(file))
        if not os.path.isdir(where) or not os.access(where, os.W_OK):
            # Said now, not once a stick was plugged into every slot: that work is lost.
            raise Refused([f"{file}: its directory {where} is not a writable directory"])

        def say(line: str) -> None:
            click.echo(line)

        cancel = Cancellation()
        cancel.announce = lambda _text: None  # no drive to stop: "cancelled" says it all
        with running(cancel):
            found = learn_slots(LearnRequest(file, wanted), say, cancel)
        if found is None:
            click.echo("cancelled: no slot map written", err=True)
            return cancel.exit_status
        click.echo(f"wrote {len(found.slots)} slot(s) to {file}")
        return EXIT_OK

    run_guarded(debug, False, body)


@click.command(cls=DocumentCommand)
@click.option("--journal", type=FILE, metavar="FILE",
              help="The station's journal (default: the station's default).")
@click.option("--batch", default=None, metavar="NAME", help="Only this batch's records.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON array of records (nothing when refused).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header line.")
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def records(journal: str | None, batch: str | None, as_json: bool, as_csv: bool,
            debug: bool) -> None:
    """Export the station's journal: one record per drive (slot, drive, result, speeds)."""

    def body() -> int:
        from popsicle_py.app.station import read_records
        from popsicle_py.errors import Refused
        from popsicle_py.station.journal import to_csv

        if as_json and as_csv:  # one of them was silently dropped: a script's file the wrong one
            raise Refused(["--json and --csv contradict each other; give one"])
        found = read_records(journal, batch)
        if as_json:
            return write_text(json.dumps(found) + "\n")
        if as_csv:
            return write_text(to_csv(found))
        lines = []
        for row in found:
            drive = " ".join(p for p in (row["vendor"], row["model"], row["serial"]) if p)
            lines.append(f"{row['id']:>5}  {row['ended'] or row['started']}  "
                         f"slot {row['slot'] or '-'}  {row['result']:<11}  {drive}"
                         + (f"  {row['error']}" if row["error"] else "") + "\n")
        return write_text("".join(lines))

    run_guarded(debug, False, body)  # JSON: an array, or nothing (DocumentCommand)


def register(group: click.Group) -> None:
    """Add the station's commands to the ``popsicle-py`` group."""
    for command in (station, slots_command, records):
        group.add_command(command)
