"""Click parameter types and the option groups flash, watch and (next) the station share.

A group is a set of click options that arrive at the command as one option object of the
application layer (``SourceOptions``, ``EngineOptions`` ...), so a command takes a handful of
parameters and two commands cannot drift apart on what an option means.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from popsicle_py.app.requests import (
    BUCKET_ALIGN,
    MAX_BUCKET_SIZE,
    CustomizeOptions,
    EngineOptions,
    GradeOptions,
    SourceOptions,
    TargetOptions,
    WatchRequest,
    WriteOptions,
)
from popsicle_py.defaults import (
    DEFAULT_BUCKETS,
    DEFAULT_REPAIR_ATTEMPTS,
    DEFAULT_STALL_TIMEOUT,
)
from popsicle_py.records import record
from popsicle_py.units import parse_size

F = TypeVar("F", bound=Callable[..., object])
#: What click.option and click.argument return: a decorator of a command's callback.
Decorator = Callable[[Callable[..., object]], Callable[..., object]]


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


class FiniteFloat(click.FloatRange):
    """A number in a range, never ``nan`` or ``inf``: they pass every comparison a range
    makes, and ``--stall-timeout nan`` would never find a hung drive stalled."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def stall_timeout_option(help_text: str = "Fail a drive that makes no progress for SECONDS."
                         ) -> Decorator:
    """``--stall-timeout SECONDS``, one definition for every command that has it."""
    return click.option("--stall-timeout", type=FiniteFloat(min=0.1),
                        default=DEFAULT_STALL_TIMEOUT, metavar="SECONDS", show_default=True,
                        help=help_text)



