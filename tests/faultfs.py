"""A FUSE file system holding one file, ``disk``, that misbehaves as its control file says.

Run by tests/faulty.py (never by hand in a test): ``faultfs.py MOUNT --size N --store FILE
--control FILE --log FILE``.  Put a loop device on ``MOUNT/disk`` and it is a block device whose
every read and write this process answers: a stick that drops writes, wraps around (fake
capacity), has bad blocks, flips a bit, crawls or hangs.  Without a loop device the same file
is a flaky image source.

Why mfusepy on libfuse3: it is ctypes only (no compiler, no -dev packages in CI), maintained
(fusepy has had no release since 2018 and binds only libfuse2), and it runs libfuse's
multithreaded loop, so a write that hangs or crawls holds one worker thread and never blocks
reads, other writes' replies or the control file.  pyfuse3 would need Cython, libfuse3-dev and
an async design for the same.

The file is opened with FUSE ``direct_io``: every read of the loop device then reaches this
process (a buffered FUSE file would answer read-back from the page cache, and read faults would
never be seen).  The control file (JSON, one object of faults) is re-read whenever it changes;
every request checks it first, so a fault set by ``FaultyDrive.set`` applies to the very next
request.  Each write is logged as ``offset length outcome`` to the log file (and each read
that ``read_hang_after`` holds, as ``offset length read-hang``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import stat
import sys
import threading
import time
from typing import Any

# mfusepy picks the library when imported; without this it would take libfuse2 if present.
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy

FAULT_NAMES = ("drop_writes_after", "wrap", "bad_write", "bad_write_times", "bad_read",
               "flip_bit", "crawl", "hang", "recent_after", "bad_read_from", "bad_write_from",
               "read_hang_after", "cache_writes")
NAME = "disk"


def _overlaps(offset: int, length: int, start: int, end: int) -> bool:
    return offset < end and start < offset + length


class FaultFS(mfusepy.Operations):  # type: ignore[misc]
    """One file of ``size`` bytes, kept in ``store`` (a sparse file), with faults."""

    use_ns = True

    def __init__(self, size: int, store: str, control: str, log: str) -> None:
        self.size = size
        self.store = os.open(store, os.O_RDWR)
        self.control = control
        self.log = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.faults: dict[str, Any] = {}
        self.stamp: tuple[int, int, int] | None = None
        # State of faults that count or fire once, keyed by the fault's value: switching a
        # fault to another value (or off and on again) starts its count afresh.
        self.failures: dict[tuple[Any, ...], int] = {}
        self.read_counts: dict[tuple[Any, ...], int] = {}
        self.fired: set[tuple[Any, ...]] = set()
        self.next_free = 0.0  # crawl: when the paced "drive" is free again
        self.recent = b""  # recent_after: the most recent write's bytes
        self.cached: list[tuple[int, bytes]] = []  # cache_writes: the latest writes, in order
        self.reload()
        self.started = time.time_ns()
        threading.Thread(target=self._watch, daemon=True).start()

    # -- control ------------------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        """The faults now in force, re-read from the control file when it changed."""
        try:
            st = os.stat(self.control)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        with self.lock:
            if key == self.stamp:
                return self.faults
        try:
            with open(self.control) as f:
                faults = json.load(f) if key is not None else {}
        except (OSError, ValueError) as exc:
            print(f"faultfs: bad control file: {exc}", file=sys.stderr)
            return self.faults
        unknown = set(faults) - set(FAULT_NAMES)
        if unknown:
            print(f"faultfs: unknown faults ignored: {sorted(unknown)}", file=sys.stderr)
        with self.changed:
            self.stamp = key
            self.faults = {k: v for k, v in faults.items() if k in FAULT_NAMES and v is not None}
            self.changed.notify_all()
            return self.faults

    def _watch(self) -> None:
        """Wake sleeping requests (hang, crawl) soon after their fault is switched off."""
        while True:
            time.sleep(0.05)
            self.reload()

    def _sleep_while(self, name: str, value: Any, until: float) -> None:
        """Sleep until ``until`` (monotonic) or until fault ``name`` no longer has ``value``."""
        with self.changed:
            while time.monotonic() < until and self.faults.get(name) == value:
                self.changed.wait(min(0.1, max(0.0, until - time.monotonic())))

    def _pace(self, faults: dict[str, Any], offset: int, length: int, reading: bool = False
              ) -> None:
        crawl = faults.get("crawl")
        if not crawl or offset + length <= crawl[0] or (
                len(crawl) > 2 and crawl[2] is not None and offset >= crawl[2]):
            return
        with self.lock:
            if len(crawl) > 3:  # only from the k-th read of byte from_offset on
                key = ("crawl", *crawl)
                if reading and offset <= crawl[0] < offset + length:
                    self.read_counts[key] = self.read_counts.get(key, 0) + 1
                if self.read_counts.get(key, 0) < crawl[3]:
                    return
            start = max(time.monotonic(), self.next_free)
            self.next_free = start + length / crawl[1]
            until = self.next_free
        self._sleep_while("crawl", crawl, until)

    def _log(self, offset: int, length: int, outcome: str) -> None:
        os.write(self.log, f"{offset} {length} {outcome}\n".encode())

    # -- storage ------------------------------------------------------------------------------

    def _pieces(self, faults: dict[str, Any], offset: int, length: int
                ) -> list[tuple[int, int, int]]:
        """(position in the request, position in the store, length) for a request's bytes."""
        wrap = faults.get("wrap")
        if not wrap:
            return [(0, offset, length)]
        pieces = []
        done = 0
        while done < length:
            physical = (offset + done) % wrap
            n = min(length - done, wrap - physical)
            pieces.append((done, physical, n))
            done += n
        return pieces

    # -- FUSE operations ----------------------------------------------------------------------

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        now = self.started
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_atime": now,
                    "st_mtime": now, "st_ctime": now}
        if path == f"/{NAME}":
            return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": self.size,
                    "st_atime": now, "st_mtime": now, "st_ctime": now,
                    "st_blocks": (self.size + 511) // 512}
        raise OSError(errno.ENOENT, path)

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", NAME]

    def open(self, path: str, fi: Any) -> int:
        if path != f"/{NAME}":
            raise OSError(errno.ENOENT, path)
        fi.direct_io = 1  # every read reaches us: see the module docstring
        return 0

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        return 0  # a drive has the size it has

    def flush(self, path: str, fh: Any) -> int:
        return 0

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        return 0

    def release(self, path: str, fh: Any) -> int:
        return 0

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        faults = self.reload()
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        bad = faults.get("bad_read")
        if bad and _overlaps(offset, size, bad[0], bad[1]):
            raise OSError(errno.EIO, "bad read")
        late = faults.get("bad_read_from")
        if late and _overlaps(offset, size, late[0], late[1]):
            key = ("bad_read_from", *late)
            with self.lock:
                self.read_counts[key] = count = self.read_counts.get(key, 0) + 1
            if count >= late[2]:
                raise OSError(errno.EIO, "bad read (from the k-th on)")
        self._read_hang(faults, offset, size)
        self._pace(faults, offset, size, reading=True)
        data = bytearray(size)
        for at, physical, n in self._pieces(faults, offset, size):
            data[at:at + n] = os.pread(self.store, n, physical).ljust(n, b"\0")
        recent = faults.get("recent_after")
        if recent is not None and offset + size > recent:
            with self.lock:
                last = self.recent
            start = max(0, recent - offset)
            if last:  # the most recent write, repeated over what is past the real size
                data[start:] = (last * ((size - start) // len(last) + 1))[:size - start]
        with self.lock:
            cached = list(self.cached) if faults.get("cache_writes") else []
        for at, held in cached:  # oldest first: the latest write to a byte wins
            lo, hi = max(at, offset), min(at + len(held), offset + size)
            if lo < hi:
                data[lo - offset:hi - offset] = held[lo - at:hi - at]
        flip = faults.get("flip_bit")
        if flip and offset <= flip[0] < offset + size:
            key = tuple(flip)
            with self.lock:
                self.read_counts[key] = count = self.read_counts.get(key, 0) + 1
            if count >= flip[1]:
                data[flip[0] - offset] ^= 0x01
        return bytes(data)

    def _read_hang(self, faults: dict[str, Any], offset: int, size: int) -> None:
        """``read_hang_after=[start, end, n, secs]``: once byte ``start`` was written ``n``
        times, the first read of [start, end) sleeps ``secs`` (logged as ``read-hang``)."""
        spec = faults.get("read_hang_after")
        if not spec or not _overlaps(offset, size, spec[0], spec[1]):
            return
        key = ("read_hang_after", *spec)
        with self.lock:
            due = self.failures.get(key, 0) >= spec[2] and key not in self.fired
            if due:
                self.fired.add(key)
        if due:
            self._log(offset, size, "read-hang")
            self._sleep_while("read_hang_after", spec, time.monotonic() + spec[3])

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        faults = self.reload()
        length = len(data)
        if offset + length > self.size:
            raise OSError(errno.ENOSPC, "past the end")
        spec = faults.get("read_hang_after")
        if spec and offset <= spec[0] < offset + length:  # counted for read_hang_after
            key = ("read_hang_after", *spec)
            with self.lock:
                self.failures[key] = self.failures.get(key, 0) + 1
        hang = faults.get("hang")
        if hang and offset <= hang[0] < offset + length:
            key = ("hang", *hang)
            with self.lock:
                first = key not in self.fired
                self.fired.add(key)
            if first:
                self._log(offset, length, "hang")
                self._sleep_while("hang", hang, time.monotonic() + hang[1])
        bad = faults.get("bad_write")
        if bad and _overlaps(offset, length, bad[0], bad[1]):
            self._log(offset, length, "eio")
            raise OSError(errno.EIO, "bad block")
        times = faults.get("bad_write_times")
        if times and _overlaps(offset, length, times[0], times[1]):
            key = tuple(times)
            with self.lock:
                done = self.failures.get(key, 0)
                failing = done < times[2]
                if failing:
                    self.failures[key] = done + 1
            if failing:
                self._log(offset, length, "eio")
                raise OSError(errno.EIO, "bad block (transient)")
        late = faults.get("bad_write_from")
        if late and _overlaps(offset, length, late[0], late[1]):
            key = ("bad_write_from", *late)
            with self.lock:
                self.failures[key] = count = self.failures.get(key, 0) + 1
            if count >= late[2]:
                self._log(offset, length, "eio")
                raise OSError(errno.EIO, "bad block (from the k-th write on)")
        self._pace(faults, offset, length)
        keep = length
        for past in (faults.get("drop_writes_after"), faults.get("recent_after")):
            if past is not None:
                keep = max(0, min(keep, past - offset))
        with self.lock:
            self.recent = bytes(data)
            out = [(offset, bytes(data))]
            if faults.get("cache_writes"):  # held; the oldest go on to the store
                self.cached.append(out.pop())
                out, self.cached = (self.cached[:-faults["cache_writes"]],
                                    self.cached[-faults["cache_writes"]:])
        for start, held in out:
            kept = len(held)
            for past in (faults.get("drop_writes_after"), faults.get("recent_after")):
                if past is not None:
                    kept = max(0, min(kept, past - start))
            for at, physical, n in self._pieces(faults, start, kept):
                os.pwrite(self.store, held[at:at + n], physical)
        self._log(offset, length, "stored" if keep == length else
                  "dropped" if keep == 0 else f"partial:{keep}")
        return length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mount")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--fsname", default="faultfs")
    parser.add_argument("--attr-timeout", type=float, default=1.0,
                        help="seconds the kernel caches the file's attributes (0: asks us "
                             "at every stat, so a stopped daemon hangs them)")
    args = parser.parse_args()
    fs = FaultFS(args.size, args.store, args.control, args.log)
    with contextlib.suppress(KeyboardInterrupt):
        mfusepy.FUSE(fs, args.mount, raw_fi=True, foreground=True, fsname=args.fsname,
                     attr_timeout=args.attr_timeout)


if __name__ == "__main__":
    main()
