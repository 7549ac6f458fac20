"""The `popsicle-py` command: flash, list, verify.

The CLI parses, asks, and picks a view; it holds no I/O logic.  The flow of a flash is
image -> plan (checked targets) -> confirmation -> checksum -> unmount -> open -> job -> view.

Exit status: 0 every drive written and verified; 1 at least one drive failed or did not verify;
2 bad usage or input, nothing written; 128 + signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP)
when a signal stopped the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from popsicle_py import bmap as bmap_mod
from popsicle_py import drives as drives_mod
from popsicle_py import events, sanity, udisks
from popsicle_py import watch as watch_mod
from popsicle_py._version import __version__
from popsicle_py.bmap import Bmap, BmapError
from popsicle_py.cache import Cache, cache_wanted
from popsicle_py.engine import DEFAULT_BUCKETS
from popsicle_py.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, PROG, PopsicleError, Refused
from popsicle_py.flash import FlashJob, FlashOptions, ProbeJob, VerifyJob, open_targets
from popsicle_py.images import (
    Checksum,
    Image,
    ImageError,
    find_sidecar,
    open_image,
    parse_checksum_option,
    read_head,
    verify_checksum,
)
from popsicle_py.plan import Plan, make_plan, unmount_targets
from popsicle_py.ports import drive_info, port_path_of
from popsicle_py.report import Report, ReportError, fan_out
from popsicle_py.signals import Cancellation
from popsicle_py.units import format_size, parse_size
from popsicle_py.view import JsonView, Out, PlainView, RichView, WatchView, write_out


class SizeType(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
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
# Not readable=True: an ordinary user's "not readable" is said once, as what is needed
# (_require_access), after the usual checks of each path.
DEVICE = click.Path(dir_okay=False, readable=False, path_type=str)

NEEDS_ROOT_TO_WRITE = udisks.NEEDS_ROOT
NEEDS_ROOT_TO_READ = udisks.NEEDS_ROOT_TO_READ


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _error(line: str) -> None:
    click.echo(f"{PROG}: {line}", err=True)


def _make_view(as_json: bool, labels: dict[str, str], *, writes: bool = True) -> Any:
    if as_json:
        return JsonView()
    if sys.stdout is not None and sys.stdout.isatty():
        return RichView(Console(highlight=False), labels, writes=writes)
    return PlainView()


def _json_refusal(lines: Sequence[str]) -> None:
    """A script asked for JSON: its last line is a summary, even when nothing ran."""
    view = JsonView()
    for line in lines:
        view.handle(events.Error(line))
    view.handle(events.Summary())
    view.close()


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
    """Run a command body; errors of ours show themselves and carry their exit status."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format=f"{PROG}: %(message)s")
    try:
        status = body()
    except PopsicleError as exc:
        exc.show()
        if as_json:
            _json_refusal(exc.messages())
        status = exc.exit_code
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
                _json_refusal([message])  # a script's last line is a summary, even for a typo
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


def _image_sanity(img: Image, shown: str, force: bool) -> str | None:
    """Refuse a file that is not a disk image (a failed download) unless --force; else a note.

    A head that cannot be decoded is left to the job, which fails every drive naming the image
    and the offset (as for damage further in), exactly as without this check.
    """
    try:
        head = read_head(img, sanity.HEAD_SIZE)
    except ImageError:
        return None
    verdict = sanity.check(head, img.size, shown)
    if verdict.refusal is None:
        return verdict.note
    if not force:
        raise Refused([f"{verdict.refusal}; --force writes it anyway"])
    return f"{verdict.refusal}; writing it anyway (--force)"


class _Later:
    """A module imported on first use: the HTTP client (urllib3) is needed only for URLs."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


remote = _Later("popsicle_py.remote")


def _is_url(text: str) -> bool:
    """http:// and https:// addresses (what flash, watch and verify download)."""
    return text[:8].lower().startswith(("http://", "https://"))


def _attach(image: Any, emit: Callable[[Any], None], cancel: Cancellation) -> None:
    """Download news of a URL's image to ``emit`` (nothing to do for a local image)."""
    if not isinstance(image, Image):
        remote.attach(image, emit, cancel)


