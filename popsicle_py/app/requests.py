"""What a front end asks for: one frozen request per use case, built of shared option groups.

A request is plain data: the CLI builds one from its options, a station from a form, a library
user by hand.  Nothing here touches a drive or a file; :func:`popsicle_py.app.prepare_flash`
and its siblings check a request and refuse it before a byte is written.
"""

from __future__ import annotations

from dataclasses import field

from popsicle_py.defaults import (
    DEFAULT_BUCKET_SIZE,
    DEFAULT_BUCKETS,
    DEFAULT_MAX_AUTO_SIZE,
    DEFAULT_REPAIR_ATTEMPTS,
    DEFAULT_STALL_TIMEOUT,
)
from popsicle_py.pacing import MAX_CALL
from popsicle_py.records import record
from popsicle_py.units import format_size


@record
class SourceOptions:
    """The image and how it is trusted: a file, a URL or ``-``, and its checksum."""

    image: str
    sha256: str | None = None
    checksum: str | None = None  # ALGO:HEX
    no_checksum: bool = False
    #: Trust a published checksum file only if its signature verifies against this keyring.
    keyring: str | None = None
    #: Keep a downloaded image for the next run (None: the environment decides).
    use_cache: bool | None = None
    #: Write a file that does not look like a disk image.
    force: bool = False


@record
class TargetOptions:
    """Which drives: the ones named, and with ``all_usb`` every eligible USB/SD drive."""

    devices: tuple[str, ...] = ()
    all_usb: bool = False
    #: Unmount the targets' mounted partitions first (otherwise a mounted target is refused).
    unmount: bool = False
    #: ``all_usb`` (and watch) skip drives larger than this.
    max_size: int = DEFAULT_MAX_AUTO_SIZE


@record
class EngineOptions:
    """How the bytes move: the ring's size and when a silent drive counts as stalled."""

    bucket_size: int = DEFAULT_BUCKET_SIZE
    buckets: int = DEFAULT_BUCKETS
    stall_timeout: float = DEFAULT_STALL_TIMEOUT

    @property
    def ring(self) -> int:
        """The bytes the ring may hold at once (every bucket filled)."""
        return self.bucket_size * self.buckets


#: A ring this small (the default) is never refused, however little memory is free.
ALWAYS_ALLOWED_RING = DEFAULT_BUCKET_SIZE * DEFAULT_BUCKETS


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None: not said)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def lane_memory(engine: EngineOptions) -> int:
    """What each drive holds besides the ring: its read-back buffer, one read call (a laggard
    on its own holds one such buffer instead)."""
    return min(MAX_CALL, engine.bucket_size)


#: A bucket is written with O_DIRECT: whole pages, and not so large that the ring cannot be had.
BUCKET_ALIGN = 4096
MAX_BUCKET_SIZE = 1 << 30
MAX_BUCKETS = 64
MIN_STALL_TIMEOUT = 0.1


def engine_refusal(engine: EngineOptions) -> str | None:
    """Why the engine cannot run with these settings (the CLI's options cannot give them)."""
    size, count, stall = engine.bucket_size, engine.buckets, engine.stall_timeout
    if not isinstance(size, int) or not BUCKET_ALIGN <= size <= MAX_BUCKET_SIZE \
            or size % BUCKET_ALIGN:
        return (f"bucket size {size!r}: must be a multiple of 4 KiB (4096 bytes), "
                "at most 1 GiB")
    if not isinstance(count, int) or not 1 <= count <= MAX_BUCKETS:
        return f"buckets {count!r}: must be 1 to {MAX_BUCKETS}"
    if not isinstance(stall, (int, float)) or not MIN_STALL_TIMEOUT <= stall < float("inf"):
        return f"stall timeout {stall!r}: must be a finite number of seconds, at least 0.1"
    return None


