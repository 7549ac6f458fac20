"""A run's customisation: the settings, the values, the image's boot partition and format,
and each drive's files; built once before anything is written (every refusal first).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from popsicle_py.records import record
from popsicle_py.settings.cloudinit import cloud_init_files
from popsicle_py.settings.fat import (
    BootPartition,
    FatError,
    Read,
    find_boot_partition,
    geometry,
    read_fat,
    root_files,
)
from popsicle_py.settings.firstrun import firstrun_files
from popsicle_py.settings.model import (
    Settings,
    SettingsError,
    check_format,
    load_settings,
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

__all__ = ["FORMATS", "HEAD_LIMIT", "BootImage", "Customization", "DriveFiles",
           "inspect_boot", "load_customization"]

FORMATS = ("cloud-init", "firstrun")
CLOUD_INIT_NAMES = frozenset({"user-data", "meta-data", "network-config"})
#: The engine writes the image's head last (up to its first partition, at least 64 KiB: see
#: popsicle_py.engine.head): the boot partition must begin after 64 KiB.
HEAD_LIMIT = 64 * 1024


@record
class BootImage:
    """The image's boot partition and the format its first boot reads."""

    partition: BootPartition
    format: str
    cmdline: bytes | None


def inspect_boot(read: Read, chosen: str | None) -> BootImage:
    """Find the FAT boot partition and choose the format: cloud-init when the partition holds
    NoCloud files, else the first-run script when it holds ``cmdline.txt`` (Raspberry Pi OS
    before Trixie), else cloud-init.  Raises :class:`SettingsError`."""
    try:
        part = find_boot_partition(read)
        if part.offset < HEAD_LIMIT:
            raise SettingsError("the image's boot partition begins in its first 64 KiB, "
                                "which is written last; it cannot be customised")

        def in_part(offset: int, length: int) -> bytes:
            return read(part.offset + offset, length)

        geo = geometry(in_part(0, 512))
        fat = read_fat(geo, in_part(geo.reserved, geo.fat_size))
        files = root_files(geo, fat, in_part, {"cmdline.txt", *CLOUD_INIT_NAMES})
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
    return BootImage(part, fmt, cmdline)


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

    def for_drive(self, drive: DriveContext) -> DriveFiles:
        """Raises :class:`SettingsError` (no row for it, a bad value)."""
        return self.files_for(resolve(self.settings, self.values, drive))

    def for_batch(self, drives: Sequence[DriveContext]) -> tuple[DriveFiles, ...]:
        """Every drive of a flash; no host name twice.  Raises :class:`SettingsError`."""
        return tuple(self.files_for(s) for s in resolve_all(self.settings, self.values, drives))

    @property
    def rows(self) -> int | None:
        return len(self.values.rows) if self.values is not None else None


def load_customization(settings_path: str, values_path: str | None, chosen: str | None,
                       read: Read) -> Customization:
    """Load and cross-check the files and the image; raises :class:`SettingsError`."""
    settings = load_settings(settings_path)
    values = None
    if values_path is not None:
        try:
            with open(values_path, encoding="utf-8-sig", newline="") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{values_path}: {getattr(exc, 'strerror', None) or exc}"
                                ) from None
        values = parse_values(text, values_path)
    check_templates(settings, values, settings_path)
    if chosen is not None and chosen not in FORMATS:
        raise SettingsError(f"unknown format {chosen!r} (known: {', '.join(FORMATS)})")
    boot = inspect_boot(read, chosen)
    check_format(settings, boot.format, settings_path)
    return Customization(settings, values, boot)
