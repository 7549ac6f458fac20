"""Giving a stick back: old signatures wiped, one MBR partition over the drive, formatted.

Every byte reaches the drive through :mod:`popsicle_py.blockdev` (O_DIRECT, paced, stall- and
cancel-aware), on each drive's own thread under the engine's supervisor, as a flash does.

The file system is made by the real tools (``mkfs.vfat`` from dosfstools, ``mkfs.exfat`` from
exfatprogs) in a sparse file the size of the partition; the file up to its last data (holes as
zeros: see :func:`copied_span`) is then copied to the partition's place on the drive and read
back.  So no partition device is needed (kernels without partition tables for a device, as
this one for loop devices, and no ``loopNp1``), the tools never open the drive, and the
partition table is written last: a drive interrupted before the end has none, rather than one
that points at a half-made file system.  Sizes and the table count in the drive's logical
sectors (:mod:`popsicle_py.erase_layout`).

Per drive, in order: the file system made in its file (a mkfs that fails has written
nothing); the capacity probe of :mod:`popsicle_py.probe` (a counterfeit stick fails, its
stamps put back); [``--zero``: zeros everywhere, read back | ``--discard``: BLKDISCARD, read
back as zeros]; the signatures ``wipefs`` finds (and the first and last MiB, where partition
tables, boot sectors and RAID superblocks live) zeroed and read back, and libblkid asked
again; the file system written and verified; 16 MiB of zeros to free space, past
a write cache, and all of it read back again (erase_job); the MBR written and verified.

Nothing here opens the device node by name: signatures and old partitions are asked of
libblkid through the drive's own descriptor (:mod:`popsicle_py.erase_probe`).  So a user
without root erases exactly as root does, through the descriptor udisks2 opened for them
(``Block.OpenDevice``, polkit deciding, as for a flash), and needs no other permission.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from xxhash import xxh3_128_digest

from popsicle_py import erase_probe, sysfs
from popsicle_py.blockdev import BlockDevice, drop_cache, first_difference, read_at, write_at
from popsicle_py.buffers import aligned_buffer
from popsicle_py.engine.config import POLL
from popsicle_py.engine.lane import Clock
from popsicle_py.engine.watched import WorkStalled, watched
from popsicle_py.erase_layout import EXFAT_MIN_LENGTH as EXFAT_MIN_LENGTH
from popsicle_py.erase_layout import FAT32_DEFAULT_LIMIT as FAT32_DEFAULT_LIMIT
from popsicle_py.erase_layout import FAT32_MIN_LENGTH as FAT32_MIN_LENGTH
from popsicle_py.erase_layout import MBR_MAX_SECTORS as MBR_MAX_SECTORS
from popsicle_py.erase_layout import PART_START as PART_START
from popsicle_py.erase_layout import GiB as GiB
from popsicle_py.erase_layout import Layout as Layout
from popsicle_py.erase_layout import MiB as MiB
from popsicle_py.erase_layout import default_fs as default_fs
from popsicle_py.erase_layout import fat32_fits as fat32_fits
from popsicle_py.erase_layout import layout as layout
from popsicle_py.erase_layout import made as made
from popsicle_py.erase_layout import mbr as mbr
from popsicle_py.erase_layout import no_exfat as no_exfat
from popsicle_py.erase_layout import no_fat32 as no_fat32
from popsicle_py.pacing import Pacer

WIPE_EDGE = MiB
CHUNK = 4 << 20
FILESYSTEMS = ("fat32", "exfat", "none")
TOOLS = {"fat32": ("mkfs.vfat", "dosfstools"), "exfat": ("mkfs.exfat", "exfatprogs")}
BLKDISCARD = 0x1277
#: An exFAT volume label's length, in UTF-16 code units (what mkfs.exfat counts).
EXFAT_LABEL_UNITS = 11
#: The tools' environment: their messages in English, and labels read as UTF-8 (under plain
#: "C" mkfs.exfat refuses every label beyond ASCII).
_TOOL_ENV = {"LC_ALL": "C.UTF-8"}
#: Characters a FAT volume label may not hold, and an exFAT one (a file name's: Windows
#: refuses to set them, mkfs.exfat does not).
_FAT_BAD, _EXFAT_BAD = set('"*+,./:;<=>?[\\]|'), set('"*/:<>?\\|')


# --------------------------------------------------------------------------------------------
# Decisions (pure): the partition's are erase_layout's


def label_problem(fs: str, label: str | None) -> str | None:
    """Why ``label`` cannot name a ``fs`` volume, or None (the rules ``mkfs.vfat`` and
    ``mkfs.exfat`` apply, checked before anything is written)."""
    if label is None or fs == "none":
        return None
    if fs == "fat32":
        if len(label) > 11 or not label.isascii():
            return f"--label {label!r}: a FAT label is at most 11 ASCII characters"
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in label):
            return f"--label {label!r}: a FAT label cannot hold control characters"
        if label.startswith(" "):
            return f"--label {label!r}: a FAT label cannot start with a space"
        if label.upper().rstrip() == "NO NAME":  # FAT's word for none: blkid, Windows read none
            return (f"--label {label!r}: \"NO NAME\" is what FAT calls a volume without a "
                    "label; choose another")
        if bad := sorted(set(label) & _FAT_BAD):
            return f"--label {label!r}: a FAT label cannot hold {' '.join(bad)}"
        return None
    try:
        units = len(label.encode("utf-16-le")) // 2
    except UnicodeEncodeError:  # a lone surrogate (undecodable bytes in argv)
        return f"--label {label!r}: not a valid Unicode string"
    if set(label) & _EXFAT_BAD or any(ord(c) < 0x20 for c in label):
        return (f"--label {label!r}: an exFAT label cannot hold control characters or "
                f"{' '.join(sorted(_EXFAT_BAD))}")
    if units > EXFAT_LABEL_UNITS:
        return (f"--label {label!r}: an exFAT label is at most {EXFAT_LABEL_UNITS} characters "
                "(UTF-16 units)")
    if label and not label.strip(" "):  # made, but blkid and the desktop read no label
        return f"--label {label!r}: an exFAT label of spaces alone reads as no label"
    return None


def merge(ranges: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Ranges (offset, length) clipped to the drive, sorted, overlaps joined."""
    spans = sorted((max(0, o), min(size, o + n)) for o, n in ranges if n > 0 and o < size)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e - s) for s, e in merged if e > s]


