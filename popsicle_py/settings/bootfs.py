"""Writing one drive's files into its boot partition, and proving what changed.

mtools (``mcopy -i /dev/fd/N@@OFFSET``) writes: it is the FAT implementation Debian, U-Boot's
and Yocto's tooling and Raspberry Pi's own image builders use, it works on a device at an
offset without a mount or a partition device node (the partition table is still the engine's
stamp at this point: the head is written last), and needs no root.  Python's FAT libraries
(pyfatfs) are young and little used.  Then, from the device itself:

1. of the blocks that hold anything (the boot sector, the FATs, the root directory and every
   cluster in use; free clusters hold nothing and are not read), the only ones that changed are
   the FATs, FSInfo, the root directory and the clusters of the files written: the rest is
   still the image's, which the engine verified just before (cluster by cluster where a block
   also holds another file's: see :func:`_neighbours`); the sectors before the FAT (the
   boot sector, FAT32's backup of it) are unchanged but FSInfo, every other entry of the root
   directory is byte for byte as it was, and no cluster of another file changed in the FAT;
2. the files read back through :mod:`popsicle_py.settings.fat` (no mtools code) are the bytes
   meant;
3. ``fsck.vfat -n`` finds nothing in what it reads of the partition, copied from the drive into
   a sparse file (the region before the data and every directory's clusters: without ``-t``
   it reads no file's contents), so it needs no loop device, no root and no /dev name.

Each program runs as a child that outlives nothing: it starts with no signal blocked (a lane's
thread blocks the stop signals, and a child inherits the mask of the thread that starts it), in
a process group of its own (a Ctrl-C is popsicle's to act on), and is waited for in short
steps: once the lane is stopped (a cancel, a stall, a drive given up) it is killed and reaped
before the step returns, and any still running as popsicle exits are killed then.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

from popsicle_py import signals
from popsicle_py.settings.fat import (
    BootPartition,
    Entry,
    FatError,
    FatGeometry,
    chain,
    directory_clusters,
    geometry,
    read_fat,
    root_clusters,
    root_entries,
    root_files,
)

__all__ = ["BLOCK", "TOOLS", "BootFsError", "check_image_fs", "files_digest", "missing_tools",
           "write_boot_files"]

BLOCK = 4096
CHUNK = 4 << 20
TIMEOUT = 120.0
#: How often a running child's wait looks at the lane's stop.
POLL = 0.05
#: How long popsicle's exit waits for the children it killed to be gone.
EXIT_WAIT = 5.0

#: Says the lane was stopped: do not start another step (see :attr:`Lane.stopped`).
Stopped = Callable[[], bool]


#: The programs a drive's step runs, and the Debian package of each.
TOOLS = {"mcopy": "mtools", "fsck.vfat": "dosfstools"}
#: Where they are looked for: PATH, then the sbin directories an ordinary user's PATH lacks.
_SEARCH = os.pathsep.join(filter(None, [os.environ.get("PATH"), "/usr/sbin", "/sbin"]))


def _tool(name: str) -> str:
    return shutil.which(name, path=_SEARCH) or name


def missing_tools() -> list[str]:
    """``PROGRAM (apt-get install PACKAGE)`` for each program that is not installed."""
    return [f"{name} (apt-get install {package})" for name, package in TOOLS.items()
            if shutil.which(name, path=_SEARCH) is None]


class BootFsError(OSError):
    """The boot partition could not be written, or did not read back right: the drive failed.

    An OSError without an errno, so the engine fails the drive with this very line."""


def files_digest(files: Mapping[str, bytes]) -> str:
    """One SHA-256 over the files' names and contents (sorted), for the records."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + len(files[name]).to_bytes(8, "big"))
        h.update(files[name])
    return h.hexdigest()


def _path(fd: int) -> str:
    """The drive behind the engine's descriptor, never by its /dev name: a name can be another
    drive's by now, the open descriptor cannot (mtools and losetup get it as /dev/fd/N)."""
    return f"/dev/fd/{fd}"


