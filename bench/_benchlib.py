"""Shared parts of the benchmarks: loop devices, blkio throttles, measured child processes.

Everything a benchmark sets up (temporary directories, loop devices, cgroups, child processes)
is registered with a :class:`Bench` and undone when it closes, also on Ctrl-C, SIGTERM or an
error.  The benchmarked programs always run as child processes, so that a blkio cgroup can hold
exactly them and ``os.wait4`` gives their own CPU time and peak RSS.

The engine itself runs in a small runner (:func:`runner_main`): ``--run-engine IMG DEV...``
writes the image with :class:`popsicle_py.BusWriter` to O_DIRECT block devices and prints one
JSON line with absolute ``time.monotonic()`` timestamps (CLOCK_MONOTONIC is system-wide, so the
parent can subtract its own spawn time) and the bytes it read from disk (``/proc/self/io``).

The CLI is measured as a user runs it: ``python -m popsicle_py flash IMG DEV... --yes --json``
under ``/usr/bin/time -v``, a whole process from spawn to exit (:func:`cli_argv`).  Its stdout is
read through a pipe and every line is stamped as it arrives, so a drive's ``result`` event gives
both the CLI's own ``elapsed`` and the time from the spawn at which a user saw it.

Which code is measured is a :class:`Code`: this checkout (``new``) or another one given with
``--old DIR-or-REV`` (a directory, or a git revision extracted with ``git archive``), so that the
code before and after a change run in the same run, taking turns.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import resource
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 10**6
MiB = 1 << 20
GiB = 1 << 30
BLKGETSIZE64 = 0x80081272
CGROUP_ROOT = Path("/sys/fs/cgroup/blkio")
REPO = Path(__file__).resolve().parent.parent


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Measured child processes.


@dataclass
class Run:
    """One finished child process: wall time from spawn to reaping, its rusage, its output."""

    argv: list[str]
    wall: float
    user: float
    sys: float
    maxrss_kib: int
    rc: int
    stdout: str
    stderr: str
    started: float  # time.monotonic() just before the spawn
    extra: dict[str, Any] = field(default_factory=dict)
    #: (time.monotonic() when the line arrived, the line) for each line of stdout.
    stamps: list[tuple[float, str]] = field(default_factory=list)

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    @property
    def rss_mib(self) -> float:
        return self.maxrss_kib / 1024

    def json_lines(self) -> list[dict[str, Any]]:
        return [event for _, event in self.stamped_json()]

    def stamped_json(self) -> list[tuple[float, dict[str, Any]]]:
        """Each JSON line of stdout with the time from the spawn at which it arrived."""
        out = []
        for at, line in self.stamps:
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append((at - self.started, json.loads(line)))
        return out

    def time_v_rss_mib(self) -> float:
        """Peak RSS as ``/usr/bin/time -v`` printed it on stderr (the command ran under it)."""
        found = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", self.stderr)
        if not found:
            raise RuntimeError(f"no peak RSS in /usr/bin/time output: {self.stderr[-500:]}")
        return int(found[-1]) / 1024


class Bench:
    """Owner of everything a benchmark creates; ``with Bench() as b:`` always cleans up."""

    def __init__(self) -> None:
        self.dirs: list[Path] = []
        self.loops: list[str] = []
        self.cgroups: list[Path] = []
        self.children: set[int] = set()
        self._old_handlers: dict[int, Any] = {}

    # Lifetime.
    def __enter__(self) -> Bench:
        if os.geteuid() != 0:
            raise SystemExit("run as root: the benchmark needs loop devices and blkio cgroups")
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, _interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        # Ignore further Ctrl-C while undoing: a half-done cleanup leaks loop devices.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.cleanup()
        finally:
            signal.signal(signal.SIGINT, old_int)
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)

    def cleanup(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
            self.children.discard(pid)
        for cg in reversed(self.cgroups):
            _remove_cgroup(cg)
        self.cgroups.clear()
        for dev in reversed(self.loops):
            for _ in range(20):  # a just-closed O_EXCL handle may keep it busy for a moment
                r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
                if r.returncode == 0:
                    break
                time.sleep(0.1)
            else:
                log(f"warning: could not detach {dev}: {r.stderr.strip()}")
        self.loops.clear()
        for d in reversed(self.dirs):
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()

    # Resources.
    def tempdir(self, base: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix="popsicle-bench-", dir=base))
        self.dirs.append(path)
        return path

    def loop(self, backing: Path, size: int, *, allocate: bool = True,
             reuse: bool = False) -> str:
        """A loop device over a new file of ``size`` bytes (``reuse``: over an existing one).

        ``allocate`` reserves its blocks first (on tmpfs: its memory), so that the first run
        writing to the device does not also pay for allocating the backing file.
        """
        if not (reuse and backing.exists()):
            with open(backing, "wb") as f:
                f.truncate(size)
                if allocate:
                    os.posix_fallocate(f.fileno(), 0, size)
        out = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                             capture_output=True, text=True).stdout.strip()
        self.loops.append(out)
        return out

    def cgroup(self, tag: str) -> Path:
        path = CGROUP_ROOT / f"popsicle-bench-{os.getpid()}-{tag}"
        path.mkdir()
        self.cgroups.append(path)
        return path

    # Running things.
    def start(self, argv: Sequence[str], *, cgroup: Path | None = None,
              code: Code | None = None, timeout: float = 600.0) -> Pending:
        """Spawn ``argv`` (in ``cgroup`` from its first instruction, importing ``code``)."""
        argv = [str(a) for a in argv]
        cg_procs = str(cgroup / "cgroup.procs") if cgroup is not None else None

        def enter_cgroup() -> None:  # runs in the child between fork and exec
            if cg_procs is not None:
                with open(cg_procs, "w") as f:
                    f.write(str(os.getpid()))

        code = code or NEW
        err = tempfile.TemporaryFile()  # noqa: SIM115 (closed by finish())
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, preexec_fn=enter_cgroup,
                                cwd=code.root, env=code.env())
        self.children.add(proc.pid)
        pending = Pending(argv, proc, err, started, started + timeout)
        pending.reader.start()
        return pending

    def finish(self, pending: Pending) -> Run:
        """Wait for a started process; its measures (raises if it failed)."""
        proc = pending.proc
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > pending.deadline:
                os.kill(proc.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.002)
        wall = time.monotonic() - pending.started
        self.children.discard(proc.pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        pending.reader.join()
        pending.err.seek(0)
        stderr = pending.err.read().decode(errors="replace")
        pending.err.close()
        result = Run(pending.argv, wall, ru.ru_utime, ru.ru_stime, ru.ru_maxrss,
                     proc.returncode, "".join(line for _, line in pending.stamps), stderr,
                     pending.started, stamps=pending.stamps)
        if result.rc != 0:
            raise RuntimeError(f"{' '.join(pending.argv)} failed ({result.rc}): "
                               f"{result.stdout[-1000:]} {result.stderr[-2000:]}")
        return result

    def run(self, argv: Sequence[str], *, cgroup: Path | None = None,
            code: Code | None = None, timeout: float = 600.0) -> Run:
        """Run ``argv`` (in ``cgroup`` from its first instruction), wait, return its measures."""
        return self.finish(self.start(argv, cgroup=cgroup, code=code, timeout=timeout))


class Pending:
    """A spawned child whose stdout lines a thread stamps as they arrive."""

    def __init__(self, argv: list[str], proc: subprocess.Popen[bytes], err: Any,
                 started: float, deadline: float) -> None:
        self.argv = argv
        self.proc = proc
        self.err = err
        self.started = started
        self.deadline = deadline
        self.stamps: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for raw in self.proc.stdout:
                self.stamps.append((time.monotonic(), raw.decode(errors="replace")))


@dataclass(frozen=True)
class Code:
    """Which popsicle_py a measured process imports: a checkout's root, and a short label."""

    label: str
    root: Path
    version: str = ""

    def env(self) -> dict[str, str]:
        # The runner puts POPSICLE_BENCH_CODE first on sys.path; `python -m` puts the cwd
        # (this root) first, so PYTHONPATH alone would not choose the code.
        env = {**os.environ, "PYTHONPATH": str(self.root), "POPSICLE_BENCH_CODE": str(self.root)}
        # An installed package has its bytecode (pip compiles it): without it every measured
        # start-up would compile ~100 modules again (0.25 s here), which no user pays.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    def compile(self) -> None:
        """Write the code's bytecode once, as ``pip install`` does (into git-ignored caches)."""
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(self.root / "popsicle_py")],
                       check=True, env=self.env(), stdout=subprocess.DEVNULL)