def wipe_ranges(size: int, offsets: Sequence[int]) -> list[tuple[int, int]]:
    """What to zero: the first and last MiB, and the 4 KiB block of each signature found."""
    tail = max(0, size - WIPE_EDGE)
    tail -= tail % 4096
    blocks = [(o - o % 4096, 4096) for o in offsets]
    return merge([(0, WIPE_EDGE), (tail, size - tail), *blocks], size)


# --------------------------------------------------------------------------------------------
# Tools (I/O)


def missing_tool(fs: str) -> str | None:
    """One line naming the package to install when ``fs``'s mkfs is not there."""
    if fs not in TOOLS:
        return None
    tool, package = TOOLS[fs]
    if shutil.which(tool) is None:
        return f"--fs {fs} needs {tool} (install {package})"
    return None


class ToolFailed(OSError):
    """A tool erase runs (mkfs) failed: its own fault or its input's, never the drive's (no
    errno, so :mod:`popsicle_py.failures` does not word it as the drive's I/O error)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Making:
    """What a :func:`make_filesystem` under way is doing, for the thread that watches it for
    a stall (its own calls can hang on a hung $TMPDIR, and so can the tool's) and cancels it.
    """

    def __init__(self) -> None:
        self.calls = 0  # calls of make_filesystem's own that returned
        self.tool: subprocess.Popen[str] | None = None
        self._seen: tuple[float, ...] | None = None

    def moved(self) -> bool:
        """Whether a call returned, or the tool completed a system call or used CPU, since last
        asked (True when the tool cannot be looked at: never a stall that cannot be seen)."""
        now = (self.calls, *_activity(self.tool))
        moved, self._seen = now != self._seen, now
        return moved

    def kill(self) -> None:
        """End the tool and what it started (its process group), if one runs (cancelled or
        stalled: the caller has given up on it)."""
        tool = self.tool
        if tool is not None and tool.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(tool.pid, signal.SIGKILL)


def _activity(tool: subprocess.Popen[str] | None) -> tuple[float, ...]:
    """The tool's completed system calls and CPU ticks, as the kernel counts them."""
    if tool is None:
        return ()
    try:
        with open(f"/proc/{tool.pid}/io", "rb") as f:
            calls = [int(line.split()[1]) for line in f if line.startswith((b"syscr:",
                                                                             b"syscw:"))]
        with open(f"/proc/{tool.pid}/stat", "rb") as f:
            ticks = [int(n) for n in f.read().rsplit(b")", 1)[1].split()[11:13]]
    except (OSError, ValueError, IndexError):
        return (time.monotonic(),)
    return (*calls, *ticks)


class ToolCancelled(Exception):
    """The run was cancelled while a tool ran: it was killed (not a failure of anything)."""


def _run(args: Sequence[str], fd: int | None = None, making: Making | None = None,
         stopped: Callable[[], bool] = lambda: False) -> str:
    """Run a tool in a process group of its own: Ctrl-C at the terminal is ours to hear
    (the run's cancel then kills it), never a signal that kills it and reads as its failure.
    ``fd`` is passed to it (named ``/proc/self/fd/N`` in ``args``)."""
    making = making or Making()
    try:
        tool = subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, process_group=0,
                                pass_fds=() if fd is None else (fd,),
                                env={**os.environ, **_TOOL_ENV})
    except FileNotFoundError:
        raise OSError(errno.ENOENT, f"{args[0]} is not installed") from None
    making.tool = tool
    try:
        while True:
            try:
                out, err = tool.communicate(timeout=POLL)
                break
            except subprocess.TimeoutExpired:
                if stopped():
                    making.kill()
                    raise ToolCancelled(args[0]) from None
    finally:
        making.tool = None
        making.calls += 1
    if stopped():
        raise ToolCancelled(args[0])
    if tool.returncode != 0:
        code = tool.returncode
        said = err.strip().splitlines()
        why = said[-1] if said else (f"killed by {signal.Signals(-code).name}" if code < 0
                                     and -code in signal.valid_signals() else
                                     f"exit status {code}")
        raise ToolFailed(f"{args[0]} failed: {why.removeprefix(args[0] + ': ')}")
    return out


