"""--customize and --values for flash and watch: every check before writing, then each drive's
step before its head, and the record of what it got.

:func:`load` reads the settings and values and finds the image's FAT boot partition (refused,
exit 2, when there is none); :class:`Personaliser` holds each drive's files (a flash resolves
them all before writing: a missing row or a host name given twice is a refusal; watch resolves
each drive as it comes, with the seq it will get, and takes no drive once the rows ran out),
runs the step the engine calls before the head (:func:`popsicle_py.settings.write_boot_files`)
and puts the values used (secrets redacted) and the files' digest in each drive's result.

A host name is a drive's from its step until its result: a drive that did not end ok gives it
back, so that the next drive (a new stick in the same slot, when rows are keyed by slot) can
have it.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from popsicle_py import events
from popsicle_py.app.requests import CustomizeOptions
from popsicle_py.drives import Drive
from popsicle_py.errors import Refused
from popsicle_py.failures import hung_call
from popsicle_py.images import Image, ImageError, read_head
from popsicle_py.ports import drive_info
from popsicle_py.protocols import Source

if TYPE_CHECKING:  # imported when a customisation is asked for: 10 ms of every flash's start
    from popsicle_py.settings import Customization, DriveContext, DriveFiles

__all__ = ["Personaliser", "context_of", "load"]

Emit = Callable[[events.WatchEvent], None]
#: Read at least this much of a compressed image at once (its boot partition's start).
FIRST_READ = 16 << 20
#: The most of a compressed image decoded into memory to find and read its boot partition:
#: a partition table can point anywhere (a crafted GPT at the image's end).
MOST_DECODED = 256 << 20


class _ImageHead:
    """Positional reads of the image: of a raw file by position, of a compressed one from its
    start, decoded once however often it is read (at most :data:`MOST_DECODED`)."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.data = b""

    def __call__(self, offset: int, length: int) -> bytes:
        end = offset + length
        if length > MOST_DECODED or (end > MOST_DECODED and not self.image.seekable_raw):
            from popsicle_py.settings.fat import PastDecoded

            raise PastDecoded(f"its boot partition lies past the first {MOST_DECODED >> 20} MiB "
                           "of the decompressed image, more than is decoded to customise it: "
                           "decompress the image and give the file" if length <= MOST_DECODED
                           else f"its partition table asks for {length} bytes at once")
        if self.image.seekable_raw:
            import os

            try:
                with open(self.image.path, "rb") as raw:
                    return os.pread(raw.fileno(), length, offset)
            except OSError as exc:
                raise ImageError(f"{self.image.path} cannot be read: {exc.strerror or exc}"
                                 ) from None
        if end > len(self.data):
            want = max(end, 2 * len(self.data), FIRST_READ)
            if self.image.size is not None:
                want = min(want, self.image.size)
            self.data = read_head(self.image, want)
        return self.data[offset:end]


def load(options: CustomizeOptions, image: Source) -> Customization:
    """The customisation, checked against the image; raises :class:`Refused`."""
    from popsicle_py.settings import SettingsError, load_customization
    from popsicle_py.settings.bootfs import missing_tools

    if not isinstance(image, Image):
        raise Refused([f"--customize needs an image file on this machine, not {image.path} "
                       "(download it first)"])
    missing = missing_tools()
    if missing:
        raise Refused([f"--customize needs {', '.join(missing)}"])
    try:
        return load_customization(options.settings, options.values, options.format,
                                  _ImageHead(image))
    except (SettingsError, ImageError) as exc:
        raise Refused([str(exc)]) from None


def context_of(info: events.DriveInfo, slot: str | None = None) -> DriveContext:
    """What the templates know of a drive: seq, slot (seq unless a station says), serial, port."""
    from popsicle_py.settings import DriveContext

    seq = info.seq or 0
    return DriveContext(seq, slot if slot is not None else seq, info.serial,
                        info.port_path or "")


