"""Real block devices for tests: loop devices, partition tables, ext4 mounts, umockdev runs.

Context managers rather than fixtures, so any test module can import them, and each one
always cleans up (unmount, detach, delete) even when the test fails.  Loop numbers are never
assumed: other tests on the same machine use loop devices at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MiB = 2**20

HAVE_UMOCKDEV = shutil.which("umockdev-run") is not None
IS_ROOT = os.geteuid() == 0
HAVE_LOSETUP = shutil.which("losetup") is not None


@dataclass(frozen=True)
class Loop:
    """An attached loop device and its backing file: the one loop helper of the tests."""

    path: str  # /dev/loopN
    backing: Path
    size: int = 0

    @property
    def devnum(self) -> int:
        return os.stat(self.path).st_rdev

    @property
    def major_minor(self) -> tuple[int, int]:
        return os.major(self.devnum), os.minor(self.devnum)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def read(self, length: int | None = None, offset: int = 0) -> bytes:
        """The device's bytes, read from its backing file (the loop driver writes through)."""
        with open(self.backing, "rb") as f:
            f.seek(offset)
            return f.read((self.size or os.path.getsize(self.backing)) if length is None
                          else length)

    def head_is_stamped(self, image: bytes) -> bool:
        """The first 64 KiB hold the engine's random stamp: neither the image's head nor what
        the drive held before (what a drive stopped at any point after it started shows).

        Block by block: an image whose head is short (a block map's first range of 8 KiB)
        is stamped only that far, and its head written alone would differ from the image's
        first 64 KiB as a whole all the same."""
        head = self.read(64 << 10)
        blocks = range(0, 64 << 10, 4096)
        return len(set(head[:4096])) > 200 and not any(
            head[i : i + 4096] == image[i : i + 4096] for i in blocks if any(image[i : i + 4096]))

    def head_is_safe(self, image: bytes, fill: int) -> bool:
        """What a failed run must leave: the stamp in the head's place, or, when the run failed
        before this drive's first write (the stamp comes first), the drive as it was, every
        byte ``fill``.  Never the image's head, never part of the image under an old head."""
        return self.head_is_stamped(image) or self.read() == bytes([fill]) * self.size

    def write_stat_sectors(self) -> int:
        return self._stat(6)

    def flushes(self) -> int:
        """Cache flushes the kernel has completed on the device (each O_SYNC write: two)."""
        return self._stat(15)

    def _stat(self, field: int) -> int:
        major, minor = self.major_minor
        with open(f"/sys/dev/block/{major}:{minor}/stat") as f:
            return int(f.read().split()[field])


def attach(backing: str | Path, *, read_only: bool = False, partscan: bool = False) -> str:
    """``losetup -f --show``: the loop device now standing on ``backing`` (never assume N)."""
    args = ["losetup", "-f", "--show", *(["-r"] if read_only else []),
            *(["-P"] if partscan else []), str(backing)]
    return run(*args).strip()


def backing_of(path: str) -> str | None:
    """The file behind a loop device, or None when it is detached."""
    try:
        return (Path("/sys/block") / os.path.basename(path) / "loop" / "backing_file"
                ).read_text().strip()
    except OSError:
        return None


def detach(path: str, backing: str | Path) -> None:
    """Unmount and detach the loop device, but only while it still stands on ``backing``.

    Another test may have detached it already, and the kernel may since have given the same
    /dev/loopN to someone else: only ours is touched.
    """
    if backing_of(path) != str(backing):
        return
    devnums = {os.stat(p).st_rdev for p in (path, *_partitions_of(path)) if os.path.exists(p)}
    for mountpoint in reversed(_mounts_of(devnums)):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
    for _ in range(50):
        if subprocess.run(["losetup", "-d", path], capture_output=True,
                          check=False).returncode == 0 or backing_of(path) is None:
            return
        time.sleep(0.1)


def run(*args: str) -> str:
    """Run a command, fail loudly with its stderr."""
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def write_mbr(path: str, partitions: Sequence[tuple[int, int]]) -> None:
    """Write a DOS partition table (type 0x83 entries of (start, sectors)), as sfdisk would."""
    table = bytearray(512)
    for index, (start, sectors) in enumerate(partitions):
        entry = struct.pack("<B3sB3sII", 0, b"\xff\xff\xff", 0x83, b"\xff\xff\xff",
                            start, sectors)
        table[446 + 16 * index: 446 + 16 * (index + 1)] = entry
    table[510:512] = b"\x55\xaa"
    with open(path, "r+b") as f:
        f.write(table)


def _mounts_of(devnums: set[int]) -> list[str]:
    found: list[str] = []
    with open("/proc/self/mounts") as f:
        for line in f:
            device, mountpoint = line.split()[:2]
            try:
                st = os.stat(device)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and st.st_rdev in devnums:
                found.append(mountpoint.replace("\\040", " "))
    return found


def _partitions_of(path: str) -> list[str]:
    name = os.path.basename(path)
    sysdir = f"/sys/block/{name}"
    if not os.path.isdir(sysdir):
        return []
    return [f"/dev/{n}" for n in sorted(os.listdir(sysdir)) if n.startswith(f"{name}p")]


def partition_paths(loop: Loop) -> list[str]:
    return _partitions_of(loop.path)


