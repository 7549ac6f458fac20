"""The layer that knows drives: discovery, the Drive value, eligibility and explicit targets.

Writing to the wrong drive is a flasher's worst failure, so every decision here is made by
device number (never by comparing path strings: /dev/sda must not match /dev/sdaa1) and from
sysfs, which is what the kernel says rather than what a name suggests.

- :mod:`.model`: the plain values (:class:`Drive`, :class:`Backing`, :class:`Mount`,
  :class:`Swap`, :class:`SystemFacts`, :class:`Refusal`, the reasons);
- :mod:`.rules`: the decisions, plain functions over those values (:func:`system_reason`,
  :func:`eligibility`, :func:`refusals`, :func:`explain`...), testable without any drive;
- :mod:`.system`: the facts of the running system, read from sysfs and /proc (mounts, swaps,
  btrfs, overlays, what a disk is stored on: :func:`backing_of`, :func:`gather_facts`; who
  holds a disk: :func:`foreign_mounts`, :func:`loops_over_devices`, :func:`openers`);
- :mod:`.asking`: questions that may hang (a stat() on a hung share) asked on a thread of
  their own, waited for a bounded time;
- :mod:`.names`: a target's name resolved to the device the kernel finds there
  (:func:`resolve_name`, looked up off the main thread: a name may be on a hung share);
- :mod:`.udev`: the I/O edges that build drives with pyudev (:func:`discover`,
  :func:`drive_for_path`, :func:`still_same` and :func:`held_now` (the check before the first
  write), :func:`writers_now` (before ``verify`` reads), :func:`udev_hint`).

Every name is re-exported here: callers import ``popsicle_py.drives`` and need not know which
module holds what.
"""

from popsicle_py.drives.holders import (
    foreign_mounts,
    gather_facts,
    loops_over_devices,
    openers,
)
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
    LoopOver,
    MediaIdentity,
    Mount,
    Opener,
    Process,
    Refusal,
    Swap,
    SystemFacts,
    TargetError,
)
from popsicle_py.drives.names import named_devnums, resolve_name
from popsicle_py.drives.rules import (
    AUTO_BUSES,
    SYSTEM_MOUNTS,
    busy_for_reading,
    busy_reasons,
    eligibility,
    explain,
    holder_reasons,
    in_namespace,
    kind_reason,
    mountpoints_of,
    natural_key,
    overwrites,
    refusals,
    system_reason,
    too_small,
    writer_reasons,
)
from popsicle_py.drives.system import (
    MountEntry,
    backing_of,
    btrfs_groups,
    current_mounts,
    current_swaps,
    devnums_holding,
    loop_key,
    mount_table,
    overlay_layers,
    path_storage,
    stack_of,
)
from popsicle_py.drives.udev import (
    NO_UDEV_NOTE,
    build_discovered,
    build_drive,
    bus_of,
    decode_udev,
    devnum_of,
    discover,
    drive_for_path,
    held_now,
    media_changed,
    media_identity,
    port_path_of,
    still_same,
    still_same_each,
    udev_hint,
    udev_note,
    with_kernel_hold,
    writers_each,
    writers_now,
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
    "LoopOver",
    "MediaIdentity",
    "Mount",
    "MountEntry",
    "Opener",
    "Process",
    "Refusal",
    "Swap",
    "SystemFacts",
    "TargetError",
    "backing_of",
    "btrfs_groups",
    "build_discovered",
    "build_drive",
    "bus_of",
    "busy_for_reading",
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
    "foreign_mounts",
    "format_size",
    "gather_facts",
    "held_now",
    "holder_reasons",
    "in_namespace",
    "kind_reason",
    "loop_key",
    "loops_over_devices",
    "media_changed",
    "media_identity",
    "mount_table",
    "mountpoints_of",
    "named_devnums",
    "natural_key",
    "not_confirmed",
    "openers",
    "overlay_layers",
    "overwrites",
    "path_storage",
    "port_path_of",
    "refusals",
    "resolve_name",
    "same_media",
    "stack_of",
    "still_same",
    "still_same_each",
    "system_reason",
    "too_small",
    "udev_hint",
    "udev_note",
    "with_kernel_hold",
    "writer_reasons",
    "writers_each",
    "writers_now",
]