class Personaliser:
    """Each drive's files, its step before the head, and its record."""

    def __init__(self, customization: Customization) -> None:
        self.customization = customization
        self._files: dict[str, DriveFiles] = {}
        self._records: dict[tuple[str, int | None], events.JsonObject] = {}
        self._lock = threading.Lock()
        #: Each host name taken (lower case) and the drive (path, seq) that holds it.
        self._hostnames: dict[str, tuple[str, int | None]] = {}
        #: A station's slot label of a USB port path (None: ``{slot}`` is the drive's seq).
        self.slot_of: Callable[[str | None], str | None] | None = None
        #: The drives (path) whose flush of the boot files has not returned yet.
        self._flushing: set[str] = set()

    def _context(self, info: events.DriveInfo) -> DriveContext:
        slot = self.slot_of(info.port_path) if self.slot_of is not None else None
        return context_of(info, slot)

    def plan_batch(self, paths: Sequence[str], infos: Sequence[events.DriveInfo]) -> None:
        """A flash's drives, all resolved now; raises :class:`Refused`."""
        from popsicle_py.settings import SettingsError

        try:
            files = self.customization.for_batch([context_of(i) for i in infos])
        except SettingsError as exc:
            raise Refused([str(exc)]) from None
        self._files = dict(zip(paths, files, strict=True))

    def admit(self, drive: Drive, seq: int) -> str | None:
        """watch: why a new drive, to be the session's ``seq``-th, is not taken (its row is
        missing: the rows ran out; a bad value; a host name given already), or None.  A drive
        taken takes its host name now, so that two drives plugged in together are never both
        written for one name (the second would fail at its boot files, after the image); a
        drive that does not end ok gives it back (:meth:`record`).  The drive's files are
        made again when it is written, with the seq it got."""
        from popsicle_py.settings import SettingsError

        why = not_openable(drive.path)
        if why is not None:
            return f"not written: {why}"
        try:
            files = self.customization.for_drive(self._context(drive_info(drive, seq)))
        except SettingsError as exc:
            return f"not written: {exc}"
        hostname = files.settings.hostname
        with self._lock:
            if hostname and hostname.lower() in self._hostnames:
                return f"not written: hostname {hostname!r} was given to a drive already"
            if hostname:
                self._hostnames[hostname.lower()] = (drive.path, seq)
        return None

    def files_for(self, path: str, info: events.DriveInfo | None) -> DriveFiles:
        """A flash's planned files, or (watch) the drive's, made now; raises BootFsError."""
        from popsicle_py.settings import BootFsError, SettingsError

        with self._lock:
            planned = self._files.get(path)
        if planned is not None:
            return planned
        if info is None or info.seq is None:
            raise BootFsError(f"{path}: no first-boot settings were prepared for this drive")
        try:
            return self.customization.for_drive(self._context(info))
        except SettingsError as exc:
            raise BootFsError(str(exc)) from None

    def step(self, fd: int, path: str, info: events.DriveInfo | None,
             progressed: Callable[[int], None] = lambda n: None,
             stopped: Callable[[], bool] = lambda: False) -> None:
        """Write one drive's boot files (the engine's descriptor ``fd``; ``progressed`` counts
        the bytes read, for the stall clock; ``stopped()``: the lane is stopped, end at once,
        the head is not written); raises :class:`BootFsError` when they cannot be written or
        do not read back right."""
        from popsicle_py.settings import BootFsError, write_boot_files

        files = self.files_for(path, info)
        hostname = (files.settings.hostname or "").lower()
        drive = (path, info.seq if info else None)
        with self._lock:  # checked and taken at once: two drives in flight never share one
            if self._hostnames.get(hostname, drive) != drive:  # watch: taken at admission
                raise BootFsError(f"hostname {files.settings.hostname!r} was given to a "
                                  "drive already")
            if hostname:
                self._hostnames[hostname] = drive

        def flushing(on: bool) -> None:
            with self._lock:
                if on:
                    self._flushing.add(path)
                else:
                    self._flushing.discard(path)

        digest = None
        try:
            digest = write_boot_files(fd, self.customization.boot.partition, files.files,
                                      progressed=progressed, stopped=stopped,
                                      flushing=flushing)
        finally:
            if digest is None:  # failed, or stopped: this drive will not end ok
                self._give_back(drive)
        if digest is not None:
            with self._lock:
                self._records[drive] = files.record(self.customization.format, digest)

    def _give_back(self, drive: tuple[str, int | None]) -> None:
        """The host name ``drive`` took, free again for another drive."""
        with self._lock:
            for hostname in [h for h, holder in self._hostnames.items() if holder == drive]:
                del self._hostnames[hostname]

    def record(self, result: events.DriveResult) -> events.DriveResult:
        """The result with the values written (only a drive whose step completed has them),
        and no device_sha256: the digest of the image's range read back in the verify pass,
        before the boot files changed the drive (a failed step may have changed it too)."""
        key = (result.device, result.drive.seq if result.drive else None)
        if not result.ok:  # whatever failed it, before or after its step
            self._give_back(key)
        with self._lock:
            data = self._records.get(key) if result.ok else None
        return dataclasses.replace(result, customized=data, device_sha256=None)

    def hung(self, device: str) -> bool:
        """The drive's flush of its boot files has not returned (hung in the kernel)."""
        with self._lock:
            return device in self._flushing

    def emitter(self, emit: Emit) -> Emit:
        """``emit`` with each drive's record in its result and in the summary; a drive that
        ends while its flush has not returned gets the engine's note for a hung call (the
        process can exit only once the kernel gives it up)."""
        def relay(event: events.WatchEvent) -> None:
            if isinstance(event, events.Result):
                event = dataclasses.replace(event, result=self.record(event.result))
                if event.result.customized is not None:  # said before the result line
                    emit(events.Note(said(event.result.device, event.result.customized)))
                elif self.hung(event.result.device):
                    emit(events.Note(hung_call(event.result.device)))
            elif isinstance(event, events.Summary):
                event = dataclasses.replace(
                    event, results=tuple(self.record(r) for r in event.results))
            emit(event)
        return relay