def refused_label(fs: str, label: str, folder: str | None = None,
                  stall_timeout: float | None = None) -> str | None:
    """Why ``fs``'s mkfs refuses ``label``, found by making a small file system with it (the
    rules of :func:`label_problem` are the known ones; this finds the rest, such as a system
    without the C.UTF-8 locale), or None.  One line: a refusal, nothing written to a drive.
    Made on a watched worker (:func:`watched_making`): a hung folder is a refusal on time."""
    part = layout(64 * MiB + PART_START, fs)

    def tried(making: Making, stopped: Stopped) -> str | None:
        try:
            os.close(make_filesystem(fs, part, label, folder, making, stopped)[0])
            return None
        except ToolFailed as exc:
            why = exc.message
        try:
            os.close(make_filesystem(fs, part, None, folder, making, stopped)[0])
        except ToolFailed as exc:  # whatever the label: the tool, or where it works
            return f"--fs {fs}: {exc.message}"
        return f"--label {label!r}: {why}"

    try:
        return watched_making(tried, folder, stall_timeout=stall_timeout)
    except MakingStalled as exc:
        return exc.message


class MakingStalled(ToolFailed):
    """Making a file system moved nothing for the stall timeout: the folder's disk hangs."""

    def __init__(self, folder: str | None, limit: float) -> None:
        super().__init__(f"making the file system in {workdir(folder)} stalled: no progress "
                         f"for {limit:g} s (is the disk it is on hung? set TMPDIR to another)")
        self.where = workdir(folder)


T = TypeVar("T")


def watched_making(work: Callable[[Making, Stopped], T], folder: str | None, *,
                   stall_timeout: float | None, cancel: Callable[[], bool] | None = None
                   ) -> T | None:
    """``work(making, stopped)`` (file systems made in ``folder``) on a thread of its own,
    its stall clock moved by its own calls and the tool's (:meth:`Making.moved`): a folder
    on a hung disk raises :class:`MakingStalled` on time, and a cancel (None) or Ctrl-C is
    heard at once; either way the tool is killed.  The thread is left in a call that hangs."""
    making = Making()
    clock = Clock()

    def tick() -> None:
        if making.moved():
            clock.touch()

    try:
        result = watched(lambda _clock, stopped: work(making, stopped), cancel=cancel,
                         stall_timeout=stall_timeout, tick=tick, name="mkfs", clock=clock)
    except WorkStalled as exc:
        making.kill()
        raise MakingStalled(folder, exc.limit) from None
    except BaseException:
        making.kill()
        raise
    if result is None:
        making.kill()
    return result


@contextlib.contextmanager
def _descriptor(device: BlockDevice) -> Iterator[int]:
    """A duplicate of the drive's descriptor: still the drive if another thread closes the
    device meanwhile (a stalled drive let go), never a number reused for another file."""
    fd = os.dup(device.fileno())
    try:
        yield fd
    finally:
        os.close(fd)


