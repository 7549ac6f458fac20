"""``read`` and ``erase --zero`` against the shell tools a user would reach for (issue 28).

Not a test.  A loop device (1 GiB by default) over a file on /dev/shm, filled like a used stick
(a third random, a third text-like, a third zeros), then rounds in which every method runs once,
in an order that turns by one each round (:func:`_benchlib.schedule`):

- ``popsicle-py read DEV out.img.zst`` against ``dd if=DEV bs=4M iflag=direct | zstd -T0 -3``
  (target: at most 1.05x), and against the same piped through ``tee | sha256sum`` (the
  sidecar read writes too); with ``--formats`` also ``.xz`` (``xz -T0 -6``), ``.gz``
  (``gzip -6``) and raw (``dd of=OUT``, and ``| tee OUT | sha256sum``) against their pipes;
- ``popsicle-py erase DEV --zero --fs none --yes`` against ``dd if=/dev/zero of=DEV bs=4M
  oflag=direct`` followed by ``cmp`` of the drive with /dev/zero (write, then read back), and
  the same with the read-back by ``dd iflag=direct bs=4M | cmp - /dev/zero``.

Every process runs whole, as a user runs it.  The machine is shared, so each round's ratio
(read / pipe, measured in the same round) is what counts: the table gives the median of those
ratios, the median wall and CPU seconds, and the load average beside every round.  With
``--old REV`` the same rounds also run another checkout's ``read`` (and ``erase``).

    python bench/bench_read.py                          # 1 GiB, 5 rounds, .zst and erase
    python bench/bench_read.py --rounds 9 --old main    # this checkout against main
    python bench/bench_read.py --size 256 --formats xz,gz,raw --no-erase
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from _benchlib import (
    REPO,
    Bench,
    Code,
    MiB,
    codes_of,
    log,
    median,
    run_main,
    schedule,
    table,
    version_report,
    versions,
)

BLKFLSBUF = 0x1261
SUFFIX = {"zst": ".img.zst", "xz": ".img.xz", "gz": ".img.gz", "raw": ".img"}
#: What a user would type for each format (DEV and OUT filled in).
PIPES = {
    "zst": ["dd if={dev} bs=4M iflag=direct status=none | zstd -q -T0 -3 -o {out}",
            "dd if={dev} bs=4M iflag=direct status=none | zstd -q -T0 -3 | tee {out} "
            "| sha256sum > {out}.sha256"],
    "xz": ["dd if={dev} bs=4M iflag=direct status=none | xz -T0 -6 > {out}"],
    "gz": ["dd if={dev} bs=4M iflag=direct status=none | gzip -6 > {out}"],
    "raw": ["dd if={dev} of={out} bs=4M iflag=direct status=none",
            "dd if={dev} bs=4M iflag=direct status=none | tee {out} | sha256sum > {out}.sha256"],
}


def pattern(path: Path, size: int) -> None:
    """A third random, a third text-like (this repository's sources, repeated), zeros."""
    text = b"".join(p.read_bytes() for p in sorted((REPO / "popsicle_py").rglob("*.py")))
    third = size // 3 // MiB * MiB
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(os.urandom(third))
        done = 0
        while done < third:
            piece = text[: third - done]
            f.write(piece)
            done += len(piece)


def restore(pattern_file: Path, backing: Path, dev: str) -> None:
    """The drive filled again (an erase zeroed it), its page cache dropped (cmp reads it)."""
    with open(pattern_file, "rb") as src, open(backing, "r+b") as dst:
        size = os.fstat(src.fileno()).st_size
        done = 0
        while done < size:
            done += os.copy_file_range(src.fileno(), dst.fileno(), size - done, done, done)
    fd = os.open(dev, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    finally:
        os.close(fd)


def load() -> float:
    return os.getloadavg()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="drive size in MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--formats", default="zst",
                        help="comma-separated: zst, xz, gz, raw (default zst)")
    parser.add_argument("--no-erase", action="store_true", help="leave erase --zero out")
    parser.add_argument("--old", metavar="DIR-or-REV",
                        help="also measure this checkout or git revision, taking turns")
    args = parser.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    if unknown := set(formats) - set(SUFFIX):
        parser.error(f"unknown formats: {', '.join(sorted(unknown))}")
    size = args.size * MiB
    with Bench() as bench:
        codes = codes_of(bench, args.old)
        before = versions(codes)
        work = bench.tempdir("/dev/shm")
        backing, pattern_file = work / "drive.img", work / "pattern.img"
        pattern(pattern_file, size)
        dev = bench.loop(backing, size)
        restore(pattern_file, backing, dev)
        methods = build(bench, codes, dev, work, formats, size, not args.no_erase)
        walls: dict[str, list[float]] = {name: [] for name in methods}
        cpus: dict[str, list[float]] = {name: [] for name in methods}
        loads: dict[int, list[float]] = {}
        for rnd, name in schedule(dict.fromkeys(methods, args.rounds)):
            erase = name.startswith(("erase", "dd+cmp"))
            if erase:
                restore(pattern_file, backing, dev)  # old bytes to overwrite
            loads.setdefault(rnd, []).append(load())
            wall, cpu = methods[name]()
            walls[name].append(wall)
            cpus[name].append(cpu)
            log(f"round {rnd + 1} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU, "
                f"load {loads[rnd][-1]:.1f}")
            if erase:
                restore(pattern_file, backing, dev)  # read the filled drive again
            for leftover in work.glob("out*"):
                leftover.unlink()
        lines, same = version_report(before, versions(codes))
    print("\n".join(lines))
    print(f"drive {args.size} MiB, {args.rounds} rounds; load average (1 min) per round: "
          + ", ".join(f"{min(v):.1f}-{max(v):.1f}" for _, v in sorted(loads.items())))
    rows = []
    for name in methods:
        rows.append([name, median(walls[name]), median(cpus[name]), ratio_of(name, walls),
                     " ".join(f"{w:.2f}" for w in walls[name])])
    print(table(["method", "wall s (median)", "CPU s (median)", "ratio (median of rounds)",
                 "every round, wall s"], rows))
    zst = ratios(walls, "read zst new", "dd|zstd")  # the target: at most 1.05x
    met = not zst or median(zst) <= 1.05
    return 0 if same and met else 1


def ratio_of(name: str, walls: dict[str, list[float]]) -> str:
    """``name`` against its pipes: the median of the same-round ratios."""
    key = " ".join(name.split(" ")[:2])
    return ", ".join(f"{median(ratios(walls, name, base)):.2f}x vs {base}"
                     for base in BASELINES.get(key, ()) if base in walls)


def ratios(walls: dict[str, list[float]], name: str, base: str) -> list[float]:
    if name not in walls or base not in walls:
        return []
    return [a / b for a, b in zip(walls[name], walls[base], strict=False)]


BASELINES = {"read zst": ("dd|zstd",), "read xz": ("dd|xz",), "read gz": ("dd|gzip",),
             "read raw": ("dd",), "erase --zero": ("dd+cmp", "dd+cmp, read-back by dd "
                                                   "iflag=direct")}


def build(bench: Bench, codes: list[Code], dev: str, work: Path, formats: list[str],
          size: int, erase: bool) -> dict[str, Callable[[], tuple[float, float]]]:
    """Each method's name and a call that runs it once: (wall, CPU) seconds."""
    methods: dict[str, Callable[[], tuple[float, float]]] = {}

    def timed(argv: list[str], code: Code | None = None) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            r = bench.run(argv, code=code)
            return r.wall, r.cpu
        return run

    python = [sys.executable, "-m", "popsicle_py"]
    for fmt in formats:
        out = str(work / f"out{SUFFIX[fmt]}")
        for code in codes:
            methods[f"read {fmt} {code.label}"] = timed(
                [*python, "read", dev, out, "--force"], code)
        names = {"zst": ["dd|zstd", "dd|zstd|sha256"], "xz": ["dd|xz"], "gz": ["dd|gzip"],
                 "raw": ["dd", "dd|tee|sha256"]}[fmt]
        for name, pipe in zip(names, PIPES[fmt], strict=True):
            methods[name] = timed(["bash", "-c", pipe.format(dev=shlex.quote(dev),
                                                             out=shlex.quote(out))])
    if erase:
        for code in codes:
            methods[f"erase --zero {code.label}"] = timed(
                [*python, "erase", dev, "--zero", "--fs", "none", "--yes"], code)
        zero = (f"dd if=/dev/zero of={shlex.quote(dev)} bs=4M oflag=direct status=none "
                f"count={size >> 22} && ")
        methods["dd+cmp"] = timed(["bash", "-c", zero + f"cmp -n {size} {shlex.quote(dev)} "
                                   "/dev/zero"])
        # cmp reads the drive through its page cache, 4 KiB at a time: the same check with
        # the read-back as large O_DIRECT reads, the fastest a shell user could make it
        methods["dd+cmp, read-back by dd iflag=direct"] = timed(
            ["bash", "-c", "set -o pipefail; " + zero + f"dd if={shlex.quote(dev)} bs=4M "
             f"iflag=direct status=none | cmp -n {size} - /dev/zero"])
    return methods


if __name__ == "__main__":
    run_main(main)