NEW = Code("new", REPO)


def old_code(bench: Bench, spec: str) -> Code:
    """The code to compare with: a checkout directory, or a git revision of this repository."""
    path = Path(spec)
    if (path / "popsicle_py").is_dir():
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        return Code(f"old ({head or path})", path.resolve(), head or str(path))
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", spec],
                         capture_output=True, text=True)
    if rev.returncode != 0:
        raise SystemExit(f"--old {spec}: neither a checkout nor a git revision")
    short = rev.stdout.strip()
    root = bench.tempdir("/var/tmp")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", short, "popsicle_py"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return Code(f"old ({short})", root, short)


def add_run_options(parser: argparse.ArgumentParser, *, old_rounds: int) -> None:
    """--quick, --rounds, --old and --old-rounds: what every comparing benchmark takes."""
    parser.add_argument("--quick", action="store_true",
                        help="a 96 MiB image and one round (for development)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument("--old", metavar="DIR-or-REV",
                        help="also measure this checkout or git revision, taking turns")
    parser.add_argument("--old-rounds", type=int, default=old_rounds,
                        help=f"rounds for the --old code (default {old_rounds})")


def run_main(main: Callable[[], int]) -> None:
    """Exit with ``main()``'s status; Ctrl-C exits 130 once Bench has cleaned up."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; loop devices, cgroups and files were removed", file=sys.stderr)
        sys.exit(130)


def codes_of(bench: Bench, old: str | None) -> list[Code]:
    codes = [NEW] if old is None else [NEW, old_code(bench, old)]
    for code in codes:
        code.compile()
    return codes


def cli_argv(image: Path, devices: Sequence[str], *flags: str) -> list[str]:
    """The CLI as a user runs it, under /usr/bin/time -v for its peak RSS."""
    return ["/usr/bin/time", "-v", sys.executable, "-m", "popsicle_py", "flash", str(image),
            *devices, "--yes", "--json", *flags]


def cli_results(run: Run, devices: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each device's ``result`` event, with ``seen``: seconds from the spawn to its arrival.

    Raises unless every device's status is ok (a benchmark of a failed flash means nothing).
    """
    results = {}
    for at, event in run.stamped_json():
        if event.get("event") == "result":
            results[event["device"]] = {**event, "seen": at}
    bad = [d for d in devices if results.get(d, {}).get("status") != "ok"]
    if bad:
        raise RuntimeError(f"popsicle-py flash failed on {bad}: {run.stdout[-2000:]}")
    return results


