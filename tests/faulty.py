"""Faulty drives and flaky files for tests: a loop device over a FUSE file (tests/faultfs.py).

``FaultyFile`` is the FUSE file alone (a flaky image source); ``FaultyDrive`` adds a loop
device on top (a stick that misbehaves).  Faults, all optional, offsets in bytes:

- ``drop_writes_after=OFF``: writes at or past OFF succeed but are not stored (dying stick);
- ``wrap=M``: only M bytes stored, offsets taken modulo M (counterfeit capacity);
- ``recent_after=R``: only R bytes stored; writes past R are dropped and reads past R return
  the most recent write, wherever it went (a counterfeit whose controller answers unmapped
  addresses from its write buffer);
- ``cache_writes=K``: the latest K write requests are held in a cache that answers reads,
  past every flush; only older ones reach the store, dropped or wrapped as the faults say (a
  counterfeit's controller cache that hides where its writes really go);
- ``bad_write=(start, end)``: writes touching [start, end) fail with EIO, forever;
- ``bad_write_times=(start, end, k)``: they fail k times, then work (transient);
- ``bad_write_from=(start, end, k)``: they fail from the k-th such write on (a block that
  takes one write, then goes bad);
- ``bad_read=(start, end)``: reads touching [start, end) fail with EIO;
- ``bad_read_from=(start, end, k)``: they fail from the k-th such read on (a drive that goes
  bad between two read-backs);
- ``flip_bit=(offset, k)``: from the k-th read of that byte on (1: every read), its low bit
  reads flipped;
- ``crawl=(from_offset, bytes_per_s[, to_offset[, k]])``: I/O touching [from_offset,
  to_offset or the end (None)) paced to that rate; with ``k``, only from the k-th read of
  byte from_offset on (an image's second pass crawls, not the first);
- ``hang=(offset, seconds)``: the first write touching offset answers only after that long.

Kernel quirks (../shared/TESTING.md): a 4 MiB write reaches FUSE as 1280 KiB loop requests cut
into 128 KiB FUSE writes, and an EIO in the middle of a loop request becomes a short write the
loop driver reports as success.  A bad write range gives a clean EIO only when it starts at
4 MiB * j + 1280 KiB * k; :func:`clean_eio_start` gives such an offset.

Cleanup (faults off, so that hung requests return; loop detached; fusermount -u; daemon
stopped) runs even when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import loopdev

FAULTFS = Path(__file__).resolve().parent / "faultfs.py"
MiB = 1 << 20
LOOP_REQUEST = 1280 << 10


def clean_eio_start(at_least: int) -> int:
    """The first offset >= ``at_least`` where a bad write range gives a clean EIO."""
    base = at_least - at_least % (4 * MiB)
    candidates = [base + j * 4 * MiB + k * LOOP_REQUEST for j in range(2) for k in range(4)]
    return min(c for c in candidates if c >= at_least)


def _fusermount() -> str:
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"


class FaultyFile:
    """A FUSE file of ``size`` bytes answered by tests/faultfs.py."""

    def __init__(self, size: int, *, fill: int | None = None, content: bytes | None = None,
                 faults: dict[str, Any] | None = None, attr_timeout: float = 1.0) -> None:
        self.size = size
        self.dir = Path(tempfile.mkdtemp(prefix="faultfs-", dir="/dev/shm"))
        self.mount = self.dir / "mnt"
        self.mount.mkdir()
        self.store = self.dir / "store"
        self.control = self.dir / "control.json"
        self.log = self.dir / "writes.log"
        self.faults: dict[str, Any] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        with open(self.store, "wb") as f:
            f.truncate(size)
            if content is not None:
                f.seek(0)
                f.write(content)
            elif fill is not None:
                chunk = bytes([fill]) * MiB
                for start in range(0, size, MiB):
                    f.write(chunk[: min(MiB, size - start)])
        self.log.touch()
        self._write_control(dict(faults or {}))
        self.proc = subprocess.Popen(
            [sys.executable, str(FAULTFS), str(self.mount), "--size", str(size),
             "--store", str(self.store), "--control", str(self.control), "--log",
             str(self.log), "--fsname", f"faultfs-{self.dir.name}",
             "--attr-timeout", str(attr_timeout)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "daemon.err", "wb"))  # noqa: SIM115 (the child keeps it)
        try:
            self._wait_mounted()
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        """The daemon's process (SIGSTOP it and every request to the file waits)."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def file(self) -> str:
        """The FUSE file (an image source, or what a loop device stands on)."""
        return str(self.mount / "disk")

    @property
    def path(self) -> str:
        return self.file

    def _wait_mounted(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"faultfs exited: {(self.dir / 'daemon.err').read_text()}")
            if os.path.ismount(self.mount):
                with contextlib.suppress(OSError):
                    if os.stat(self.file).st_size == self.size:
                        return
            time.sleep(0.02)
        raise RuntimeError("faultfs did not mount in 15 s")

    def _write_control(self, faults: dict[str, Any]) -> None:
        """Replace the control file atomically; the daemon reads it before its next request."""
        self.faults = {k: v for k, v in faults.items() if v is not None}
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v
                                   for k, v in self.faults.items()}))
        os.replace(tmp, self.control)

    def set(self, **faults: Any) -> None:
        """Change faults mid-run: given ones replace, ``name=None`` switches one off."""
        merged = {**self.faults, **faults}
        self._write_control(merged)

    def clear(self) -> None:
        """Every fault off (a hung or crawling request returns within 0.1 s)."""
        self._write_control({})

    def read(self, offset: int, length: int) -> bytes:
        """The bytes actually stored for ``[offset, offset + length)`` (wrap taken into
        account), read from the store, past every fault."""
        wrap = self.faults.get("wrap")
        out = bytearray()
        with open(self.store, "rb") as f:
            pos = offset
            while pos < offset + length:
                physical = pos % wrap if wrap else pos
                n = offset + length - pos
                if wrap:
                    n = min(n, wrap - physical)
                f.seek(physical)
                out += f.read(n).ljust(n, b"\0")
                pos += n
        return bytes(out)

    def _logged(self) -> list[tuple[int, int, str]]:
        return [(int(a), int(b), c) for a, b, c in
                (line.split() for line in self.log.read_text().splitlines())]

    def writes(self) -> list[tuple[int, int]]:
        """Every write the daemon was asked for, as (offset, length), in arrival order."""
        return [(offset, length) for offset, length, _ in self.write_outcomes()]

    def write_outcomes(self) -> list[tuple[int, int, str]]:
        """Every write with what became of it: stored, dropped, partial:N, eio, hang."""
        return [entry for entry in self._logged() if entry[2] != "read-hang"]

    def read_hangs(self) -> list[tuple[int, int]]:
        """The reads ``read_hang_after`` held, as (offset, length), once each began."""
        return [(offset, length) for offset, length, what in self._logged()
                if what == "read-hang"]

    def ever_written(self, start: int, end: int) -> bool:
        """Whether any write request touched [start, end)."""
        return any(o < end and start < o + n for o, n in self.writes())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.clear()
        if self.proc is not None:
            self._unmount()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def _unmount(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 10
        while os.path.ismount(self.mount) and time.monotonic() < deadline:
            if subprocess.run([_fusermount(), "-u", str(self.mount)],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        if os.path.ismount(self.mount):
            subprocess.run([_fusermount(), "-u", "-z", str(self.mount)], capture_output=True)
        # Unmounted, a daemon exits within milliseconds; one that has not after a second (now
        # and then, after a crawl, its mount already gone) serves nothing: do not wait 5 s.
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


class FaultyDrive(FaultyFile):
    """A loop device (``.path``, /dev/loopN) over a :class:`FaultyFile`."""

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(size, **kwargs)
        self.loop: str | None = None
        try:
            self.loop = loopdev.attach(self.file)
        except BaseException:
            super().close()
            raise

    @property
    def path(self) -> str:
        assert self.loop is not None
        return self.loop

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.clear()
        if self.loop is not None:
            self._detach()
            self.loop = None
        super().close()

    def _detach(self) -> None:
        """Detach our loop device, and only while it still stands on our file."""
        assert self.loop is not None
        loopdev.detach(self.loop, self.file)
        # losetup -d on a device still open only marks it for autoclear; wait for that, so
        # that the FUSE mount is no longer busy.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and loopdev.backing_of(self.loop) == self.file:
            time.sleep(0.05)


@contextlib.contextmanager
def faulty_files() -> Iterator[list[FaultyFile]]:
    """Collect what a fixture makes; close all of it afterwards, whatever happened."""
    made: list[FaultyFile] = []
    try:
        yield made
    finally:
        for item in reversed(made):
            with contextlib.suppress(Exception):
                item.close()
