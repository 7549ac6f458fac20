"""The `popsicle-py` command: flash, list, verify.

The CLI parses, asks, and picks a view; it holds no I/O logic.  The flow of a flash is
image -> plan (checked targets) -> confirmation -> checksum -> unmount -> open -> job -> view.

Exit status: 0 every drive written and verified; 1 at least one drive failed or did not verify;
2 bad usage or input, nothing written; 128 + signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP)
when a signal stopped the run.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from popsicle_py import bmap as bmap_mod
from popsicle_py import drives as drives_mod
from popsicle_py import events
from popsicle_py import watch as watch_mod
from popsicle_py._version import __version__
from popsicle_py.bmap import Bmap, BmapError
from popsicle_py.engine import DEFAULT_BUCKETS
from popsicle_py.flash import FlashJob, FlashOptions, OpenError, VerifyJob, open_targets
from popsicle_py.images import (
    Checksum,
    ImageError,
    find_sidecar,
    open_image,
    parse_checksum_option,
    verify_checksum,
)
from popsicle_py.plan import Plan, PlanError, make_plan, unmount_targets
from popsicle_py.ports import drive_info, port_path_of
from popsicle_py.report import Report, ReportError, fan_out
from popsicle_py.signals import Cancellation
from popsicle_py.units import format_size, parse_size
from popsicle_py.view import JsonView, Out, PlainView, RichView, WatchView, write_out

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

PROG = "popsicle-py"


class Refused(Exception):
    """Bad usage or input found before anything was written: exit 2 with these lines."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))


class SizeType(click.ParamType):
    """A byte count written as 16M, 4MiB or 1048576."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if size < 1:
            self.fail("must be at least 1 byte", param, ctx)
        return size


SIZE = SizeType()

#: A bucket is written with O_DIRECT: whole pages, and not so large that the ring cannot be had.
BUCKET_ALIGN = 4096
MAX_BUCKET_SIZE = 1 << 30


class BucketSizeType(SizeType):
    """A bucket size: a multiple of 4 KiB, at most 1 GiB."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> int:
        size = super().convert(value, param, ctx)
        if size % BUCKET_ALIGN:
            self.fail(f"must be a multiple of 4 KiB (4096 bytes), not {size}", param, ctx)
        if size > MAX_BUCKET_SIZE:
            self.fail("must be at most 1 GiB", param, ctx)
        return size


BUCKET_SIZE = BucketSizeType()
DEVICE = click.Path(dir_okay=False, path_type=str)


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _error(line: str) -> None:
    click.echo(f"{PROG}: {line}", err=True)


def _make_view(as_json: bool, labels: dict[str, str], *, writes: bool = True) -> Any:
    if as_json:
        return JsonView()
    if sys.stdout.isatty():
        return RichView(Console(highlight=False), labels, writes=writes)
    return PlainView()


def _json_refusal(lines: Sequence[str]) -> None:
    """A script asked for JSON: its last line is a summary, even for a refusal."""
    text = "".join(json.dumps({"event": "error", "message": line}) + "\n" for line in lines)
    write_out(text + json.dumps(events.Summary().to_json()) + "\n")


def _with_report(report: Report, view: Any) -> Callable[[Any], None]:
    """Feed the report, then the view; a report that cannot be written says so in the view
    (a line on stderr would break a live display), once, and the drives go on."""
    report.warn = lambda line: view.handle(events.Note(line))
    return fan_out(report.handle, view.handle)


def _open_report(path: str | None, image: Any, checksum: Checksum | None) -> Report | None:
    """The --report sink, opened before anything is written (a bad path is a refusal)."""
    if path is None:
        return None
    sha256 = checksum.hexdigest.lower() if checksum is not None and checksum.algo == "sha256" \
        else ""
    try:
        return Report(path, image=image.path, sha256=sha256, warn=_error)
    except ReportError as exc:
        raise Refused([str(exc)]) from None