FORCE_HELP = "Write an image that does not look like a disk image (text, HTML, tiny)."
NO_PROBE_HELP = ("Do not check, before writing, that each drive stores as much as it claims "
                 "(the counterfeit-stick probe).")


def _probe_for(image_size: int | None, bucket_size: int) -> Callable[[Any], None]:
    """The capacity probe a flash runs on each drive: bucket boundaries and the image's end."""
    from popsicle_py import probe as probe_mod

    end = image_size or 0
    return probe_mod.checker([*range(bucket_size, end, bucket_size), end])


def access_refusal(euid: int, denied: Sequence[str], *, writing: bool) -> str | None:
    """The one line for a user who may not open the drives (``denied``), or None."""
    if euid == 0 or not denied:
        return None  # root's own EACCES (rare: a locked-down node) is reported per drive
    return NEEDS_ROOT_TO_WRITE if writing else NEEDS_ROOT_TO_READ


def _require_access(paths: Sequence[str], *, writing: bool) -> None:
    """Refuse at once, in one line, when this user cannot open the drives at all: not root,
    not allowed by the kernel, and no udisks2 to ask polkit."""
    mode = os.R_OK | (os.W_OK if writing else 0)
    line = access_refusal(os.geteuid(), [p for p in paths if not os.access(p, mode)],
                          writing=writing)
    if line is not None and not udisks.available():
        raise Refused([line])


def _may_write_future_drives() -> bool:
    """Root, or a member of the group that owns disk nodes ("disk" on Debian and Fedora)."""
    if os.geteuid() == 0:
        return True
    try:
        return grp.getgrnam("disk").gr_gid in os.getgroups()
    except KeyError:
        return False


def _open_source(image: str, sha256: str | None, checksum: str | None, no_checksum: bool,
                 keyring: str | None, use_cache: bool | None) -> tuple[Any, Checksum | None,
                                                                 list[str]]:
    """The image (a file or a URL), the checksum to check before writing, and notes to show.

    For a URL the published checksum is checked by the download stream itself, in the write
    pass, so none is returned unless a cached copy is used.
    """
    if _is_url(image):
        cache = Cache() if cache_wanted(use_cache) else None
        opened = remote.open_url(image, sha256=sha256, checksum=checksum,
                                 no_checksum=no_checksum, keyring=keyring, cache=cache)
        return opened.image, opened.prepass, opened.notes
    img = open_image(image)
    expected = _checksum_for(img.path, sha256, checksum, no_checksum)
    notes = []
    if keyring is not None:
        if expected is None or expected.source.startswith("--"):
            raise ImageError("--keyring checks a published checksum file (SHA256SUMS, "
                             "IMAGE.sha256 ...) and none is used here")
        signature = remote.check_signature(expected.source, remote.read_local, keyring)
        notes.append(f"signature ok: {signature} (keyring {keyring})")
    return img, expected, notes


def _download_first(img: Any, view: Any, cancel: Cancellation,
                    stack: contextlib.ExitStack) -> Any:
    """A URL read from start to end into a file before writing (watch, zip); None if cancelled."""
    if isinstance(img, Image):
        return img
    local, cleanup = remote.materialize(img, view.handle, cancel, watch_mod.default_tmpdir())
    stack.callback(cleanup)
    return local


def _url_options(command: Callable[..., None]) -> Callable[..., None]:
    """--keyring and --cache, shared by flash and watch."""
    command = click.option(
        "--cache/--no-cache", "use_cache", default=None,
        help="Keep a downloaded IMAGE (a URL) in ~/.cache/popsicle-py for the next run "
             "(default: off, or $POPSICLE_PY_CACHE).")(command)
    return click.option(
        "--keyring", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
        help="Trust the checksum file only if its signature (.gpg, .sign, .asc, .sig) "
             "verifies with gpgv against this keyring.")(command)