class _Stop(Exception):
    """The lane was stopped: the step ends at once, with nothing more read or run."""


class _Moved:
    """What the drive has read and written since the last look, from the kernel's counts of
    its sectors (/sys/dev/block/MAJ:MIN/stat): mcopy's writes (and the reads the page cache
    makes for its writes of less than a page), and the flush of them, move no byte of ours,
    and the stall clock must see them move (a slow stick given 256 MiB of [files])."""

    def __init__(self, fd: int) -> None:
        rdev = os.fstat(fd).st_rdev
        self.path = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/stat" if rdev else None
        self.last = self._sectors()

    def _sectors(self) -> int:
        if self.path is None:
            return 0
        try:
            with open(self.path, encoding="ascii") as stat:
                fields = stat.read().split()
            return int(fields[2]) + int(fields[6])  # sectors read, sectors written
        except (OSError, ValueError, IndexError):
            return 0

    def moved(self) -> int:
        """Bytes read and written since the last call."""
        now = self._sectors()
        moved, self.last = max(0, now - self.last) * 512, now
        return moved


class _Device:
    """Positional reads of one partition, from the medium (clean pages dropped first)."""

    def __init__(self, fd: int, part: BootPartition,
                 progressed: Callable[[int], None] = lambda n: None,
                 stopped: Stopped = lambda: False,
                 flushing: Callable[[bool], None] = lambda on: None) -> None:
        self.fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        self.part = part
        self.progressed = progressed  # the engine's stall clock: a read that moves counts
        self.stopped = stopped
        self.flushing = flushing  # told when a flush begins and when it has returned
        self.moved = _Moved(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def moving(self) -> bool:
        """Tell the stall clock what the drive moved since the last look; whether it did."""
        moved = self.moved.moved()
        if moved:
            self.progressed(moved)
        return moved > 0

    def drop_cache(self) -> None:
        """Flush what mcopy left in the page cache, then drop the clean pages.

        The flush runs on a thread of its own while this one watches the drive's sectors
        move (for the stall clock) and the lane's stop: at a slow stick's speed it can take
        minutes.  A flush that never returns is left behind, as a hung write is; the process
        cannot exit before it returns (mcopy's writes are the page cache's, and waited for
        uninterruptibly), which ``flushing`` is told, to say so."""
        done = threading.Event()
        failed: list[OSError] = []

        def flush() -> None:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                failed.append(exc)
            finally:
                self.flushing(False)
                done.set()

        self.flushing(True)

        threading.Thread(target=flush, name="popsicle-boot-flush", daemon=True).start()
        while not done.wait(POLL):
            self.moving()
            if self.stopped():
                raise _Stop
        self.moving()
        if failed:
            raise failed[0]
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read(self, offset: int, length: int) -> bytes:
        if self.stopped():
            raise _Stop
        data = os.pread(self.fd, length, self.part.offset + offset)
        if len(data) != length:
            raise BootFsError(f"short read at {self.part.offset + offset} of the boot partition")
        self.progressed(length)
        return data

    def block_digests(self, runs: list[tuple[int, int]], unit: int = BLOCK, base: int = 0
                      ) -> dict[int, bytes]:
        """A digest of every 4 KiB block (or ``unit`` bytes at ``base + number * unit``: a
        cluster) of the runs (first number, count) given."""
        out: dict[int, bytes] = {}
        per_chunk = max(1, CHUNK // unit)
        for first, count in runs:
            for block in range(first, first + count, per_chunk):
                n = min(per_chunk, first + count - block)
                data = self.read(base + block * unit, n * unit)
                for i in range(n):
                    out[block + i] = hashlib.blake2b(data[i * unit:(i + 1) * unit],
                                                     digest_size=16).digest()
        return out


def _runs(blocks: set[int]) -> list[tuple[int, int]]:
    """Sorted blocks as (first, count) runs."""
    runs: list[tuple[int, int]] = []
    for block in sorted(blocks):
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs


def _blocks_of(geo: FatGeometry, clusters: set[int]) -> set[int]:
    out: set[int] = set()
    for cluster in clusters:
        start = geo.cluster_offset(cluster)
        out.update(range(start // BLOCK, (start + geo.cluster + BLOCK - 1) // BLOCK))
    return out


def _in_use(geo: FatGeometry, fat: list[int]) -> set[int]:
    """The blocks whose bytes matter: everything before the data region, and every cluster
    the FAT says is in use (free clusters hold nothing and are not read)."""
    head = set(range(0, (geo.data_offset + BLOCK - 1) // BLOCK))
    used = {c for c in range(2, len(fat)) if fat[c]}
    return head | _blocks_of(geo, used)


def _neighbours(geo: FatGeometry, fat: list[int], replaced: set[int]) -> set[int]:
    """Clusters in use that share a 4 KiB block with one a file written may take (a free
    one, or a replaced file's): clusters under 4 KiB, or a data region not 4 KiB aligned.
    The files' blocks may change, so these are compared cluster by cluster: the kernel writes
    whole pages, and a drive that stores one wrong spoils the file next door."""
    def edges(c: int) -> tuple[int, int]:  # only a cluster's first and last block are shared
        at = geo.cluster_offset(c)
        return at // BLOCK, (at + geo.cluster - 1) // BLOCK

    if geo.cluster % BLOCK == 0 and geo.data_offset % BLOCK == 0:
        return set()  # every block holds one cluster's bytes only
    numbers = range(2, min(len(fat), geo.clusters + 2))
    takeable = {b for c in numbers if fat[c] == 0 or c in replaced for b in edges(c)}
    return {c for c in numbers if fat[c] and c not in replaced
            and not takeable.isdisjoint(edges(c))}


_children: set[subprocess.Popen[str]] = set()
_children_lock = threading.RLock()  # also taken in a signal handler (AT_QUIT)


@contextlib.contextmanager
def _no_signal_blocked() -> Iterator[None]:
    """The calling thread's signal mask empty while a child starts, which inherits it: a
    lane's thread blocks the stop signals (see keep_signals_for_main_thread), and a child
    that blocks them could not be stopped at all.  The kernel gives a process's signal to its
    main thread first, and this thread's C handler only sets Python's flag anyway."""
    before = signal.pthread_sigmask(signal.SIG_SETMASK, ())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _end(child: subprocess.Popen[str]) -> None:
    """Kill ``child`` if it still runs, and reap it (it holds the drive open until then)."""
    with contextlib.suppress(ProcessLookupError):
        if child.poll() is None:
            child.kill()
    child.wait()
    for stream in (child.stdout, child.stderr):
        if stream is not None:
            stream.close()
    with _children_lock:
        _children.discard(child)


def _kill_children() -> None:
    """Every child still running killed (popsicle quits at once: no wait)."""
    with _children_lock:
        running = list(_children)
    for child in running:
        with contextlib.suppress(OSError):
            child.kill()


def _end_children() -> None:
    """At exit: every child still running (its lane abandoned) killed and, briefly, reaped."""
    _kill_children()
    with _children_lock:
        running = list(_children)
    deadline = time.monotonic() + EXIT_WAIT
    for child in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(max(0.0, deadline - time.monotonic()))


atexit.register(_end_children)
signals.AT_QUIT.append(_kill_children)


def _run(argv: list[str], what: str, stopped: Stopped, fd: int | None = None,
         moving: Callable[[], bool] = lambda: False) -> subprocess.CompletedProcess[str]:
    """Run a program to its end; killed and reaped as soon as ``stopped()`` (raises _Stop),
    or after TIMEOUT with nothing ``moving()`` (raises BootFsError): never left running
    behind the step."""
    if stopped():
        raise _Stop
    try:
        with _no_signal_blocked():
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace",
                                     pass_fds=() if fd is None else (fd,), process_group=0,
                                     env={**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"})
    except FileNotFoundError:
        raise BootFsError(f"{what}: {argv[0]} is not installed") from None
    with _children_lock:
        _children.add(child)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                out, err = child.communicate(timeout=POLL)
            except subprocess.TimeoutExpired:
                if stopped():
                    raise _Stop from None
                if moving():
                    deadline = time.monotonic() + TIMEOUT
                elif time.monotonic() > deadline:
                    raise BootFsError(f"{what}: {argv[0]} made no progress for {TIMEOUT:.0f} s"
                                      ) from None
                continue
            return subprocess.CompletedProcess(argv, child.returncode, out, err)
    finally:
        _end(child)


def _mcopy(fd: int, part: BootPartition, files: Mapping[str, bytes],
           stopped: Stopped = lambda: False, moving: Callable[[], bool] = lambda: False
           ) -> None:
    with _scratch_dir() as tmp:
        paths = []
        with _scratch():
            for name, data in files.items():
                path = os.path.join(tmp, name)
                with open(path, "wb") as handle:
                    handle.write(data)
                paths.append(path)
        done = _run([_tool("mcopy"), "-o", "-i", f"{_path(fd)}@@{part.offset}", *paths, "::/"],
                    "writing the boot partition", stopped, fd, moving)
    if done.returncode != 0:
        raise BootFsError("mcopy failed: " + ("; ".join(said_lines(done.stderr)) or "?"))


def said_lines(stderr: str) -> list[str]:
    """A program's messages, each on its own: mtools ends some without a newline (``Could not
    get geometry of device (Inappropriate ioctl for device)Disk full``)."""
    return [part.strip() for line in stderr.splitlines()
            for part in re.split(r"(?<=\))(?=[A-Za-z])", line) if part.strip()]


@contextlib.contextmanager
def _scratch() -> Iterator[None]:
    """An error of the temporary directory's (a full or read-only $TMPDIR) said as its own,
    never as the drive's (ENOSPC read as "no space left on the drive")."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, BootFsError):
            raise
        raise BootFsError(f"the temporary directory {tempfile.gettempdir()} ($TMPDIR): "
                          f"{exc.strerror or exc}") from None


def _put(fd: int, data: bytes, at: int) -> None:
    """``data`` at ``at`` of the sparse copy (no data: its size made ``at``)."""
    with _scratch():
        if data:
            os.pwrite(fd, data, at)
        else:
            os.ftruncate(fd, at)


@contextlib.contextmanager
def _scratch_dir() -> Iterator[str]:
    with _scratch():
        made = tempfile.TemporaryDirectory(prefix="popsicle-boot-")
    with made as tmp:
        yield tmp


def _fsck_findings(read: Callable[[int, int], bytes], geo: FatGeometry, fat: list[int],
                   stopped: Stopped = lambda: False) -> list[str]:
    """What ``fsck.vfat -n`` says is wrong (empty: nothing) in the metadata and directories
    read by ``read`` (offsets in the file system), copied into a sparse file."""
    with _scratch():
        copy = tempfile.NamedTemporaryFile(prefix="popsicle-bootfs-")  # noqa: SIM115
    with copy:  # (made apart: an error making it is $TMPDIR's, one in it may be the drive's)
        _put(copy.fileno(), b"", geo.total)
        for at in range(0, geo.data_offset, CHUNK):
            _put(copy.fileno(), read(at, min(CHUNK, geo.data_offset - at)), at)
        for cluster in sorted(directory_clusters(geo, fat, read)):
            at = geo.cluster_offset(cluster)
            _put(copy.fileno(), read(at, geo.cluster), at)
        check = _run([_tool("fsck.vfat"), "-n", copy.name], "checking the boot partition",
                     stopped)
    if check.returncode == 0:
        return []
    lines = [line.strip() for line in check.stdout.splitlines()[1:]
             if line.strip() and line.strip() != "Leaving filesystem unchanged."
             and not line.startswith(copy.name)]
    return lines[:3] or [f"exit status {check.returncode}"]


def _fsck(read: Callable[[int, int], bytes], geo: FatGeometry, fat: list[int],
          stopped: Stopped) -> None:
    found = _fsck_findings(read, geo, fat, stopped)
    if found:
        raise BootFsError("fsck.vfat -n found problems in the boot partition: "
                          + "; ".join(found))


def check_image_fs(read: Callable[[int, int], bytes], geo: FatGeometry, fat: list[int]
                   ) -> list[str]:
    """What ``fsck.vfat -n`` finds in the image's own boot file system, as it would on each
    drive after its files are written (mcopy repairs nothing): there, it fails every drive
    after its whole write.  Raises :class:`BootFsError` when fsck.vfat cannot run."""
    return _fsck_findings(read, geo, fat)


def _allowed_blocks(geo: FatGeometry, clusters: set[int]) -> set[int]:
    """The 4 KiB blocks a write of these clusters may change, with the FATs and FSInfo."""
    allowed: set[int] = set(range(geo.reserved // BLOCK,
                                  (geo.root_offset + geo.root_size + BLOCK - 1) // BLOCK))
    if geo.fsinfo is not None:
        allowed.add(geo.fsinfo // BLOCK)
    return allowed | _blocks_of(geo, clusters)


def write_boot_files(fd: int, part: BootPartition, files: Mapping[str, bytes],
                     *, fsck: bool = True,
                     progressed: Callable[[int], None] = lambda n: None,
                     stopped: Stopped = lambda: False,
                     flushing: Callable[[bool], None] = lambda on: None) -> str | None:
    """Write ``files`` into the root of the boot partition of the drive open on ``fd``, read
    them back and check the rest; returns :func:`files_digest`.  Raises :class:`BootFsError`.

    Returns None, at once, once ``stopped()`` says the lane is stopped: nothing more is read,
    and the program running is killed and reaped first (the drive is not done).  ``flushing``
    is told True as a flush of the drive begins and False once it has returned: one still
    running when the drive ends holds the process until the kernel gives it up."""
    try:
        return _write(fd, part, files, fsck, progressed, stopped, flushing)
    except _Stop:
        return None
    except OSError as exc:  # a pulled drive fails mcopy ("seek: Invalid argument") or a read
        from popsicle_py.failures import drive_gone

        if exc.errno not in (errno.ENODEV, errno.ENXIO) and drive_gone(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV)) from exc  # "was removed"
        raise


def _write(fd: int, part: BootPartition, files: Mapping[str, bytes], fsck: bool,
           progressed: Callable[[int], None], stopped: Stopped,
           flushing: Callable[[bool], None]) -> str:
    dev = _Device(fd, part, progressed, stopped, flushing)
    try:
        dev.drop_cache()
        try:
            boot = dev.read(0, 512)
            geo = geometry(boot)
            if geo.total > part.size:
                raise BootFsError("the boot file system is larger than its partition")
            reserved = dev.read(0, geo.reserved)  # boot sector, FSInfo, the backup's
            fat_before = read_fat(geo, dev.read(geo.reserved, geo.fat_size))
            entries = root_entries(geo, fat_before, dev.read)
            replaced = {c for e in entries
                        if e.name.lower() in {n.lower() for n in files} and e.first
                        for c in chain(geo, fat_before, e.first)}
            dir_before = set(root_clusters(geo, fat_before))
        except FatError as exc:
            raise BootFsError(f"the boot partition: {exc}") from None
        checked = _in_use(geo, fat_before)
        before = dev.block_digests(_runs(checked))
        cluster_base = geo.data_offset - 2 * geo.cluster
        neighbours = _neighbours(geo, fat_before, replaced)
        kept = dev.block_digests(_runs(neighbours), geo.cluster, cluster_base)
        dev.moved.moved()  # from here, what the drive moves is mcopy's (reads count themselves)
        _mcopy(fd, part, files, stopped, dev.moving)
        dev.drop_cache()
        after = dev.block_digests(_runs(checked))
        try:
            fat_after = read_fat(geo, dev.read(geo.reserved, geo.fat_size))
            back = root_files(geo, fat_after, dev.read, set(files))
            written = {c for _, clusters in back.values() for c in clusters}
            dirs = dir_before | set(root_clusters(geo, fat_after))
            _same_entries(entries, root_entries(geo, fat_after, dev.read), files)
        except FatError as exc:
            raise BootFsError(f"the boot partition does not read back: {exc}") from None
        _same_reserved(reserved, dev.read(0, geo.reserved), geo)
        _compare_files(files, back)
        moved = {c for c, (a, b) in enumerate(zip(fat_before, fat_after, strict=True))
                 if a != b} - replaced - written - dirs
        if moved:
            raise BootFsError(f"the boot partition's FAT changed for {len(moved)} cluster(s) "
                              f"of no file written (first: {min(moved)})")
        allowed = _allowed_blocks(geo, written | dirs)
        now = dev.block_digests(_runs(neighbours - written - dirs), geo.cluster, cluster_base)
        spoilt = sorted(c for c, digest in now.items() if kept[c] != digest)
        if spoilt:
            raise BootFsError(f"the boot partition changed outside the files written (cluster "
                              f"{spoilt[0]}, of a file not written, at byte "
                              f"{part.offset + geo.cluster_offset(spoilt[0])})")
        stray = sorted(i for i in checked if before[i] != after[i] and i not in allowed)
        if stray:
            raise BootFsError(f"the boot partition changed outside the files written "
                              f"({len(stray)} block(s), first at byte "
                              f"{part.offset + stray[0] * BLOCK})")
        if fsck:
            _fsck(dev.read, geo, fat_after, dev.stopped)
    finally:
        dev.close()
    return files_digest(files)


def _same_reserved(before: bytes, after: bytes, geo: FatGeometry) -> None:
    """The sectors before the FAT as they were (the boot sector, FAT32's backup of it), but
    FSInfo (its free count): the block comparison allows the whole 4 KiB block FSInfo is in."""
    for at in range(0, len(before), geo.sector):
        if at != geo.fsinfo and before[at:at + geo.sector] != after[at:at + geo.sector]:
            raise BootFsError("the boot partition's boot sector changed" if at == 0 else
                              f"the boot partition's reserved sector {at // geo.sector} "
                              "(before its FAT: the backup boot sector's area) changed")


def _same_entries(before: list[Entry], after: list[Entry], files: Mapping[str, bytes]) -> None:
    """Every other entry of the root directory byte for byte as it was (a file renamed, made
    hidden or resized there reads back as no FAT change and no block outside the root
    directory), and each file written there once."""
    names = {n.lower() for n in files}
    was = Counter((e.name.lower(), e.raw) for e in before if e.name.lower() not in names)
    now = Counter((e.name.lower(), e.raw) for e in after if e.name.lower() not in names)
    gone, new = sorted(n for n, _ in was - now), sorted(n for n, _ in now - was)
    if gone:
        raise BootFsError(f"the boot partition's directory entry of {gone[0]}, a file not "
                          "written, changed or is gone")
    if new:
        raise BootFsError(f"the boot partition's root directory holds {new[0]}, which was not "
                          "written")
    for name in sorted(names):
        count = sum(1 for e in after if e.name.lower() == name)
        if count > 1:
            raise BootFsError(f"{name} is in the boot partition's root directory {count} times")


def _compare_files(files: Mapping[str, bytes], back: Mapping[str, tuple[bytes, list[int]]]
                   ) -> None:
    found = {name.lower(): data for name, (data, _) in back.items()}
    for name, data in files.items():
        got = found.get(name.lower())
        if got is None:
            raise BootFsError(f"{name} is not in the boot partition after writing it")
        if got != data:
            raise BootFsError(f"{name} reads back different from what was written")
