"""Real block devices for tests: loop devices, dying drives, read-only drives, slow drives.

Every fixture cleans up (detach, unmount, remove cgroups) even when its test fails.  Tests that
need root are marked ``root``; CI runs as root, so they run there and never skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faulty import FaultyDrive, FaultyFile, faulty_files
from loopdev import NAMESPACE_TEMPLATE, Loop, MiB, attach, detach

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root for loop devices")
REPO = Path(__file__).resolve().parent.parent
_SAVED_PYTHONPATH: list[str | None] = []


def pytest_configure(config: pytest.Config) -> None:
    """Put this checkout first on PYTHONPATH for every subprocess the tests start.

    A hook rather than a fixture: it runs in the controller and in each xdist worker before
    collection, so a module that copies ``os.environ`` at import time sees it too; and a hook
    rather than import-time code, so importing this file changes nothing.
    """
    _SAVED_PYTHONPATH.append(os.environ.get("PYTHONPATH"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if not hasattr(config, "workerinput"):  # the controller, before any worker starts
        _SESSION.start = time.time()
        _SESSION.template = _namespace_template()
        if _SESSION.template is not None:
            os.environ[NAMESPACE_TEMPLATE] = str(_SESSION.template.pid)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The environment as it was before the session; the template namespace ended, and the
    testbeds of umockdev runs a test killed removed."""
    if not hasattr(config, "workerinput"):
        if _SESSION.template is not None:
            _SESSION.template.kill()
            _SESSION.template.wait()
            os.environ.pop(NAMESPACE_TEMPLATE, None)
        _remove_orphan_testbeds(_SESSION.start)
    if not _SAVED_PYTHONPATH:
        return
    saved = _SAVED_PYTHONPATH.pop()
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


class _Session:
    """What the controller starts with the session and ends with it."""

    start = 0.0
    template: subprocess.Popen[bytes] | None = None


_SESSION = _Session()


def _namespace_template() -> subprocess.Popen[bytes] | None:
    """A ``sleep`` in a mount namespace copied before any test mounted anything (see
    :func:`loopdev.new_mount_namespace`); it dies with the controller. None without root."""
    if not IS_ROOT or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return None
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                             "echo ready && exec sleep infinity"],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)
    assert proc.stdout is not None
    if proc.stdout.readline() != b"ready\n":
        proc.kill()
        proc.wait()
        return None
    return proc


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _remove_orphan_testbeds(since: float) -> None:
    """umockdev-run removes its ``/tmp/umockdev.*`` when it ends; a run a test killed leaves
    it. Those made since ``since`` go, but only when no process maps umockdev's preload
    library: a testbed made inside a process (``station_driver``) says its directory nowhere
    another could read, and another session's testbeds must stay."""
    made = [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("umockdev.*")
            if p.is_dir() and p.stat().st_mtime >= since]
    if not made:
        return
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            if b"libumockdev-preload" in maps.read_bytes():
                return
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def fill_pattern(path: Path, size: int, byte: int = 0xA5) -> None:
    with open(path, "r+b") as f:
        f.write(bytes([byte]) * size)


@pytest.fixture
def loop_factory() -> Iterator[Callable[..., Loop]]:
    """Make loop devices backed by files on /dev/shm; ``make(size, read_only=False, fill=None)``."""
    if not IS_ROOT:
        pytest.skip("needs root for loop devices")
    made: list[Loop] = []
    files: list[Path] = []

    def make(size: int = 8 << 20, *, read_only: bool = False, fill: int | None = None,
             directory: Path | None = None, backing_size: int | None = None,
             partscan: bool = False) -> Loop:
        base = directory or Path("/dev/shm")
        backing = base / f"popsicle-test-{uuid.uuid4().hex[:8]}.img"
        with open(backing, "wb") as f:
            f.truncate(backing_size or size)
        files.append(backing)
        if fill is not None:
            fill_pattern(backing, size, fill)
        loop = Loop(attach(backing, read_only=read_only, partscan=partscan), backing, size)
        made.append(loop)
        return loop

    yield make
    for loop in made:
        detach(loop.path, loop.backing)  # only while it is still ours
    for f in files:
        with contextlib.suppress(OSError):
            f.unlink()


@pytest.fixture
def dying_loop(loop_factory: Callable[..., Loop], tmp_path: Path) -> Iterator[Callable[..., Loop]]:
    """A drive that accepts ``good`` bytes, then fails every write with ENOSPC."""
    mounts: list[Path] = []

    def make(size: int = 16 << 20, good: int = 4 << 20) -> Loop:
        mnt = tmp_path / f"small{len(mounts)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={good}", "tmpfs", str(mnt)],
                       check=True)
        mounts.append(mnt)
        return loop_factory(size, directory=mnt)

    yield make
    # loop_factory's teardown runs after ours: detach first, then unmount.
    _detach_under(mounts)
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _detach_under(mounts: list[Path]) -> None:
    listing = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"],
                             capture_output=True, text=True).stdout
    for line in listing.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and any(parts[1].startswith(str(m)) for m in mounts):
            subprocess.run(["losetup", "-d", parts[0]], capture_output=True)