def said(device: str, record: events.JsonObject) -> str:
    """A drive's customisation in one line for people (the record has it all)."""
    values = record.get("values")
    host = values.get("hostname") if isinstance(values, dict) else None
    named = f", hostname {host}" if host else ""
    return f"{device}: first-boot settings written ({record.get('format')}{named})"


def note(options: CustomizeOptions, personaliser: Personaliser) -> str:
    """What the confirmation says of the customisation."""
    rows = personaliser.customization.rows
    where = f" and {options.values} ({rows} rows)" if options.values else ""
    return (f"first-boot settings ({personaliser.customization.format}) from "
            f"{options.settings}{where} written into each drive's boot partition")


def for_flash(options: CustomizeOptions | None, image: Source, paths: Sequence[str],
              infos: Sequence[events.DriveInfo]) -> Personaliser | None:
    """A flash's customisation, every drive resolved; raises :class:`Refused`."""
    if options is None:
        return None
    why = next((w for path in paths if (w := not_openable(path)) is not None), None)
    if why is not None:
        raise Refused([why])
    personaliser = Personaliser(load(options, image))
    personaliser.plan_batch(paths, infos)
    return personaliser


def not_openable(path: str) -> str | None:
    """Why the boot-files step could not open the drive ``path`` again, or None.

    mcopy and the read-back open the drive anew through the engine's descriptor (/dev/fd/N,
    /proc/self/fd/N), which the kernel checks against the device node: a drive udisks2 opened
    for an ordinary user cannot be, and each drive would fail with EACCES after its whole
    write.  Refused before instead."""
    if os.geteuid() == 0 or os.access(path, os.R_OK | os.W_OK, effective_ids=True):
        return None
    return (f"--customize needs to open {path} again itself (mcopy writes the boot files "
            "through it), which this user may not (a drive opened through udisks2 cannot be "
            "opened again): run with sudo")


def for_watch(options: CustomizeOptions | None, image: Source) -> Personaliser | None:
    """A watch session's customisation (drives resolved as they come); raises Refused."""
    return None if options is None else Personaliser(load(options, image))


#: Why a drive, to be the session's seq-th if taken, is not taken, or None (watch's hook).
Admit = Callable[[Drive, int], str | None]
#: The engine's per-drive step before the head: (descriptor, /dev path, the drive's identity,
#: bytes moved, the lane stopped).
Step = Callable[[int, str, events.DriveInfo | None, Callable[[int], None], Callable[[], bool]],
                None]


def first_reason(*admits: Admit | None) -> Admit:
    """One admit hook of several: the first reason given."""
    def admit(drive: Drive, seq: int) -> str | None:
        return next((r for a in admits if a is not None and (r := a(drive, seq)) is not None),
                    None)
    return admit


def step_of(personaliser: Personaliser | None) -> Step | None:
    return None if personaliser is None else personaliser.step