def _require_terminal() -> None:
    """A script that forgot --yes must never write: no terminal, no question, no writing."""
    if not sys.stdin.isatty():
        raise Refused(["refusing to write without confirmation: standard input is not a "
                       "terminal; pass --yes to confirm in scripts"])


def _confirm(plan: Plan, image: Any, yes: bool, action: str) -> None:
    """Show what will be overwritten and ask once; without a terminal, refuse unless --yes."""
    _ask(plan, yes, f"{action} {image.path} ({format_size(image.size)})",
         f"Everything on these {len(plan.targets)} drive(s) will be lost. Continue?")


def _ask(plan: Plan, yes: bool, title: str, question: str) -> None:
    """The table of target drives, the plan's notes, then one question (or --yes)."""
    if yes:
        return
    _require_terminal()
    console = _stderr()
    table = Table(title=title, title_justify="left")
    for column in ("Device", "Port", "Drive", "Size", "Mounted at", "Warnings"):
        table.add_column(column, overflow="fold")
    for drive in plan.targets:
        table.add_row(drive.path, port_path_of(drive) or "", drive.label or "?",
                      format_size(drive.size), ", ".join(drive.mountpoints),
                      "; ".join(plan.warnings.get(drive.path, ())))
    console.print(table)
    for note in plan.notes:
        console.print(note)
    if not click.confirm(question, default=False, err=True):
        raise Refused(["cancelled at the confirmation: nothing was written"])


def _run_checksum(image: Any, checksum: Checksum, view: Any, cancel: Cancellation) -> None:
    view.handle(events.Phase(None, events.Step.CHECKSUM, checksum.source))

    def progress(done: int, total: int) -> None:
        view.handle(events.Progress(None, events.Step.CHECKSUM, done, total))

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
@click.option("--checksum-while-writing", is_flag=True,
              help="Check the checksum only in the pass that writes the drives (no read of "
              "the image before writing).")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--no-probe", is_flag=True, help=NO_PROBE_HELP)