def _run_guarded(debug: bool, as_json: bool, body: Callable[[], int]) -> NoReturn:
    """Run a command body; turn refusals into exit 2 and surprises into one line, not a trace."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format=f"{PROG}: %(message)s")
    try:
        status = body()
    except Refused as exc:
        for line in exc.lines:
            _error(line)
        if as_json:
            _json_refusal(exc.lines)
        status = EXIT_USAGE
    except (KeyboardInterrupt, click.Abort) as exc:
        # Ctrl-C (also at the prompt, which click turns into Abort) is a SIGINT: 130.
        # End of input at the prompt is an unanswered question: refused, 2.
        interrupted = isinstance(exc, KeyboardInterrupt) or isinstance(
            exc.__context__, KeyboardInterrupt)
        _error("interrupted before writing: nothing was written" if interrupted
               else "no answer at the confirmation: nothing was written")
        if as_json:
            _json_refusal([])
        status = 130 if interrupted else EXIT_USAGE
    except click.exceptions.Exit:
        raise
    except Exception as exc:
        if debug:
            traceback.print_exc()
        _error(f"unexpected error: {exc} (run with --debug to see where)")
        if as_json:  # a script's last line is a summary; this one says nothing went right
            _json_refusal([f"unexpected error: {exc}"])
        status = EXIT_FAILED
    sys.exit(status)


class _Group(click.Group):
    """Click's group, with usage errors on one line (``popsicle-py: what; see --help``)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            status = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2: bare command
                exc.show()
                sys.exit(exc.exit_code)
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            message = " ".join(exc.format_message().split())
            _error(message + hint)
            if "--json" in (sys.argv[1:] if args is None else list(args)):
                # A script asked for JSON: its last line is a summary, even for a typo.
                _json_refusal([message])
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _error(" ".join(exc.format_message().split()))
            sys.exit(exc.exit_code)
        except click.Abort:
            _error("aborted")
            sys.exit(EXIT_FAILED)
        sys.exit(status if isinstance(status, int) else EXIT_OK)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name=PROG)
def main() -> None:
    """Write one disk image to many USB drives at once, then verify each from the device.

    The image is read once for all drives; each drive gets its own progress, and the exit
    status says whether every drive was written and verified (0), some failed (1), the input
    was refused and nothing was written (2), or a signal stopped the run (128 + signal).
    """


# ----------------------------------------------------------------------------------------------
# flash


def _checksum_for(image_path: str, sha256: str | None, checksum: str | None,
                  no_checksum: bool) -> Checksum | None:
    given = parse_checksum_option(sha256, checksum)
    if given is not None:
        return given
    return None if no_checksum else find_sidecar(image_path)


def _require_terminal() -> None:
    """A script that forgot --yes must never write: no terminal, no question, no writing."""
    if not sys.stdin.isatty():
        raise Refused(["refusing to write without confirmation: standard input is not a "
                       "terminal; pass --yes to confirm in scripts"])


def _confirm(plan: Plan, image: Any, yes: bool, action: str) -> None:
    """Show what will be overwritten and ask once; without a terminal, refuse unless --yes."""
    if yes:
        return
    _require_terminal()
    console = _stderr()
    table = Table(title=f"{action} {image.path} ({format_size(image.size)})",
                  title_justify="left")
    for column in ("Device", "Port", "Drive", "Size", "Mounted at", "Warnings"):
        table.add_column(column, overflow="fold")
    for drive in plan.targets:
        table.add_row(drive.path, port_path_of(drive) or "", drive.label or "?",
                      format_size(drive.size), ", ".join(drive.mountpoints),
                      "; ".join(plan.warnings.get(drive.path, ())))
    console.print(table)
    for note in plan.notes:
        console.print(note)
    if not click.confirm(f"Everything on these {len(plan.targets)} drive(s) will be lost. "
                         "Continue?", default=False, err=True):
        raise Refused(["cancelled at the confirmation: nothing was written"])


def _run_checksum(image: Any, checksum: Checksum, view: Any, cancel: Cancellation) -> None:
    view.handle(events.Phase(None, "checksum", checksum.source))

    def progress(done: int, total: int) -> None:
        view.handle(events.Progress(None, "checksum", done, total))

    verify_checksum(image.path, checksum, progress, cancel)
    view.handle(events.Note(f"checksum ok ({checksum.algo} from {checksum.source})"))


@main.command()
@click.argument("image", type=click.Path(path_type=str))
@click.argument("devices", nargs=-1, type=DEVICE, metavar="[DEVICE]...")
@click.option("-a", "--all-usb", is_flag=True, help="Add every eligible USB and SD drive.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("-u", "--unmount", is_flag=True,
              help="Unmount mounted partitions of the targets first (otherwise refuse).")