def _wait_for_partitions(loop: Loop, count: int) -> None:
    """Wait for loopNp1..; add them with partx when the kernel does not parse the table.

    Kernels built without CONFIG_MSDOS_PARTITION (this machine's) ignore ``losetup -P``;
    partx reads the table in user space and adds the partitions with BLKPG.
    """
    wanted = [f"{loop.path}p{i + 1}" for i in range(count)]

    def present(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(os.path.exists(p) for p in wanted):
                return True
            time.sleep(0.02)
        return False

    if not present(0.5):
        run("partx", "-a", loop.path)
        if not present(5):
            raise RuntimeError(f"partitions of {loop.path} did not appear")


@contextlib.contextmanager
def loop_device(size: int = 4 * MiB, *, read_only: bool = False,
                partitions: Sequence[tuple[int, int]] = (), directory: str = "/dev/shm"
                ) -> Iterator[Loop]:
    """A loop device over a fresh sparse file; ``partitions`` writes an MBR and scans it."""
    fd, backing = tempfile.mkstemp(prefix="popsicle-test-", suffix=".img", dir=directory)
    os.close(fd)
    loop: Loop | None = None
    try:
        os.truncate(backing, size)
        if partitions:
            write_mbr(backing, partitions)
        loop = Loop(attach(backing, read_only=read_only, partscan=bool(partitions)),
                    Path(backing), size)
        if partitions:
            _wait_for_partitions(loop, len(partitions))
        yield loop
    finally:
        if loop is not None:
            detach(loop.path, loop.backing)
        os.unlink(backing)


#: What a test's ``unshare -m`` shell runs first.  Its new namespace got a copy of every mount
#: of the moment, another xdist worker's :func:`mounted_ext4` among them; that copy would hold
#: the other test's drive "mounted in another namespace" for as long as the shell lives.
DROP_OTHER_TESTS_MOUNTS = (
    "for m in $(awk '$5 ~ \"/popsicle-mnt-\" {print $5}' /proc/self/mountinfo); do "
    'umount -l "$m" 2>/dev/null || true; done; ')


#: The environment variable naming a process (``sleep``) in the session's template mount
#: namespace, made by ``conftest`` before any test mounted anything.
NAMESPACE_TEMPLATE = "POPSICLE_TEST_NAMESPACE_TEMPLATE"


def new_mount_namespace() -> list[str]:
    """The start of a command line run in a new private mount namespace.

    Copied from the session's template (:data:`NAMESPACE_TEMPLATE`), not from ours: ``unshare
    -m`` alone copies every mount of the moment, another xdist worker's among them, and until
    :data:`DROP_OTHER_TESTS_MOUNTS` has run that copy holds the other test's drive "mounted in
    the mount namespace of pid N" (``test_busy_unmount_is_a_clear_error`` failed so). The
    template has only the mounts made before the session; a test's own mounts after it are not
    there (entering it also makes ``/`` the working directory)."""
    pid = os.environ.get(NAMESPACE_TEMPLATE, "")
    template = f"/proc/{pid}/ns/mnt"
    enter = ["nsenter", f"--mount={template}", "--"] if pid and os.path.exists(template) else []
    return [*enter, "unshare", "-m", "--propagation", "private"]


@contextlib.contextmanager
def mounted_elsewhere(device: str, mountpoint: Path, *, read_only: bool = True
                      ) -> Iterator[subprocess.Popen[str]]:
    """``device`` mounted at ``mountpoint`` only inside a private mount namespace (what a
    container or a service with PrivateMounts has), held by a ``sleep`` in it (the
    process returned).  Read-only by default, so that the kernel itself writes nothing (an
    ext4 mount stamps its superblock)."""
    mountpoint.mkdir(exist_ok=True)
    options = "-o ro " if read_only else ""
    proc = subprocess.Popen(
        [*new_mount_namespace(), "sh", "-c", DROP_OTHER_TESTS_MOUNTS
         + f"mount {options}{device} {mountpoint} && echo ready && exec sleep 60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def mounted_ext4(device: str) -> Iterator[str]:
    """mkfs.ext4 on ``device`` and mount it on a fresh directory; unmount afterwards."""
    run("mkfs.ext4", "-q", "-F", device)
    mountpoint = tempfile.mkdtemp(prefix="popsicle-mnt-")
    try:
        run("mount", device, mountpoint)
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
        os.rmdir(mountpoint)


@contextlib.contextmanager
def tiny_tmpfs(parent: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's units: "1m") on a fresh directory under ``parent``: a
    disk that fills up."""
    mnt = Path(tempfile.mkdtemp(prefix="tiny-", dir=parent))
    run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def fill_up(folder: Path) -> None:
    """Every byte of the file system ``folder`` is on, taken by one file (a tiny_tmpfs that
    had room when a run began fills up)."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def is_mounted(mountpoint: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == mountpoint for line in f)


def python_env() -> dict[str, str]:
    """Environment for a child Python that imports popsicle_py from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def merge_descriptions(texts: Sequence[str]) -> str:
    """Join umockdev descriptions; a device several of them hold (a controller, a hub) once.

    Recordings of one machine (tests/fixtures/vm-*) share their parents, and umockdev refuses
    a description that adds the same device twice.
    """
    blocks: dict[str, str] = {}
    for text in texts:
        for block in text.strip().split("\n\n"):
            if block.strip():
                blocks.setdefault(block.strip().splitlines()[0], block.strip())
    return "\n\n".join(blocks.values()) + "\n"


def in_testbed(fixtures: Sequence[str | Path], code: str, tmp_dir: Path) -> object:
    """Run ``code`` (which prints JSON) in a umockdev testbed holding ``fixtures``; parse it.

    Several fixtures are joined into one description, so one testbed can hold them all.
    """
    description = tmp_dir / "testbed.umockdev"
    texts = [(FIXTURES / f if not os.path.isabs(f) else Path(f)).read_text() for f in fixtures]
    description.write_text(merge_descriptions(texts))
    result = subprocess.run(
        ["umockdev-run", "-d", str(description), "--", sys.executable, "-c", code],
        capture_output=True, text=True, env=python_env(), timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"testbed run failed ({result.returncode}): {result.stderr}")
    return json.loads(result.stdout)
