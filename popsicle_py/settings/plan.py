"""A run's customisation: the settings, the values, the image's boot partition and format,
and each drive's files; built once before anything is written (every refusal first).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence

from popsicle_py.engine.head import head_length
from popsicle_py.records import record
from popsicle_py.settings.cloudinit import cloud_init_files
from popsicle_py.settings.fat import (
    BootPartition,
    FatError,
    FatGeometry,
    PastDecoded,
    Read,
    find_boot_partition,
    free_clusters,
    geometry,
    read_fat,
    root_entries,
    root_files,
    root_free_slots,
)
from popsicle_py.settings.firstrun import firstrun_files
from popsicle_py.settings.model import (
    Settings,
    SettingsError,
    check_format,
    load_settings,
    read_input,
    redacted,
)
from popsicle_py.settings.values import (
    DriveContext,
    Values,
    check_templates,
    parse_values,
    resolve,
    resolve_all,
)

__all__ = ["FORMATS", "HEAD_LIMIT", "BootImage", "BootSpace", "Customization", "DriveFiles",
           "inspect_boot", "load_customization"]

FORMATS = ("cloud-init", "firstrun")
CLOUD_INIT_NAMES = frozenset({"user-data", "meta-data", "network-config"})
#: The files each format always writes besides the [files] (cloud-init: network-config too,
#: with Wi-Fi).
WRITTEN = {"cloud-init": ("user-data", "meta-data"), "firstrun": ("firstrun.sh", "cmdline.txt")}
#: Every file a format may write (cloud-init: network-config with Wi-Fi only).
FORMAT_NAMES = {"cloud-init": CLOUD_INIT_NAMES, "firstrun": frozenset(WRITTEN["firstrun"])}
DIRENT = 32
#: The engine writes the image's head last (up to its first partition, at least 64 KiB, at
#: most 1 MiB: see popsicle_py.engine.head.head_length, judged from this much of the image):
#: the boot partition must begin after the head.
HEAD_LIMIT = 64 * 1024
#: The boot sector's "dirty" flag (FAT12/16: byte 37, FAT32: byte 65), which ``fsck.vfat -n``
#: (dosfstools 4.2) reports as "Dirty bit is set" (exit 1) whatever the extended signature.
DIRTY_FLAG = {12: 37, 16: 37, 32: 65}
#: The fewest clusters of FAT32 (fewer is FAT16 by the specification, and to mtools).
FAT32_MIN_CLUSTERS = 65525


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


@record
class BootSpace:
    """Room in the image's boot file system, counted from its FAT before any drive is written.

    Counted so that files said to fit do: a file replaced (``cmdline.txt``, cloud-init's) is
    taken to keep its clusters and entries, every name to need long-name entries, and the
    root's deleted slots not to be reused."""

    cluster: int  # bytes
    free: int  # clusters
    #: Free 32-byte slots at the end of the root directory.
    root_slots: int
    #: FAT32: the root directory grows into free clusters; FAT12/16: its size is fixed.
    root_grows: bool

    @staticmethod
    def slots_for(names: Iterable[str]) -> int:
        """Root directory slots the names take: each its short entry and, being lower case
        or long, a long-name entry per 13 characters."""
        return sum(-(-len(name) // 13) + 1 for name in names)

    def clusters_for(self, sizes: Mapping[str, int]) -> int | None:
        """Clusters the files and their directory entries take; None: the root has no room."""
        data = sum(-(-size // self.cluster) for size in sizes.values())
        slots = self.slots_for(sizes)
        if slots <= self.root_slots:
            return data
        if not self.root_grows:
            return None
        return data + -(-slots * DIRENT // self.cluster)

    def refusal(self, sizes: Mapping[str, int], at_least: bool = False) -> str | None:
        """Why these files cannot be written into the boot partition, or None."""
        need = self.clusters_for(sizes)
        some = "at least " if at_least else ""
        if need is None:
            return (f"the first-boot files ({len(sizes)}) need {some}"
                    f"{self.slots_for(sizes)} slots in the root directory of the image's boot "
                    "partition (FAT12/16: a fixed size), which has room for "
                    f"{self.root_slots} (each name takes one, and one more per 13 characters)")
        if need <= self.free:
            return None
        name = max(sizes, key=lambda n: sizes[n])
        return (f"the first-boot files need {some}{_size(need * self.cluster)} of the image's "
                f"boot partition, which has {_size(self.free * self.cluster)} free "
                f"({_size((need - self.free) * self.cluster)} short; the largest file, {name}, "
                f"is {_size(sizes[name])})")


@record
class BootImage:
    """The image's boot partition, the format its first boot reads and its room."""

    partition: BootPartition
    format: str
    cmdline: bytes | None
    space: BootSpace
    #: The root directory's subdirectories (lower case): a file cannot take one's name.
    directories: frozenset[str] = frozenset()


def inspect_boot(read: Read, chosen: str | None) -> BootImage:
    """Find the FAT boot partition and choose the format: cloud-init when the partition holds
    NoCloud files, else the first-run script when it holds ``cmdline.txt`` (Raspberry Pi OS
    before Trixie), else cloud-init.  Raises :class:`SettingsError`."""
    try:
        part = find_boot_partition(read)
        head = head_length(read(0, HEAD_LIMIT))
        if part.offset < head:
            raise SettingsError(f"the image's boot partition begins in its first "
                                f"{_size(head)}, which is written last; it cannot be "
                                "customised")

        def in_part(offset: int, length: int) -> bytes:
            data = read(part.offset + offset, length)
            if len(data) < length:
                raise FatError("the image ends inside its boot partition")
            return data

        boot = in_part(0, 512)
        geo = geometry(boot)
        if geo.total > part.size:
            raise FatError(f"its boot file system ({_size(geo.total)}) is larger than its "
                           f"partition ({_size(part.size)})")
        _mtools_can_write(geo, boot)
        if boot[DIRTY_FLAG[geo.bits]] & 0x01:
            raise SettingsError(
                "the image's boot file system is marked dirty (it was imaged while mounted): "
                "fsck.vfat would fail every drive; run fsck.vfat -a on the image's boot "
                "partition, or unmount it cleanly before imaging")
        fat = read_fat(geo, in_part(geo.reserved, geo.fat_size))
        _fsck_clean(in_part, geo, fat)
        files = root_files(geo, fat, in_part, {"cmdline.txt", *CLOUD_INIT_NAMES})
        directories = frozenset(e.name.lower() for e in root_entries(geo, fat, in_part)
                                if e.directory)
        fsinfo = in_part(geo.fsinfo, 512) if geo.fsinfo is not None else None
        space = BootSpace(geo.cluster, free_clusters(geo, fat, fsinfo),
                          root_free_slots(geo, fat, in_part), geo.bits == 32)
    except FatError as exc:
        raise SettingsError(f"cannot customise this image: {exc}") from None
    names = {n.lower() for n in files}
    cmdline = next((data for name, (data, _) in files.items() if name.lower() == "cmdline.txt"),
                   None)
    fmt = chosen or ("cloud-init" if names & CLOUD_INIT_NAMES else
                     "firstrun" if cmdline is not None else "cloud-init")
    if fmt == "firstrun" and cmdline is None:
        raise SettingsError("--customize-format firstrun needs cmdline.txt in the image's "
                            "boot partition (Raspberry Pi OS)")
    return BootImage(part, fmt, cmdline, space, directories)


def _fsck_clean(read: Read, geo: FatGeometry, fat: list[int]) -> None:
    """What ``fsck.vfat -n`` finds in the image's boot file system (two FATs that differ, the
    dirty bit of the FAT's second entry ...) it finds on every drive after its files are
    written, and fails each after its whole write: refused before."""
    from popsicle_py.settings.bootfs import BootFsError, check_image_fs

    try:
        found = check_image_fs(read, geo, fat)
    except BootFsError as exc:  # fsck.vfat or $TMPDIR: not the image
        raise SettingsError(f"cannot check the image's boot partition: {exc}") from None
    except PastDecoded:  # a compressed image's directory far in: each drive is checked after
        return
    if found:
        raise SettingsError("cannot customise this image: fsck.vfat -n finds problems in its "
                            f"boot partition ({'; '.join(found)}), which every drive would "
                            "fail on after its write: run fsck.vfat -a on the image's boot "
                            "partition")


def _mtools_can_write(geo: FatGeometry, boot: bytes) -> None:
    """FAT32 that mtools misreads: fewer clusters than FAT32 has by the specification (it
    takes the file system for FAT16: "No directory slots"), or FAT mirroring off (it writes
    the active FAT only, not the first, which the check reads back)."""
    if geo.bits != 32:
        return
    if geo.clusters < FAT32_MIN_CLUSTERS:
        raise SettingsError(f"cannot customise this image: its boot file system is FAT32 "
                            f"with {geo.clusters} clusters, fewer than the "
                            f"{FAT32_MIN_CLUSTERS} FAT32 needs, which mtools cannot write")
    if boot[40] & 0x80:
        raise SettingsError("cannot customise this image: its boot file system (FAT32) has "
                            "FAT mirroring off, which mtools cannot write safely")


@record
class DriveFiles:
    """What one drive gets: its settings (templates filled), the files, and its record."""

    settings: Settings
    files: dict[str, bytes]

    def record(self, fmt: str, digest: str) -> dict[str, object]:
        """The values used (secrets redacted), the format and the files' digest."""
        return {"format": fmt, "values": redacted(self.settings), "files": sorted(self.files),
                "files_sha256": digest}


@record
class Customization:
    settings: Settings
    values: Values | None
    boot: BootImage

    @property
    def format(self) -> str:
        return self.boot.format

    def files_for(self, settings: Settings) -> DriveFiles:
        """One drive's files (a fresh instance-id and password salt each time)."""
        if self.boot.format == "firstrun":
            assert self.boot.cmdline is not None
            files = firstrun_files(settings, self.boot.cmdline)
        else:
            files = cloud_init_files(settings, f"iid-popsicle-{uuid.uuid4()}")
        files.update(settings.files)
        return DriveFiles(settings, files)

    def fitting(self, files: DriveFiles, drive: DriveContext) -> DriveFiles:
        """``files``, when they fit in the boot partition; raises :class:`SettingsError`."""
        why = self.boot.space.refusal({n: len(d) for n, d in files.files.items()})
        if why is not None:
            raise SettingsError(f"{drive.name}: {why}")
        return files

    def for_drive(self, drive: DriveContext) -> DriveFiles:
        """Raises :class:`SettingsError` (no row for it, a bad value, no room)."""
        return self.fitting(self.files_for(resolve(self.settings, self.values, drive)), drive)

    def for_batch(self, drives: Sequence[DriveContext]) -> tuple[DriveFiles, ...]:
        """Every drive of a flash; no host name twice, each drive's files fit.  Raises
        :class:`SettingsError`."""
        resolved = resolve_all(self.settings, self.values, drives)
        return tuple(self.fitting(self.files_for(s), d)
                     for s, d in zip(resolved, drives, strict=True))

    @property
    def rows(self) -> int | None:
        return len(self.values.rows) if self.values is not None else None


def load_customization(settings_path: str, values_path: str | None, chosen: str | None,
                       read: Read) -> Customization:
    """Load and cross-check the files and the image; raises :class:`SettingsError`."""
    settings = load_settings(settings_path)
    values = None
    if values_path is not None:
        raw = read_input(values_path)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:  # Excel's "CSV" is the Windows code page
            line = raw[:exc.start].count(b"\n") + 1
            raise SettingsError(f"{values_path}: not UTF-8 text (line {line}): save it as "
                                "\"CSV UTF-8\"") from None
        values = parse_values(text, values_path)
    check_templates(settings, values, settings_path)
    if chosen is not None and chosen not in FORMATS:
        raise SettingsError(f"unknown format {chosen!r} (known: {', '.join(FORMATS)})")
    boot = inspect_boot(read, chosen)
    check_format(settings, boot.format, settings_path)
    own = sorted(FORMAT_NAMES[boot.format] & boot.directories)
    if own:  # mcopy fails on it, with the drive written: refused before
        raise SettingsError(f"the image's boot partition has a directory named {own[0]}, "
                            f"where the {boot.format} format writes a file")
    taken = sorted(name for name, _ in settings.files if name.lower() in boot.directories)
    if taken:  # mcopy fails on it, with the drive written: refused before
        raise SettingsError(f"{settings_path}: [files] {taken[0]!r}: the image's boot "
                            "partition has a directory of that name")
    why = boot.space.refusal(least_files(settings.files, WRITTEN[boot.format]), at_least=True)
    if why is not None:  # every drive's would not fit: refused before the first (watch too)
        raise SettingsError(why)
    return Customization(settings, values, boot)


def least_files(extra: Iterable[tuple[str, bytes]], written: Iterable[str]) -> dict[str, int]:
    """What every drive's files take at least: the [files] as they are, and one byte of each
    file the format writes (its content depends on the drive)."""
    return {**{name: 1 for name in written}, **{name: len(data) for name, data in extra}}