class BucketSizeType(SizeType):
    """A bucket size: a multiple of 4 KiB, at most 1 GiB."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> int:
        size = super().convert(value, param, ctx)
        if size % BUCKET_ALIGN:
            text = str(value).strip()
            unit = text[-2:].upper()
            if unit in ("KB", "MB", "GB"):  # powers of 1000: say what was probably meant
                self.fail(f"must be a multiple of 4 KiB (4096 bytes); {text} is {size} bytes "
                          f"({unit} means powers of 1000): did you mean "
                          f"{text[:-2].strip()}{unit[0]}iB?", param, ctx)
            self.fail(f"must be a multiple of 4 KiB (4096 bytes), not {size}", param, ctx)
        if size > MAX_BUCKET_SIZE:
            self.fail("must be at most 1 GiB", param, ctx)
        return size


BUCKET_SIZE = BucketSizeType()
class DevicePath(click.Path):
    """A drive's name, taken as given: the drive layer looks it up, off the main thread
    (click's stat() of a name on a hung share would hang before it, Ctrl-C unheard)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        return os.fsdecode(value) if isinstance(value, bytes) else value


# Not readable=True: an ordinary user's "not readable" is said once, as what is needed
# (the access check), after the usual checks of each path.
DEVICE = DevicePath(dir_okay=False, readable=False, path_type=str)

FORCE_HELP = "Write an image that does not look like a disk image (text, HTML, tiny)."
NO_PROBE_HELP = ("Do not check, before writing, that each drive stores as much as it claims "
                 "(the counterfeit-stick probe).")
NO_TRIM_HELP = ("Write every byte, also the free space of the image's ext2/3/4 and FAT file "
                "systems.")


def report_option() -> Decorator:
    return click.option(
        "--report", "report", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
        help="Append one record per drive to FILE (.csv or .jsonl).")


def max_size_option(help_text: str) -> Decorator:
    return click.option("--max-size", type=SIZE, default="128GiB", show_default=True,
                        help=help_text)


def yes_option() -> Decorator:
    return click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")


@record
class OutputOptions:
    """How a command speaks: JSON events for scripts, debug messages and tracebacks."""

    json: bool = False
    debug: bool = False


class OptionGroup:
    """Options that reach the command as one object, built by ``build`` from their values."""

    def __init__(self, name: str, build: Callable[..., object],
                 *params: Decorator) -> None:
        self.name = name
        self.build = build
        self.params = params

        def probe() -> None: ...

        decorated: Callable[..., object] = probe
        for param in params:
            decorated = param(decorated)
        self.keys = tuple(p.name for p in decorated.__click_params__)  # type: ignore[attr-defined]

    def __call__(self, command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: object, **kwargs: object) -> object:
            values = {key: kwargs.pop(key) for key in self.keys}
            kwargs[self.name] = self.build(**values)
            return command(*args, **kwargs)

        wrapper.__dict__.pop("__click_params__", None)  # not the command's own list
        decorated: Callable[..., object] = wrapper
        for param in reversed(self.params):
            decorated = param(decorated)
        extra = list(getattr(decorated, "__click_params__", []))
        decorated.__click_params__ = [  # type: ignore[attr-defined]
            *getattr(command, "__click_params__", []), *extra]
        return decorated  # type: ignore[return-value]


def _source(image: str, sha256: str | None, checksum: str | None, no_checksum: bool,
            force: bool, keyring: str | None, use_cache: bool | None) -> SourceOptions:
    return SourceOptions(image, sha256=sha256, checksum=checksum, no_checksum=no_checksum,
                         keyring=keyring, use_cache=use_cache, force=force)


class ImagePath(click.Path):
    """A path click does not stat() while it parses: an image on a hung disk or network
    share would hold the main thread there, Ctrl-C included, before the checks that watch
    their reads (app.sources.watched_checks) could begin.  Those checks say in one line what
    is wrong with it."""

    def convert(self, value: str | os.PathLike[str], param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if not os.fspath(value):  # "" would be taken for the current directory
            self.fail("the image's name is empty (an unset variable?)", param, ctx)
        return self.coerce_path_result(value)


#: The IMAGE argument (flash, watch, verify, the station).
IMAGE = ImagePath(path_type=str)


#: IMAGE and how it is trusted (flash, watch, the station).  Put it first: IMAGE is the first
#: argument.
source_options = OptionGroup(
    "source", _source,
    click.argument("image", type=IMAGE),
    click.option("--sha256", metavar="HEX", help="Expected SHA-256 of the image file."),
    click.option("--checksum", metavar="ALGO:HEX",
                 help="Expected checksum (sha1, sha256, sha512 or blake2b) of the image file."),
    click.option("--no-checksum", is_flag=True,
                 help="Ignore a checksum file next to the image."),
    click.option("--force", is_flag=True, help=FORCE_HELP),
    click.option("--keyring", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
                 help="Trust the checksum file only if its signature (.gpg, .sign, .asc, "
                      ".sig) verifies with gpgv against this keyring."),
    click.option("--cache/--no-cache", "use_cache", default=None,
                 help="Keep a downloaded IMAGE (a URL) in ~/.cache/popsicle-py for the next "
                      "run (default: off, or $POPSICLE_PY_CACHE)."),
)


def _targets(devices: tuple[str, ...], all_usb: bool, unmount: bool,
             max_size: int) -> TargetOptions:
    return TargetOptions(devices, all_usb=all_usb, unmount=unmount, max_size=max_size)


#: The drives a flash writes.
target_options = OptionGroup(
    "targets", _targets,
    click.argument("devices", nargs=-1, type=DEVICE, metavar="[DEVICE]..."),
    click.option("-a", "--all-usb", is_flag=True, help="Add every eligible USB and SD drive."),
    click.option("-u", "--unmount", is_flag=True,
                 help="Unmount mounted partitions of the targets first (otherwise refuse)."),
    max_size_option("--all-usb skips drives larger than this."),
)


#: How the bytes move.
engine_options = OptionGroup(
    "engine", EngineOptions,  # its ring is judged by prepare_flash
    click.option("--bucket-size", type=BUCKET_SIZE, default="16M", show_default=True,
                 help="Size of each buffer in the ring (16M, 4MiB, 1048576)."),
    click.option("--buckets", type=click.IntRange(1, 64), default=DEFAULT_BUCKETS,
                 metavar="N", show_default=True, help="How many buffers may be in flight."),
    stall_timeout_option(),
)


def _write(no_verify: bool, no_probe: bool, repair_attempts: int, skip_identical: bool,
           bmap: str | None, no_bmap: bool, no_trim: bool,
           checksum_while_writing: bool) -> WriteOptions:
    return WriteOptions(verify=not no_verify, probe=not no_probe,
                        repair_attempts=repair_attempts, skip_identical=skip_identical,
                        bmap=bmap, no_bmap=no_bmap, trim=not no_trim,
                        checksum_while_writing=checksum_while_writing)


#: What a flash does besides writing.
write_options = OptionGroup(
    "write", _write,
    click.option("--no-verify", is_flag=True, help="Skip reading the drives back."),
    click.option("--no-probe", is_flag=True, help=NO_PROBE_HELP),
    click.option("--repair-attempts", type=click.IntRange(0, 10),
                 default=DEFAULT_REPAIR_ATTEMPTS, metavar="N", show_default=True,
                 help="Rewrite buckets that fail verification up to N times."),
    click.option("--skip-identical", is_flag=True,
                 help="Read each bucket first and write only those that differ (re-flash, "
                      "resume)."),
    click.option("--bmap", "bmap", type=click.Path(dir_okay=False, path_type=str),
                 metavar="FILE", help="Block map (bmaptool): write only its mapped ranges "
                 "(default: IMAGE.bmap when present)."),
    click.option("--no-bmap", is_flag=True, help="Ignore a block map next to the image."),
    click.option("--no-trim", is_flag=True, help=NO_TRIM_HELP),
    click.option("--checksum-while-writing", is_flag=True,
                 help="Check the checksum only in the pass that writes the drives (no read "
                      "of the image before writing)."),
)


def _customize(customize: str | None, values: str | None,
               customize_format: str | None) -> CustomizeOptions | None:
    if customize is None:
        if values is not None or customize_format is not None:
            raise click.UsageError("--values and --customize-format need --customize FILE.toml")
        return None
    return CustomizeOptions(customize, values=values, format=customize_format)


#: Per-drive first-boot settings (flash, watch): a CustomizeOptions, or None.
customize_options = OptionGroup(
    "customize", _customize,
    click.option("--customize", type=click.Path(dir_okay=False, path_type=str),
                 metavar="FILE.toml",
                 help="Write each drive's first-boot settings (hostname, user, SSH keys, "
                      "Wi-Fi, ...) from FILE.toml into its boot partition, before its head."),
    click.option("--values", type=click.Path(dir_okay=False, path_type=str),
                 metavar="FILE.csv",
                 help="Per-drive values for --customize's {templates}: a row per drive, "
                      "matched by its seq, slot or serial column (else by order)."),
    click.option("--customize-format", type=click.Choice(["cloud-init", "firstrun"]),
                 help="cloud-init NoCloud files, or Raspberry Pi OS's firstrun.sh "
                      "(default: what the image's boot partition holds)."),
)


def output_options(json_help: str = "Machine-readable events on stdout.") -> OptionGroup:
    """--json and --debug, as one :class:`OutputOptions`."""
    return OptionGroup(
        "output", OutputOptions,
        click.option("--json", "json", is_flag=True, help=json_help),
        click.option("--debug", is_flag=True, help="Show debug messages and tracebacks."),
    )


@record
class Session:
    """watch's own options (everything but the image): which drives, and what is done."""

    count: int | None
    no_verify: bool
    no_power_off: bool
    include_present: bool
    max_size: int
    no_probe: bool
    no_trim: bool
    report: str | None
    stall_timeout: float

    def request(self, source: SourceOptions) -> WatchRequest:
        return WatchRequest(source, count=self.count, verify=not self.no_verify,
                            probe=not self.no_probe, power_off=not self.no_power_off,
                            include_present=self.include_present, max_size=self.max_size,
                            report=self.report, trim=not self.no_trim,
                            stall_timeout=self.stall_timeout)


#: The session's options, as ``watch`` has them.
session_options = OptionGroup(
    "session", Session,
    click.option("--count", type=click.IntRange(min=1), metavar="N",
                 help="Stop once N drives have finished (ok or failed); start no more than N."),
    click.option("--no-verify", is_flag=True, help="Skip reading the drives back."),
    click.option("--no-power-off", is_flag=True,
                 help="Leave finished drives powered on (default: power them off)."),
    click.option("--include-present", is_flag=True,
                 help="Also write the eligible drives plugged in before starting."),
    max_size_option("Skip drives larger than this."),
    click.option("--no-probe", is_flag=True, help=NO_PROBE_HELP),
    click.option("--no-trim", is_flag=True, help=NO_TRIM_HELP),
    report_option(),
    stall_timeout_option("Fail a drive that makes no progress for SECONDS; also the image, "
                         "read or decompressed."),
)


class RateType(SizeType):
    """Bytes per second written as 15MB/s, 12MiB/s or 15M."""

    name = "RATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        try:
            size = parse_size(text[:-2] if text.lower().endswith("/s") else text)
        except ValueError as exc:  # named as given, "/s" and all ("/s" alone was "not a size: ''")
            why = (f"not a speed: {text[:40]!r} (examples: 15MB/s, 12MiB/s, 15M)"
                   if str(exc).startswith("not a size") else str(exc))
            self.fail(why, param, ctx)
        if size < 1:
            self.fail("must be at least 1 byte per second", param, ctx)
        return size


RATE = RateType()


def _grade(min_write_speed: int | None, min_read_speed: int | None, capacity: int | None,
           tolerance: float, surface_test: bool, certificate: str | None,
           sign_key: str | None) -> GradeOptions:
    return GradeOptions(min_write_speed=min_write_speed, min_read_speed=min_read_speed,
                        capacity=capacity, tolerance=tolerance, surface_test=surface_test,
                        certificate=certificate, sign_key=sign_key)


#: How drives are graded and certified (flash, watch, the station).
grade_options = OptionGroup(
    "grade", _grade,
    click.option("--min-write-speed", type=RATE,
                 help="Reject a drive that writes slower than RATE (15MB/s) at steady state "
                      "(not its first seconds): it is not written further."),
    click.option("--min-read-speed", type=RATE,
                 help="Reject a drive that reads back slower than RATE at steady state."),
    click.option("--capacity", type=SIZE,
                 help="Reject, before writing, a drive whose size is not SIZE (32GB), within "
                      "--tolerance."),
    click.option("--tolerance", type=FiniteFloat(0, 100), default=0.0, metavar="PCT",
                 show_default=True, help="How far from --capacity a drive's size may be, in "
                                         "percent."),
    click.option("--surface-test", is_flag=True,
                 help="After verification, write the rest of each drive with a pattern, read "
                      "it back and clear it (as f3 does): a bad region rejects the drive."),
    click.option("--certificate", "certificate", metavar="DIR",
                 type=click.Path(file_okay=False, path_type=str),
                 help="Write a certificate (JSON) for each drive read back as the image into "
                      "DIR: what was read, which drive, when; `popsicle-py check` re-reads "
                      "the drive against it later, without the image."),
    click.option("--sign-key", "sign_key", metavar="KEY",
                 type=click.Path(dir_okay=False, path_type=str),
                 help="Sign each certificate with this OpenSSH key (ssh-keygen -Y sign, "
                      "namespace popsicle-py; the signature beside it, NAME.json.sig)."),
)