@_url_options
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str),
              metavar="FILE", help="Append one record per drive to FILE (.csv or .jsonl).")
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def flash(image: str, devices: tuple[str, ...], all_usb: bool, yes: bool, unmount: bool,
          no_verify: bool, as_json: bool, bucket_size: int, buckets: int, max_size: int,
          stall_timeout: float, skip_identical: bool, bmap_path: str | None, no_bmap: bool,
          repair_attempts: int, sha256: str | None, checksum: str | None, no_checksum: bool,
          checksum_while_writing: bool, force: bool, no_probe: bool,
          report_path: str | None, keyring: str | None, use_cache: bool | None,
          debug: bool) -> None:
    """Write IMAGE to every DEVICE in parallel, then verify each.

    IMAGE may be raw or compressed (gzip, xz, bzip2, zstd, or a zip holding one image), a
    file or an http(s):// URL (downloaded once while the drives are written).
    """

    def body() -> int:
        if not devices and not all_usb:
            raise Refused(["no target drives: name devices or use --all-usb"])
        if no_bmap and bmap_path is not None:
            raise Refused([f"--bmap {bmap_path} and --no-bmap contradict each other; give one"])
        try:
            img, expected, source_notes = _open_source(image, sha256, checksum, no_checksum,
                                                       keyring, use_cache)
            image_note = (_image_sanity(img, image, force) if isinstance(img, Image)
                          else None)
            block_map = None if no_bmap else _block_map(img, bmap_path)
            size = img.size if block_map is None else block_map.image_size
            plan = make_plan(devices, all_usb=all_usb, image_path=img.path, image_size=size,
                             unmount=unmount, max_auto_size=max_size)
        except Refused as exc:
            raise Refused([*exc.notes, *exc.lines]) from None
        if image_note is not None:
            plan = dataclasses.replace(plan, notes=(image_note, *plan.notes))
        _require_access([d.path for d in plan.targets], writing=True)
        report = _open_report(report_path, img, expected)
        _confirm(plan, img, yes, "Flash")
        labels = {d.path: d.label for d in plan.targets}
        infos = [drive_info(d, i) for i, d in enumerate(plan.targets, 1)]
        view = _make_view(as_json, labels)
        emit = view.handle if report is None else _with_report(report, view)
        if not as_json:
            for note in plan.notes:
                view.handle(events.Note(note))
        for note in source_notes:
            view.handle(events.Note(note))
        cancel = Cancellation()
        _attach(img, view.handle, cancel)  # until the job relays it from its own thread
        udisks.set_cancel(cancel)  # Ctrl-C at a polkit password prompt stops the wait
        cancel.announce = getattr(view, "announce", None)
        with cancel.installed(), contextlib.ExitStack() as downloads:
            try:
                if img.format == "zip":  # its directory is at its end: download it first
                    img = _download_first(img, view, cancel, downloads)
                    if img is None:
                        return _cancelled_before_writing(plan, view, emit, cancel, infos)
                if expected is not None and not checksum_while_writing:
                    _run_checksum(img, expected, view, cancel)
                if unmount and not cancel():
                    unmount_targets(plan)
                if cancel():
                    return _cancelled_before_writing(plan, view, emit, cancel, infos)
                opened = open_targets(plan.targets, check=drives_mod.still_same)
            except Refused:
                if cancel():
                    return _cancelled_before_writing(plan, view, emit, cancel, infos)
                view.close()
                raise
            if block_map is not None and not as_json:
                view.handle(events.Note(
                    f"block map {block_map.path}: writing {format_size(block_map.mapped)} of "
                    f"{format_size(block_map.image_size)}"))
            options = FlashOptions(verify=not no_verify, bucket_size=bucket_size,
                                   buckets=buckets, stall_timeout=stall_timeout,
                                   skip_identical=skip_identical,
                                   repair_attempts=repair_attempts, bmap=block_map,
                                   checksum=expected,
                                   checksum_checked=not checksum_while_writing,
                                   probe=None if no_probe else _probe_for(size, bucket_size))
            job = FlashJob(img, opened, options, emit, cancel, infos)
            _attach(img, job.relay, cancel)  # download news comes from the reader thread
            summary = job.run()
            view.close()
            if report is not None:
                report.close()
        return _exit_status(summary, cancel)

    _run_guarded(debug, as_json, body)


def _block_map(image: Any, given: str | None) -> Bmap | None:
    """The block map named, or the one next to the image; checked against the image."""
    if _is_url(image.path):
        if given:
            raise BmapError("--bmap cannot be used with a URL yet; download the image first")
        return None
    path = given or bmap_mod.sidecar(image.path)
    return None if path is None else bmap_mod.load(path, image.size)


def _cancelled_before_writing(plan: Plan, view: Any, emit: Callable[[Any], None],
                              cancel: Cancellation, infos: Sequence[events.DriveInfo]) -> int:
    """A signal before the first write: every drive is reported cancelled, none was touched."""
    results = tuple(events.DriveResult(d.path, events.Status.CANCELLED, 0,
                                       "cancelled before writing", cause=events.Cause.CANCELLED,
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
@click.option("--stall-timeout", type=click.FloatRange(min=0.1), default=60.0,
              metavar="SECONDS", show_default=True,
              help="Fail a drive whose reads make no progress for SECONDS.")
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def verify(image: str, devices: tuple[str, ...], as_json: bool, stall_timeout: float,
           debug: bool) -> None:
    """Compare each DEVICE with IMAGE (a file or an http(s):// URL); report the first bad offset."""

    def body() -> int:
        lines: list[str] = []
        targets = []
        seen: dict[int, str] = {}
        if _is_url(image):  # streamed once, like a flash (no checksum: no writing)
            cache = Cache() if cache_wanted(None) else None
            img = remote.open_url(image, no_checksum=True, cache=cache).image
        else:
            img = open_image(image)
        for path in devices:
            try:
                drive = drives_mod.drive_for_path(path)
            except Refused as exc:
                lines.extend(exc.lines)
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
        _require_access([d.path for d in targets], writing=False)
        opened = open_targets(targets, for_writing=False)
        view = _make_view(as_json, {d.path: d.label for d in targets}, writes=False)
        infos = [drive_info(d, i) for i, d in enumerate(targets, 1)]
        cancel = Cancellation()
        cancel.announce = getattr(view, "announce", None)
        with cancel.installed():
            job = VerifyJob(img, opened, view.handle, cancel, stall_timeout, infos)
            _attach(img, job.relay, cancel)  # download news comes from the reader thread
            summary = job.run()
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


def _confirm_watch(image: Any, yes: bool, present: Sequence[drives_mod.Drive],
                   notes: Sequence[str] = ()) -> None:
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
    for note in notes:
        console.print(note, markup=False)
    console.print("[bold]Every eligible USB/SD drive plugged in from now on will be "
                  "overwritten.[/bold]")
    if not click.confirm("Continue?", default=False, err=True):
        raise Refused(["cancelled at the confirmation: nothing was written"])


def _make_watch_view(as_json: bool, image: Any, count: int | None, verify: bool) -> Any:
    if as_json:
        return JsonView()
    if sys.stdout is not None and sys.stdout.isatty():
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
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--no-probe", is_flag=True, help=NO_PROBE_HELP)
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str),
              metavar="FILE", help="Append one record per drive to FILE (.csv or .jsonl).")
