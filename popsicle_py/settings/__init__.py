"""Per-drive first-boot settings (issue 27): each drive its own hostname, user, keys, Wi-Fi.

Bottom up: sha512crypt, countries, model (the TOML file), values (templates and the CSV),
yamltext, cloudinit and firstrun (the files), fat (partitions and an independent FAT reader),
plan (a run's customisation, checked before writing), bootfs (writing a drive's boot partition
with mtools and proving what changed).
"""

from popsicle_py.settings.bootfs import BootFsError, files_digest, write_boot_files
from popsicle_py.settings.model import Settings, SettingsError, load_settings, redacted
from popsicle_py.settings.plan import (
           FORMATS,
           BootImage,
           Customization,
           DriveFiles,
           inspect_boot,
           load_customization,
)
from popsicle_py.settings.values import DriveContext, Values, parse_values, resolve

__all__ = ["FORMATS", "BootFsError", "BootImage", "Customization", "DriveContext",
           "DriveFiles", "Settings", "SettingsError", "Values", "files_digest",
           "inspect_boot", "load_customization", "load_settings", "parse_values", "redacted",
           "resolve", "write_boot_files"]