def cli_notes(run: Run) -> list[str]:
    """The CLI's ``note`` events (a fallback to lock-step says why there), deduplicated."""
    seen: list[str] = []
    for event in run.json_lines():
        if event.get("event") == "note" and event.get("text") not in seen:
            seen.append(str(event.get("text")))
    return seen


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _remove_cgroup(cg: Path) -> None:
    if not cg.exists():
        return
    with contextlib.suppress(OSError):
        pids = (cg / "cgroup.procs").read_text().split()
        for pid in pids:
            with contextlib.suppress(OSError):
                (CGROUP_ROOT / "cgroup.procs").write_text(pid)
    for _ in range(50):
        try:
            cg.rmdir()
            return
        except OSError:
            time.sleep(0.1)
    log(f"warning: could not remove cgroup {cg}")


def throttle(cg: Path, dev: str, bytes_per_second: int) -> None:
    rdev = os.stat(dev).st_rdev
    (cg / "blkio.throttle.write_bps_device").write_text(
        f"{os.major(rdev)}:{os.minor(rdev)} {bytes_per_second}\n")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm(path: Path) -> None:
    """Read a file once so that the page cache holds it."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 * MiB):
            pass


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


def schedule(counts: dict[str, int]) -> list[tuple[int, str]]:
    """(round, method) in the order to run them: each round runs every method that still has
    runs to do, starting one further along the list each round, so methods take turns."""
    names = list(counts)
    order = []
    for r in range(max(counts.values(), default=0)):
        k = r % len(names)
        order += [(r, n) for n in names[k:] + names[:k] if counts[n] > r]
    return order


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


def code_version(code: Code | None = None) -> dict[str, str]:
    """Which popsicle_py a run imports: the commit, and a hash of each of its sources.

    Comparing this before and after a run tells whether every measured process imported the
    same code (someone may edit a checkout while a benchmark runs).
    """
    import hashlib

    code = code or NEW
    pkg = code.root / "popsicle_py"
    files = {str(path.relative_to(pkg)): hashlib.sha1(path.read_bytes()).hexdigest()[:12]
             for path in sorted(pkg.rglob("*.py"))}
    if code.version:
        return {"": code.version, **files}
    head = subprocess.run(["git", "-C", str(code.root), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(code.root), "status", "--porcelain", "popsicle_py"],
                           capture_output=True, text=True).stdout.strip()
    return {"": f"{head}{' + uncommitted changes' if dirty else ''}", **files}


def versions(codes: Sequence[Code]) -> dict[str, dict[str, str]]:
    return {code.label: code_version(code) for code in codes}


def version_report(before: dict[str, dict[str, str]],
                   after: dict[str, dict[str, str]]) -> tuple[list[str], bool]:
    """Lines saying which code was measured; False when any of it changed during the run.

    The CLI imports nearly every module, so any change in popsicle_py/ spoils its figures.
    """
    lines = []
    same = True
    for label, files in before.items():
        lines.append(f"{label}: popsicle_py at commit {files['']}")
        changed = sorted(k for k in set(files) | set(after[label])
                         if k and files.get(k) != after[label].get(k))
        if changed:
            same = False
            lines.append(f"WARNING: changed in {label}'s popsicle_py/ during the run: "
                         f"{', '.join(changed)}")
    return lines, same


def caches_dropped() -> int:
    """How often anyone has dropped the page cache (to spot others doing it mid-run)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("drop_pagecache "):
            return int(line.split()[1])
    return -1