@_url_options
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def watch(image: str, count: int | None, yes: bool, no_verify: bool, no_power_off: bool,
          include_present: bool, as_json: bool, max_size: int, sha256: str | None,
          checksum: str | None, no_checksum: bool, force: bool, no_probe: bool,
          report_path: str | None, keyring: str | None, use_cache: bool | None,
          debug: bool) -> None:
    """Duplicator mode: write IMAGE to every eligible drive as it is plugged in.

    Each drive is written and verified on its own as soon as it appears, then powered off
    so that it can be pulled. Ends after --count drives, or on Ctrl-C. An http(s):// IMAGE
    is downloaded once, before watching, and every drive is written from that copy.
    """

    def body() -> int:
        img, expected, source_notes = _open_source(image, sha256, checksum, no_checksum,
                                                   keyring, use_cache)
        image_note = _image_sanity(img, image, force) if isinstance(img, Image) else None
        if not _may_write_future_drives() and not udisks.available():
            raise Refused([NEEDS_ROOT_TO_WRITE])
        present = []
        if include_present:
            present = [d for d in drives_mod.discover(image_path=img.path)
                       if watch_mod.ineligibility(d, img.size, max_size) is None]
        udev_note = drives_mod.udev_hint()
        notes = [n for n in (udev_note, image_note) if n is not None]
        report = _open_report(report_path, img, expected)
        _confirm_watch(img, yes, present, notes)
        view = _make_watch_view(as_json, img, count, not no_verify)
        if udev_note is not None:
            view.handle(events.Note(udev_note))
        if image_note is not None and not as_json:
            view.handle(events.Note(image_note))
        emit = view.handle if report is None else _with_report(report, view)
        options = watch_mod.WatchOptions(count=count, verify=not no_verify,
                                         power_off=not no_power_off,
                                         include_present=include_present, max_size=max_size,
                                         checksum=expected, probe=not no_probe)
        for note in source_notes:
            view.handle(events.Note(note))
        cancel = Cancellation()
        cancel.announce = getattr(view, "announce", None)
        with cancel.installed(), contextlib.ExitStack() as downloads:
            try:
                img = _download_first(img, view, cancel, downloads)
                if img is None:
                    view.handle(events.Summary((), cancelled=True))
                    view.close()
                    return cancel.exit_status
                outcome = watch_mod.WatchSession(img, emit, cancel, options).run()
            except Refused:
                view.close()
                raise
            finally:
                if report is not None:
                    report.close()
            view.close()
        return outcome.exit_status

    _run_guarded(debug, as_json, body)


# ----------------------------------------------------------------------------------------------
# cache (downloads kept by --cache)


@main.group(name="cache")
def cache_group() -> None:
    """The downloads kept by --cache, in $XDG_CACHE_HOME/popsicle-py (~/.cache/popsicle-py)."""