@click.option("--no-verify", is_flag=True, help="Skip reading the drives back.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable events on stdout.")
@click.option("--bucket-size", type=BUCKET_SIZE, default="16M", show_default=True,
              help="Size of each buffer in the ring (16M, 4MiB, 1048576).")
@click.option("--buckets", type=click.IntRange(1, 64), default=DEFAULT_BUCKETS, metavar="N",
              show_default=True, help="How many buffers may be in flight.")
@click.option("--max-size", type=SIZE, default="128GiB", show_default=True,
              help="--all-usb skips drives larger than this.")
@click.option("--stall-timeout", type=click.FloatRange(min=0.1), default=60.0,
              metavar="SECONDS", show_default=True,
              help="Fail a drive that makes no progress for SECONDS.")
@click.option("--skip-identical", is_flag=True,
              help="Read each bucket first and write only those that differ (re-flash, resume).")
@click.option("--bmap", "bmap_path", type=click.Path(dir_okay=False, path_type=str),
              metavar="FILE", help="Block map (bmaptool): write only its mapped ranges "
              "(default: IMAGE.bmap when present).")
@click.option("--no-bmap", is_flag=True, help="Ignore a block map next to the image.")
@click.option("--repair-attempts", type=click.IntRange(0, 10), default=1, metavar="N",
              show_default=True, help="Rewrite buckets that fail verification up to N times.")
@click.option("--sha256", metavar="HEX", help="Expected SHA-256 of the image file.")
@click.option("--checksum", metavar="ALGO:HEX",
              help="Expected checksum (sha1, sha256, sha512 or blake2b) of the image file.")
@click.option("--no-checksum", is_flag=True, help="Ignore a checksum file next to the image.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str),
              metavar="FILE", help="Append one record per drive to FILE (.csv or .jsonl).")
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def flash(image: str, devices: tuple[str, ...], all_usb: bool, yes: bool, unmount: bool,
          no_verify: bool, as_json: bool, bucket_size: int, buckets: int, max_size: int,
          stall_timeout: float, skip_identical: bool, bmap_path: str | None, no_bmap: bool,
          repair_attempts: int, sha256: str | None, checksum: str | None, no_checksum: bool,
          report_path: str | None, debug: bool) -> None:
    """Write IMAGE to every DEVICE in parallel, then verify each.

    IMAGE may be raw or compressed (gzip, xz, bzip2, zstd, or a zip holding one image).
    """

    def body() -> int:
        if not devices and not all_usb:
            raise Refused(["no target drives: name devices or use --all-usb"])
        try:
            img = open_image(image)
            expected = _checksum_for(img.path, sha256, checksum, no_checksum)
            block_map = None if no_bmap else _block_map(img, bmap_path)
            size = img.size if block_map is None else block_map.image_size
            plan = make_plan(devices, all_usb=all_usb, image_path=img.path, image_size=size,
                             unmount=unmount, max_auto_size=max_size)
        except (ImageError, PlanError, BmapError) as exc:
            raise Refused([*getattr(exc, "notes", ()), *str(exc).splitlines()]) from None
        report = _open_report(report_path, img, expected)
        _confirm(plan, img, yes, "Flash")
        labels = {d.path: d.label for d in plan.targets}
        infos = [drive_info(d, i) for i, d in enumerate(plan.targets, 1)]
        view = _make_view(as_json, labels)
        emit = view.handle if report is None else _with_report(report, view)
        if not as_json:
            for note in plan.notes:
                view.handle(events.Note(note))
        cancel = Cancellation()
        cancel.announce = getattr(view, "announce", None)
        with cancel.installed():
            try:
                if expected is not None:
                    _run_checksum(img, expected, view, cancel)
                if unmount and not cancel():
                    unmount_targets(plan)
                if cancel():
                    return _cancelled_before_writing(plan, view, emit, cancel, infos)
                opened = open_targets(plan.targets, check=drives_mod.still_same)
            except (ImageError, PlanError, OpenError) as exc:
                if cancel():
                    return _cancelled_before_writing(plan, view, emit, cancel, infos)
                view.close()
                raise Refused(str(exc).splitlines()) from None
            if block_map is not None and not as_json:
                view.handle(events.Note(
                    f"block map {block_map.path}: writing {format_size(block_map.mapped)} of "
                    f"{format_size(block_map.image_size)}"))
            options = FlashOptions(verify=not no_verify, bucket_size=bucket_size,
                                   buckets=buckets, stall_timeout=stall_timeout,
                                   skip_identical=skip_identical,
                                   repair_attempts=repair_attempts, bmap=block_map)
            summary = FlashJob(img, opened, options, emit, cancel, infos).run()
            view.close()
            if report is not None:
                report.close()
        return _exit_status(summary, cancel)

    _run_guarded(debug, as_json, body)