def dd_argv(image: Path, dev: str) -> list[str]:
    return ["dd", f"if={image}", f"of={dev}", "bs=16M", "oflag=direct", "status=none"]


# --------------------------------------------------------------------------------------------
# Runner modes: what runs inside the cgroup.


def _device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            return 0  # a character device (/dev/null): no end
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int.from_bytes(buf, sys.byteorder)
    finally:
        os.close(fd)


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return -1


def run_engine(argv: list[str]) -> int:
    """``--run-engine [--no-laggards] [--buckets N] [--bucket-size B] IMG DEV...``"""
    entry = time.monotonic()
    sys.path.insert(0, os.environ.get("POPSICLE_BENCH_CODE") or str(REPO))
    from popsicle_py import BusWriter, BusWriterMessage
    from popsicle_py.blockdev import OpenSpec, open_for_writing

    laggards = True
    buckets: int | None = None
    bucket_size: int | None = None
    args = list(argv)
    while args and args[0].startswith("--"):
        opt = args.pop(0)
        if opt == "--no-laggards":
            laggards = False
        elif opt == "--buckets":
            buckets = int(args.pop(0))
        elif opt == "--bucket-size":
            bucket_size = int(args.pop(0))
        else:
            raise SystemExit(f"unknown runner option {opt}")
    image, devices = args[0], args[1:]
    dests = [open_for_writing(OpenSpec(d, _device_size(d), 512)) for d in devices]
    opened = time.monotonic()
    completed: dict[int, float] = {}
    errors: dict[int, str] = {}

    def callback(msg: Any) -> None:
        if isinstance(msg, BusWriterMessage.Completed):
            completed[msg.id] = time.monotonic()
        elif isinstance(msg, BusWriterMessage.Errored):
            errors[msg.id] = str(msg.why)

    with open(image, "rb", buffering=0) as source:
        writer = BusWriter(source, dests, callback, lambda: False).laggards(laggards)
        if buckets is not None:
            writer = writer.buckets(buckets)
        if bucket_size is not None:
            writer = writer.bucket_size(bucket_size)
        io_before = _read_bytes()
        ru_before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        result = writer.write()
        end = time.monotonic()
        ru_after = resource.getrusage(resource.RUSAGE_SELF)
        io_after = _read_bytes()
    # Diagnostics only (private attributes): which destinations left the ring as laggards.
    # Before the engine/ package: writer._workers; since: the run's lanes.
    lanes = getattr(writer, "_workers", None) or getattr(getattr(writer, "_run", None),
                                                         "lanes", [])
    solo = [bool(getattr(w, "solo", False)) for w in lanes]
    for d in dests:
        d.close()
    print(json.dumps({
        "entry": entry, "opened": opened, "start": start, "end": end, "size": result.size,
        "completed": [completed.get(i) for i in range(len(dests))],
        "errors": errors, "direct": [d.direct for d in dests],
        "read_bytes": io_after - io_before, "solo": solo,
        "write_cpu": (ru_after.ru_utime - ru_before.ru_utime)
        + (ru_after.ru_stime - ru_before.ru_stime),
    }), flush=True)
    return 1 if errors or len(completed) != len(dests) else 0


def run_naive(argv: list[str]) -> int:
    """``--run-naive IMG DEV...``: read 16 MiB, write it to each O_DIRECT fd in turn."""
    import mmap

    image, devices = argv[0], argv[1:]
    fds = [os.open(d, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC) for d in devices]
    buf = mmap.mmap(-1, 16 * MiB)
    view = memoryview(buf)
    offset = 0
    with open(image, "rb", buffering=0) as source:
        while True:
            n = source.readinto(view)
            if not n:
                break
            if n % 4096:
                raise SystemExit("the naive loop needs an image of whole 4 KiB blocks")
            for fd in fds:
                done = 0
                while done < n:
                    done += os.pwrite(fd, view[done:n], offset + done)
            offset += n
    for fd in fds:
        os.fsync(fd)
        os.close(fd)
    print(json.dumps({"size": offset}), flush=True)
    return 0


def runner_main(argv: list[str]) -> int | None:
    """Dispatch a runner mode when ``argv`` asks for one; None otherwise."""
    if argv[:1] == ["--run-engine"]:
        return run_engine(argv[1:])
    if argv[:1] == ["--run-naive"]:
        return run_naive(argv[1:])
    return None