def ring_refusal(engine: EngineOptions, available: int | None, drives: int = 1) -> str | None:
    """Why the ring and the ``drives``' own buffers cannot be had, or None.  ``available`` is
    the memory the system has for new allocations (MemAvailable; None: unknown).  Above half
    of it, the run would push out the page cache and other programs, or be killed for memory
    halfway through a write (the buckets are only touched as they fill): refused before
    anything starts.  The default ring is never refused; nor is a ring the engine cannot
    run (a library's request, which no option parsing checked), refused here rather than
    failing with a ValueError in the run, the drives already opened."""
    unusable = engine_refusal(engine)
    if unusable is not None:
        return unusable
    need = engine.ring + drives * lane_memory(engine)
    if engine.ring <= ALWAYS_ALLOWED_RING or available is None or need <= available // 2:
        return None
    lanes = (f" and {format_size(lane_memory(engine))} per drive for {drives} drives"
             if engine.ring <= available // 2 else "")  # said when they tip the balance
    return (f"a ring of {format_size(engine.ring)} ({engine.buckets} x "
            f"{format_size(engine.bucket_size)}){lanes} is more than half the memory available "
            f"({format_size(available)}): use a smaller --bucket-size or fewer --buckets")


@record
class WriteOptions:
    """What a flash does besides writing: verification, repairs, the probe, writing less."""

    verify: bool = True
    #: Probe each drive's real capacity before writing it (counterfeit sticks).
    probe: bool = True
    repair_attempts: int = DEFAULT_REPAIR_ATTEMPTS
    skip_identical: bool = False
    #: A block map file (None: the one beside the image, unless ``no_bmap``).
    bmap: str | None = None
    no_bmap: bool = False
    #: Write only what the image's file systems use (ext2/3/4, FAT; not with a block map).
    trim: bool = True
    #: Check the checksum in the write pass only, not in a pass before it.
    checksum_while_writing: bool = False


@record
class CustomizeOptions:
    """Per-drive first-boot settings written into each drive's boot partition (issue 27)."""

    #: The settings file (TOML); its values may be templates.
    settings: str
    #: A CSV file of per-drive values (a row per drive, by seq, slot, serial or order).
    values: str | None = None
    #: "cloud-init" or "firstrun" (None: what the image holds decides).
    format: str | None = None


@record
class GradeOptions:
    """How each drive is graded and certified (flash, watch, the station).

    Speeds in bytes per second, measured at steady state; ``capacity`` with ``tolerance``
    (percent) rejects drives of another size before writing; ``certificate`` is a directory
    for one certificate per verified drive, signed with the OpenSSH key ``sign_key``.
    """

    min_write_speed: int | None = None
    min_read_speed: int | None = None
    capacity: int | None = None
    tolerance: float = 0.0
    surface_test: bool = False
    certificate: str | None = None
    sign_key: str | None = None


@record
class FlashRequest:
    """Write one image to many drives, verify each, and say how each ended."""

    source: SourceOptions
    targets: TargetOptions = field(default_factory=TargetOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)
    write: WriteOptions = field(default_factory=WriteOptions)
    #: Append one record per drive to this file (.csv or .jsonl).
    report: str | None = None
    grade: GradeOptions = field(default_factory=GradeOptions)
    customize: CustomizeOptions | None = None


@record
class VerifyRequest:
    """Compare drives with an image (a file or a URL); nothing is written."""

    image: str
    devices: tuple[str, ...]
    stall_timeout: float = DEFAULT_STALL_TIMEOUT


@record
class ProbeRequest:
    """Check that drives hold what they claim (test stamps, put back afterwards)."""

    devices: tuple[str, ...]
    unmount: bool = False
    stall_timeout: float = DEFAULT_STALL_TIMEOUT


@record
class WatchRequest:
    """Duplicator mode: write every eligible drive plugged in, each on its own timeline."""

    source: SourceOptions
    #: End once this many drives finished (None: until a signal).
    count: int | None = None
    verify: bool = True
    probe: bool = True
    power_off: bool = True
    #: Also write the eligible drives plugged in before watching.
    include_present: bool = False
    max_size: int = DEFAULT_MAX_AUTO_SIZE
    report: str | None = None
    grade: GradeOptions = field(default_factory=GradeOptions)
    customize: CustomizeOptions | None = None
    #: Skip the free space of the image's file systems, as flash does (the raw copy of a
    #: compressed image too): see :mod:`popsicle_py.app.trim`.
    trim: bool = True
    #: A drive, or the image (read, checked or decompressed), making no progress this long fails.
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