def _block_map(image: Any, given: str | None) -> Bmap | None:
    """The block map named, or the one next to the image; checked against the image."""
    path = given or bmap_mod.sidecar(image.path)
    return None if path is None else bmap_mod.load(path, image.size)


def _cancelled_before_writing(plan: Plan, view: Any, emit: Callable[[Any], None],
                              cancel: Cancellation, infos: Sequence[events.DriveInfo]) -> int:
    """A signal before the first write: every drive is reported cancelled, none was touched."""
    results = tuple(events.DriveResult(d.path, "cancelled", 0, "cancelled before writing",
                                       drive=info)
                    for d, info in zip(plan.targets, infos, strict=True))
    emit(events.Summary(results, cancelled=True))
    view.close()
    return cancel.exit_status


def _exit_status(summary: events.Summary, cancel: Cancellation) -> int:
    if summary.cancelled or cancel():
        return cancel.exit_status
    return EXIT_OK if summary.ok else EXIT_FAILED


# ----------------------------------------------------------------------------------------------
# verify


@main.command()
@click.argument("image", type=click.Path(path_type=str))
@click.argument("devices", nargs=-1, required=True, type=DEVICE)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable events on stdout.")
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def verify(image: str, devices: tuple[str, ...], as_json: bool, debug: bool) -> None:
    """Compare each DEVICE with IMAGE; report the first bad offset."""

    def body() -> int:
        lines: list[str] = []
        targets = []
        seen: dict[int, str] = {}
        try:
            img = open_image(image)
        except ImageError as exc:
            raise Refused([str(exc)]) from None
        for path in devices:
            try:
                drive = drives_mod.drive_for_path(path)
            except drives_mod.TargetError as exc:
                lines.append(str(exc))
                continue
            if drive.devnum in seen:
                lines.append(f"{path} and {seen[drive.devnum]} are the same drive; name it once")
                continue
            seen[drive.devnum] = path
            if img.size is not None and img.size > drive.size:
                lines.append(f"image is larger than {drive.path}: {format_size(img.size)} "
                             f"image, {format_size(drive.size)} drive")
            targets.append(drive)
        if lines:
            raise Refused(lines)
        try:
            opened = open_targets(targets, for_writing=False)
        except OpenError as exc:
            raise Refused(exc.lines) from None
        view = _make_view(as_json, {d.path: d.label for d in targets}, writes=False)
        infos = [drive_info(d, i) for i, d in enumerate(targets, 1)]
        cancel = Cancellation()
        cancel.announce = getattr(view, "announce", None)
        with cancel.installed():
            summary = VerifyJob(img, opened, view.handle, cancel, infos).run()
            view.close()
        return _exit_status(summary, cancel)

    _run_guarded(debug, as_json, body)


# ----------------------------------------------------------------------------------------------
# list


@main.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of drives on stdout.")
@click.option("--all", "show_all", is_flag=True,
              help="Every disk, and why it is not eligible.")
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def list_drives(as_json: bool, show_all: bool, debug: bool) -> None:
    """List USB and SD drives (with --all, every disk) and whether each may be written."""

    def body() -> int:
        found = drives_mod.discover(include_all=show_all)
        ports = {d.path: port_path_of(d) for d in found}
        if as_json:
            write_out(json.dumps([{**d.to_json(), "port_path": ports[d.path]}
                                  for d in found], indent=None) + "\n")
            return EXIT_OK
        if not found:
            write_out(("no USB or SD drives found" if not show_all else "no disks found") + "\n")
            return EXIT_OK
        table = Table()
        for column in ("Device", "Port", "Drive", "Size", "Bus", "Mounted at", "Eligible"):
            table.add_column(column, overflow="fold")
        for d in found:
            eligible = "yes" if d.eligible else f"no: {d.reason}"
            table.add_row(d.path, ports[d.path] or "", d.label or "?", format_size(d.size),
                          d.bus, ", ".join(d.mountpoints), eligible)
        try:
            Console(highlight=False).print(table)
        except BrokenPipeError:  # | head: the reader left, the listing is no less true
            Out().reader_left()
        return EXIT_OK

    _run_guarded(debug, as_json, body)