def signatures(device: BlockDevice) -> list[tuple[int, str]]:
    """What ``wipefs`` finds on the drive now (its cached pages dropped first), read through
    the drive's open descriptor (root's or udisks2's: the node itself is not opened)."""
    drop_cache(device)
    with _descriptor(device) as fd:
        return erase_probe.signatures(fd, device.path)


def old_partitions(device: BlockDevice) -> list[tuple[int, int]]:
    """(start, length) in bytes of the partitions the drive's table lists now, within the
    drive (see :func:`clip`)."""
    with _descriptor(device) as fd:
        return clip(erase_probe.partitions(fd, device.path), device.size)


def clip(parts: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Partitions cut at the drive's end, those starting past it dropped: a table written for
    a bigger drive (``dd`` of a bigger image onto a smaller stick) lists them so."""
    return [(start, min(length, size - start)) for start, length in parts
            if 0 <= start < size and length > 0]


def partition_ranges(parts: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inside each old partition, its first and last MiB: where its file system, LUKS, LVM
    or RAID superblock lives (what ``wipefs -a`` on the partition would find)."""
    ranges: list[tuple[int, int]] = []
    for start, length in parts:
        edge = min(WIPE_EDGE, length)
        tail = start + length - edge
        ranges += [(start, edge), (tail - tail % 4096, start + length - tail + tail % 4096)]
    return ranges


def found_inside(device: BlockDevice, parts: Sequence[tuple[int, int]]) -> list[str]:
    """What libblkid still recognises at the old partitions' places (as ``blkid -p -O -S``
    would), one word each."""
    drop_cache(device)
    found = []
    with _descriptor(device) as fd:
        for start, length in parts:
            found += [f"{kind} at byte {start}" for _, kind in
                      erase_probe.signatures(fd, device.path, start, length)]
    return found


def make_filesystem(fs: str, part: Layout, label: str | None, folder: str | None,
                    making: Making | None = None, stopped: Callable[[], bool] = lambda: False
                    ) -> tuple[int, list[tuple[int, int]]]:
    """Make the file system in a sparse file the partition's size: its open descriptor (the
    file unlinked at once, so nothing is left behind even if the process is killed) and the
    extents mkfs wrote.  Any failure is a :class:`ToolFailed` (the folder's or the tool's,
    never the drive's); ``stopped()`` kills the tool (:class:`ToolCancelled`).  Each call
    that returns counts in ``making``, which a watching thread reads (see
    :func:`popsicle_py.erase_job.EraseJob`)."""
    making = making or Making()
    try:
        fd, path = tempfile.mkstemp(prefix="popsicle-fs-", suffix=".img", dir=folder)
        making.calls += 1
    except OSError as exc:
        raise _not_made(exc, folder) from exc
    try:
        os.unlink(path)
        making.calls += 1
        os.ftruncate(fd, part.length)
        making.calls += 1
        where = f"/proc/self/fd/{fd}"  # the tool's own, the same number (pass_fds)
        if fs == "exfat":
            if part.sector != 512:  # in a file it makes 512-byte sectors (no option says)
                raise ToolFailed(f"mkfs.exfat cannot make {part.sector}-byte sectors")
            _run(["mkfs.exfat", *(["-L", label] if label else []), where], fd, making, stopped)
        else:  # the drive's sector: a smaller one is a volume no system mounts there
            _run(["mkfs.vfat", "-F", str(part.fat_bits), "-S", str(part.sector),
                  "-h", str(part.start // part.sector),
                  *(["-n", label.upper()] if label else []), where], fd, making, stopped)
        return fd, data_extents(fd, part.length, making)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError) and not isinstance(exc, ToolFailed):
            raise _not_made(exc, folder) from exc
        raise


def _not_made(exc: OSError, folder: str | None) -> ToolFailed:
    return ToolFailed(f"cannot make the file system in {workdir(folder)}: "
                      f"{exc.strerror or exc}")


def workdir(folder: str | None) -> str:
    """Where the file system is made: ``folder``, else $TMPDIR (or the system's default).
    Never :func:`tempfile.gettempdir` itself: on its first call it writes a file there, and
    holds a lock meanwhile, so on a hung $TMPDIR it would hang the caller that names it."""
    return (folder or tempfile.tempdir or os.environ.get("TMPDIR") or os.environ.get("TEMP")
            or os.environ.get("TMP") or "/tmp")


def copied_span(base: int, extents: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where on the drive the made file system goes (the partition at ``base``): its file
    from the start through its last data, holes included (read as zeros).  mkfs writes
    zeros over its FATs and bitmaps, and a $TMPDIR that stores zeros as holes (ZFS with
    compression) reports them as holes: left out, the drive's old bytes were the new FAT."""
    end = max((o + n for o, n in extents), default=0)
    return [(base, end)] if end > 0 else []


def data_extents(fd: int, size: int, making: Making | None = None) -> list[tuple[int, int]]:
    """The (offset, length) ranges of a sparse file that hold data, 4 KiB aligned."""
    making = making or Making()
    found: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        making.calls += 1
        found.append((start, end - start))
        offset = end
    return merge([(o - o % 4096, (o + n + 4095) // 4096 * 4096 - (o - o % 4096))
                  for o, n in found], size)


# --------------------------------------------------------------------------------------------
# Moving bytes (I/O, through blockdev)


Progress = Callable[[int], None]
Stopped = Callable[[], bool]


class NotErased(OSError):
    """The drive does not read back as it was written (zeros, or the new file system)."""

    def __init__(self, path: str, what: str, offset: int, hint: str = "") -> None:
        super().__init__(errno.EIO, f"{path}: verification failed: byte {offset} does not "
                         f"read back as {what}{hint}")
        self.offset = offset


def fill(device: BlockDevice, ranges: Sequence[tuple[int, int]], source: Callable[[int, int],
         memoryview], *, pacer: Pacer, stopped: Stopped, progress: Progress) -> None:
    """Write ``source(offset, length)`` over each range, in chunks of :data:`CHUNK`."""
    for start, length in ranges:
        done = 0
        while done < length and not stopped():
            n = min(CHUNK, length - done)
            written = write_at(device, start + done, source(start + done, n), stop=stopped,
                               pacer=pacer, progress=progress)
            if written < n:
                return
            done += n


def check(device: BlockDevice, ranges: Sequence[tuple[int, int]], expected: Callable[
          [int, int], memoryview], what: str, *, pacer: Pacer, stopped: Stopped,
          progress: Progress, hint: str = "") -> None:
    """Read each range back from the drive (O_DIRECT) and compare; raise :class:`NotErased`
    (its line ends with ``hint``: what to do instead)."""
    scratch = aligned_buffer(CHUNK)
    try:
        for start, length in ranges:
            done = 0
            while done < length and not stopped():
                n = min(CHUNK, length - done)
                with memoryview(scratch) as whole, whole[:n] as got:
                    read = read_at(device, start + done, got, pacer=pacer)
                    want = expected(start + done, n)
                    if read < n or xxh3_128_digest(got) != xxh3_128_digest(want):
                        at = first_difference(got[:read], want[:read])
                        at = read if at < 0 else at
                        raise NotErased(device.path, what, start + done + at, hint)
                progress(n)
                done += n
    finally:
        with contextlib.suppress(BufferError):
            scratch.close()


def zeros_source() -> Callable[[int, int], memoryview]:
    zero = memoryview(aligned_buffer(CHUNK))
    return lambda offset, n: zero[:n]


def file_source(fd: int, base: int) -> Callable[[int, int], memoryview]:
    """Bytes of the made file system (``fd``) for drive offsets (the partition at ``base``)."""
    buffer = memoryview(aligned_buffer(CHUNK))

    def source(offset: int, n: int) -> memoryview:
        got = os.preadv(fd, [buffer[:n]], offset - base)
        if got < n:
            buffer[got:n] = bytes(n - got)
        return buffer[:n]
    return source


def discard(device: BlockDevice, size: int) -> None:
    """BLKDISCARD over the whole drive (the drive decides what discarded blocks read as)."""
    try:
        fcntl.ioctl(device.fileno(), BLKDISCARD, struct.pack("QQ", 0, size))
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        raise OSError(exc.errno, NO_DISCARD) from None  # not a bare "Operation not supported"
    drop_cache(device)


#: A drive that does not discard, said as what to do instead.
NO_DISCARD = "the drive does not support discarding (BLKDISCARD): use --zero instead"


def discards(devnum: int) -> bool | None:
    """Whether the kernel lets the drive discard (None: it does not say)."""
    most = sysfs.attr(devnum, "queue/discard_max_bytes")
    return None if most is None or not most.isdigit() else int(most) > 0
