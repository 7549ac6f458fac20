"""The read-only use cases: which drives there are, and what the download cache holds."""

from __future__ import annotations

import dataclasses

from popsicle_py.cache import Cache, CacheEntry
from popsicle_py.drives import Drive, discover, gather_facts, refusals, with_kernel_hold
from popsicle_py.drives.opened import ExclusiveOpens
from popsicle_py.events import JsonObject
from popsicle_py.ports import link_notes, link_of, port_path_of
from popsicle_py.records import record


@record
class DriveListing:
    """One disk as ``list`` shows it: the drive's own facts and the USB port it hangs off."""

    path: str
    port: str | None
    label: str
    size: int
    bus: str
    mountpoints: tuple[str, ...]
    eligible: bool
    reason: str | None
    json: JsonObject
    #: The USB link's speed in Mbit/s; None when not on USB.
    link_speed: int | None = None


def list_drives(*, include_all: bool = False) -> list[DriveListing]:
    """USB and SD drives (every disk with ``include_all``), each with whether it may be written
    and why not."""
    return list_drives_with_notes(include_all=include_all)[0]


def list_drives_with_notes(*, include_all: bool = False) -> tuple[list[DriveListing], list[str]]:
    """:func:`list_drives`, and what to know about their USB links (USB 2.0, a shared hub)."""
    found = []
    links = []
    facts = gather_facts()
    listed = discover(include_all=include_all, facts=facts)
    # What the kernel holds that no table shows (a file system unmounted with umount -l
    # while in use): flash refuses such a drive, so list says so too.  One test of them all.
    free = [d.devnum for d in listed if d.eligible and not (d.mountpoints or d.holders
                                                             or d.busy)]
    facts = dataclasses.replace(facts, exclusive=ExclusiveOpens(free).refused())
    for d in (with_kernel_hold(d, facts) for d in listed):
        port = port_path_of(d)
        link = link_of(d)
        speed = None if link is None else link.speed
        links.append((d.path, link))
        eligible, reason = verdict(d)
        found.append(DriveListing(d.path, port, d.label, d.size, d.bus, tuple(d.mountpoints),
                                  eligible, reason,
                                  {**d.to_json(), "eligible": eligible, "reason": reason,
                                   "port_path": port, "link_speed": speed},
                                  speed))
    return found, link_notes(links)


def verdict(drive: Drive) -> tuple[bool, str | None]:
    """Whether ``flash`` would write ``drive`` named with ``--unmount``, and why not.

    A stick a program holds open, or one mounted in a container, was listed "yes" and then
    refused by ``flash``.  A mount of its own is no "no": the Mounted at column shows it, and
    ``--unmount`` takes it."""
    refused = refusals(drive, image_size=None, unmount=True)
    return (not refused, refused[0].reason if refused else None)


def cache_entries() -> tuple[str, list[CacheEntry]]:
    """The cache's directory and the downloads it keeps."""
    cache = Cache()
    return str(cache.root), cache.entries()


def clean_cache() -> tuple[str, int, int]:
    """Remove every cached download: the directory, how many, and the bytes freed."""
    cache = Cache()
    count, freed = cache.clean()
    return str(cache.root), count, freed