@cache_group.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of entries on stdout.")
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def cache_list(as_json: bool, debug: bool) -> None:
    """List the cached downloads: URL, size, file."""

    def body() -> int:
        found = Cache().entries()
        if as_json:
            click.echo(json.dumps([{"url": e.url, "validator": e.validator, "size": e.size,
                                    "path": str(e.path), "created": round(e.created, 3)}
                                   for e in found]))
            return EXIT_OK
        if not found:
            click.echo(f"no cached downloads in {Cache().root}")
            return EXIT_OK
        table = Table()
        for column in ("URL", "Size", "File"):
            table.add_column(column, overflow="fold")
        for e in found:
            table.add_row(e.url, format_size(e.size), str(e.path))
        Console(highlight=False).print(table)
        return EXIT_OK

    _run_guarded(debug, as_json, body)


@cache_group.command(name="clean")
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def cache_clean(debug: bool) -> None:
    """Remove every cached download (and any partial one)."""

    def body() -> int:
        cache = Cache()
        count, freed = cache.clean()
        click.echo(f"removed {count} cached download(s), {format_size(freed)} freed "
                   f"({cache.root})")
        return EXIT_OK

    _run_guarded(debug, False, body)


# ----------------------------------------------------------------------------------------------
# probe (capacity check, no flashing)


def _confirm_probe(plan: Plan, yes: bool) -> None:
    """Like flash's confirmation: the probe writes test stamps (and puts the data back)."""
    _ask(plan, yes, "Probe the capacity of (test stamps are written, then put back)",
         f"Test stamps will be written to these {len(plan.targets)} drive(s). Continue?")


@main.command(name="probe")
@click.argument("devices", nargs=-1, required=True, type=DEVICE, metavar="DEVICE...")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("-u", "--unmount", is_flag=True,
              help="Unmount mounted partitions of the drives first (otherwise refuse).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable events on stdout.")
@click.option("--stall-timeout", type=click.FloatRange(min=0.1), default=60.0,
              metavar="SECONDS", show_default=True,
              help="Fail a drive whose probe has not finished after SECONDS (a hung drive).")
@click.option("--debug", is_flag=True, help="Show debug messages and tracebacks.")
def probe_command(devices: tuple[str, ...], yes: bool, unmount: bool, as_json: bool,
                  stall_timeout: float, debug: bool) -> None:
    """Check that each DEVICE stores as much as it claims (counterfeit drives), no flashing.

    Writes small test stamps spread over each drive (never its first 64 KiB) and reads them
    back, then puts back what they overwrote. Exit 0 when every drive is genuine, 1 when
    some drive is counterfeit or failed, 2 when refused.
    """
    def body() -> int:
        plan = make_plan(devices, all_usb=False, image_path=None, image_size=None,
                         unmount=unmount)
        _require_access([d.path for d in plan.targets], writing=True)
        _confirm_probe(plan, yes)
        view = _make_view(as_json, {d.path: d.label for d in plan.targets})
        cancel = Cancellation()
        with cancel.installed():
            try:
                if unmount:
                    unmount_targets(plan)
                opened = open_targets(plan.targets, check=drives_mod.still_same)
            except Refused:
                view.close()
                raise
            summary = ProbeJob(opened, view.handle, cancel, stall_timeout).run()
            view.close()
        return _exit_status(summary, cancel)

    _run_guarded(debug, as_json, body)


# ----------------------------------------------------------------------------------------------
# polkit-rule


POLKIT_RULE = "50-popsicle-py.rules"


@main.command(name="polkit-rule")
def polkit_rule() -> None:
    """Print the opt-in polkit rule: group "popsicle" may write USB drives without sudo.

    Members of the group may then open removable USB drives through udisks2 without a
    password; nothing else changes. Install it with:

    popsicle-py polkit-rule | sudo tee /etc/polkit-1/rules.d/50-popsicle-py.rules
    """
    text = (resources.files("popsicle_py") / "data" / POLKIT_RULE).read_text()
    click.echo(text, nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