@pytest.fixture
def throttle() -> Iterator[Callable[..., Callable[[int], None]]]:
    """Slow drives down for one process: ``throttle((loop, bytes_per_s), ...)(pid)``; a
    third member, ``(loop, bytes_per_s, iops)``, also limits requests per second (0 for
    bytes_per_s: only that), as a stick whose every small write costs a flash page.

    A blkio (cgroup v1) group per call; processes are moved back and the group removed at the
    end.  Only direct I/O is throttled exactly, which is what popsicle-py does.
    """
    root = Path("/sys/fs/cgroup/blkio")
    if not IS_ROOT or not root.is_dir():
        pytest.skip("needs root and the cgroup v1 blkio controller")
    groups: list[Path] = []

    def make(*limits: tuple[Loop, int] | tuple[Loop, int, int]) -> Callable[[int], None]:
        group = root / f"popsicle-test-{uuid.uuid4().hex[:8]}"
        group.mkdir()
        groups.append(group)
        for loop, rate, *iops in limits:
            major, minor = loop.major_minor
            for kind in ("write", "read"):
                if rate:
                    (group / f"blkio.throttle.{kind}_bps_device").write_text(
                        f"{major}:{minor} {rate}\n")
                if iops:
                    (group / f"blkio.throttle.{kind}_iops_device").write_text(
                        f"{major}:{minor} {iops[0]}\n")

        def add(pid: int) -> None:
            (group / "cgroup.procs").write_text(f"{pid}\n")

        return add

    yield make
    for group in groups:
        with contextlib.suppress(OSError):
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (root / "cgroup.procs").write_text(f"{pid}\n")
        with contextlib.suppress(OSError):
            group.rmdir()


def popsicle_cmd() -> list[str]:
    """This checkout's command, run by the interpreter running the tests.

    Never whatever ``popsicle-py`` or ``python`` is first on PATH: an older installed copy
    would be tested instead of the code in front of us (PYTHONPATH is set to the checkout
    by ``pytest_configure`` above, for every subprocess of the tests).
    """
    return [sys.executable, "-m", "popsicle_py"]


def events_until_summary(proc: subprocess.Popen[bytes], deadline: float,
                         seen: Callable[[list[dict[str, Any]]], None] = lambda events: None
                         ) -> tuple[list[dict[str, Any]], float]:
    """The run's JSON events up to its summary (failing at ``deadline``, a monotonic time),
    ``seen`` told after each read; and when the summary came."""
    assert proc.stdout is not None
    events: list[dict[str, Any]] = []
    buffered = b""
    while not events or events[-1]["event"] != "summary":
        left = deadline - time.monotonic()
        assert left > 0, events[-3:]
        if not select.select([proc.stdout], [], [], left)[0]:
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        assert chunk, (events[-3:], proc.stderr.read() if proc.stderr else "")
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        events += [json.loads(line) for line in lines]
        seen(events)
    return events, time.monotonic()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """In CI every test must run: a skip there means a missing install step, so it fails."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {report.longrepr}"


@pytest.fixture
def faulty_drive() -> Iterator[Callable[..., FaultyDrive]]:
    """Misbehaving sticks: ``make(size, fill=None, content=None, **faults) -> FaultyDrive``
    (tests/faulty.py)."""
    if not IS_ROOT:
        pytest.skip("needs root for FUSE and loop devices")
    with faulty_files() as made:
        def make(size: int, **faults: Any) -> FaultyDrive:
            fill, content = faults.pop("fill", None), faults.pop("content", None)
            drive = FaultyDrive(size, fill=fill, content=content, faults=faults)
            made.append(drive)
            return drive

        yield make


@pytest.fixture
def faulty_file() -> Iterator[Callable[..., FaultyFile]]:
    """A flaky image source: ``make(content, **faults) -> FaultyFile`` (e.g. flip_bit=(o, k));
    ``attr_timeout=0``: every stat() asks the daemon too."""
    if not IS_ROOT:
        pytest.skip("needs root for FUSE")
    with faulty_files() as made:
        def make(content: bytes, attr_timeout: float = 1.0, **faults: Any) -> FaultyFile:
            source = FaultyFile(len(content), content=content, faults=faults,
                                attr_timeout=attr_timeout)
            made.append(source)
            return source

        yield make


@pytest.fixture
def sparse_image(tmp_path: Path) -> tuple[Path, bytes]:
    """A 16 MiB image with data in three places, and a bmap from the real bmaptool."""
    if shutil.which("bmaptool") is None:
        pytest.skip("bmaptool (Debian package bmap-tools) is not installed")
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        for offset, size in ((0, 8192), (5 * MiB + 4096, 3 * MiB), (15 * MiB, 12288)):
            f.seek(offset)
            f.write(os.urandom(size))
    subprocess.run(["bmaptool", "create", str(path), "-o", f"{path}.bmap"], check=True,
                   capture_output=True)
    return path, path.read_bytes()


def waits_in_kernel(pid: int, wchan: str) -> bool:
    """Some thread of ``pid`` sleeps in the kernel function ``wchan``: "request_wait_answer"
    for a FUSE daemon's answer (a hung share), "percpu_rwsem_wait" for a frozen file system."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "wchan").read_text() == wchan:
                return True
        except OSError:
            continue
    return False
