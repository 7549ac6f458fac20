"""The layer that knows drives: discovery, the Drive value, eligibility and explicit targets.

Writing to the wrong drive is a flasher's worst failure, so every decision here is made by
device number (never by comparing path strings: /dev/sda must not match /dev/sdaa1) and from
sysfs, which is what the kernel says rather than what a name suggests.

- :mod:`.model`: the plain values (:class:`Drive`, :class:`Backing`, :class:`Mount`,
  :class:`Swap`, :class:`SystemFacts`, :class:`Refusal`, the reasons);
- :mod:`.rules`: the decisions, plain functions over those values (:func:`system_reason`,
  :func:`eligibility`, :func:`refusals`, :func:`explain`...), testable without any drive;
- :mod:`.system`: the facts of the running system, read from sysfs and /proc (mounts, swaps,
  btrfs, overlays, what a disk is stored on: :func:`backing_of`, :func:`gather_facts`);
- :mod:`.udev`: the I/O edges that build drives with pyudev (:func:`discover`,
  :func:`drive_for_path`, :func:`still_same`, :func:`udev_hint`).

Every name is re-exported here: callers import ``popsicle_py.drives`` and need not know which
module holds what.
"""

from popsicle_py.drives.model import (
    REASON_IMAGE,
    REASON_NO_MEDIUM,
    REASON_NOT_USB,
    REASON_READ_ONLY,
    REASON_SWAP,
    Backing,
    Drive,
    Inode,
    LoopKey,
    MediaIdentity,
    Mount,
    Refusal,
    Swap,
    SystemFacts,
    TargetError,
)
from popsicle_py.drives.rules import (
    AUTO_BUSES,
    SYSTEM_MOUNTS,
    busy_reasons,
    eligibility,
    explain,
    kind_reason,
    mountpoints_of,
    natural_key,
    overwrites,
    refusals,
    system_reason,
    too_small,
)
from popsicle_py.drives.system import (
    MountEntry,
    backing_of,
    btrfs_groups,
    current_mounts,
    current_swaps,
    devnums_holding,
    gather_facts,
    loop_key,
    mount_table,
    overlay_layers,
    path_storage,
    stack_of,
)
from popsicle_py.drives.udev import (
    NO_UDEV_NOTE,
    build_drive,
    bus_of,
    decode_udev,
    devnum_of,
    discover,
    drive_for_path,
    media_identity,
    port_path_of,
    still_same,
    udev_hint,
    udev_note,
)
from popsicle_py.identity import not_confirmed, same_media
from popsicle_py.units import format_size

__all__ = [
    "AUTO_BUSES",
    "NO_UDEV_NOTE",
    "REASON_IMAGE",
    "REASON_NOT_USB",
    "REASON_NO_MEDIUM",
    "REASON_READ_ONLY",
    "REASON_SWAP",
    "SYSTEM_MOUNTS",
    "Backing",
    "Drive",
    "Inode",
    "LoopKey",
    "MediaIdentity",
    "Mount",
    "MountEntry",
    "Refusal",
    "Swap",
    "SystemFacts",
    "TargetError",
    "backing_of",
    "btrfs_groups",
    "build_drive",
    "bus_of",
    "busy_reasons",
    "current_mounts",
    "current_swaps",
    "decode_udev",
    "devnum_of",
    "devnums_holding",
    "discover",
    "drive_for_path",
    "eligibility",
    "explain",
    "format_size",
    "gather_facts",
    "kind_reason",
    "loop_key",
    "media_identity",
    "mount_table",
    "mountpoints_of",
    "natural_key",
    "not_confirmed",
    "overlay_layers",
    "overwrites",
    "path_storage",
    "port_path_of",
    "refusals",
    "same_media",
    "stack_of",
    "still_same",
    "system_reason",
    "too_small",
    "udev_hint",
    "udev_note",
]