# ----------------------------------------------------------------------------------------------
# watch (duplicator mode)


def _confirm_watch(image: Any, yes: bool, present: Sequence[drives_mod.Drive]) -> None:
    """Ask once before overwriting every drive that will be plugged in; refuse without a tty."""
    if yes:
        return
    _require_terminal()
    console = _stderr()
    console.print(f"Duplicator mode: {image.path} ({format_size(image.size)})")
    if present:
        table = Table(title="Plugged in now, and overwritten too (--include-present)",
                      title_justify="left")
        for column in ("Device", "Drive", "Size"):
            table.add_column(column, overflow="fold")
        for drive in present:
            table.add_row(drive.path, drive.label or "?", format_size(drive.size))
        console.print(table)
    console.print("[bold]Every eligible USB/SD drive plugged in from now on will be "
                  "overwritten.[/bold]")
    if not click.confirm("Continue?", default=False, err=True):
        raise Refused(["cancelled at the confirmation: nothing was written"])


def _make_watch_view(as_json: bool, image: Any, count: int | None, verify: bool) -> Any:
    if as_json:
        return JsonView()
    if sys.stdout.isatty():
        return WatchView(Console(highlight=False), image.path, image.size, count, verify=verify)
    return PlainView()


@main.command()
@click.argument("image", type=click.Path(path_type=str))
@click.option("--count", type=click.IntRange(min=1), metavar="N",
              help="Stop once N drives have finished (ok or failed); start no more than N.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--no-verify", is_flag=True, help="Skip reading the drives back.")
@click.option("--no-power-off", is_flag=True,
              help="Leave finished drives powered on (default: power them off).")
@click.option("--include-present", is_flag=True,
              help="Also write the eligible drives plugged in before watching.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable events on stdout.")
@click.option("--max-size", type=SIZE, default="128GiB", show_default=True,
              help="Skip drives larger than this.")
@click.option("--sha256", metavar="HEX", help="Expected SHA-256 of the image file.")
@click.option("--checksum", metavar="ALGO:HEX",
              help="Expected checksum (sha1, sha256, sha512 or blake2b) of the image file.")
@click.option("--no-checksum", is_flag=True, help="Ignore a checksum file next to the image.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str),
              metavar="FILE", help="Append one record per drive to FILE (.csv or .jsonl).")
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def watch(image: str, count: int | None, yes: bool, no_verify: bool, no_power_off: bool,
          include_present: bool, as_json: bool, max_size: int, sha256: str | None,
          checksum: str | None, no_checksum: bool, report_path: str | None, debug: bool
          ) -> None:
    """Duplicator mode: write IMAGE to every eligible drive as it is plugged in.

    Each drive is written and verified on its own as soon as it appears, then powered off
    so that it can be pulled. Ends after --count drives, or on Ctrl-C.
    """

    def body() -> int:
        try:
            img = open_image(image)
            expected = _checksum_for(img.path, sha256, checksum, no_checksum)
        except ImageError as exc:
            raise Refused(str(exc).splitlines()) from None
        present = []
        if include_present:
            present = [d for d in drives_mod.discover(image_path=img.path)
                       if watch_mod.ineligibility(d, img.size, max_size) is None]
        report = _open_report(report_path, img, expected)
        _confirm_watch(img, yes, present)
        view = _make_watch_view(as_json, img, count, not no_verify)
        emit = view.handle if report is None else _with_report(report, view)
        options = watch_mod.WatchOptions(count=count, verify=not no_verify,
                                         power_off=not no_power_off,
                                         include_present=include_present, max_size=max_size,
                                         checksum=expected)
        cancel = Cancellation()
        cancel.announce = getattr(view, "announce", None)
        with cancel.installed():
            try:
                outcome = watch_mod.WatchSession(img, emit, cancel, options).run()
            except ImageError as exc:
                view.close()
                raise Refused(str(exc).splitlines()) from None
            finally:
                if report is not None:
                    report.close()
            view.close()
        return outcome.exit_status

    _run_guarded(debug, as_json, body)


if __name__ == "__main__":  # pragma: no cover
    main()
