"""``read`` and ``erase --zero`` against the shell tools a user would reach for (issue 28).

Not a test.  A 1 GiB loop device over a file on /dev/shm, filled like a used stick (a third
random, a third text-like, a third zeros), then, taking turns, several rounds of:

- ``popsicle-py read DEV out.img.zst`` against ``dd if=DEV bs=4M iflag=direct | zstd -T0 -3``
  (target: at most 1.05x), and against the same piped through ``tee | sha256sum`` (the
  sidecar read writes too);
- ``popsicle-py erase DEV --zero --fs none --yes`` against ``dd if=/dev/zero of=DEV bs=4M
  oflag=direct`` followed by ``cmp`` of the drive with /dev/zero (write, then read back).

Both sides run as whole processes, as a user runs them; medians and ratios are printed.

    python bench/bench_read.py                # 1 GiB, 3 rounds
    python bench/bench_read.py --size 256 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def fill(path: Path, size: int) -> None:
    """A third random, a third text-like (this repository's sources, repeated), zeros."""
    text = b"".join(p.read_bytes() for p in sorted((REPO / "popsicle_py").rglob("*.py")))
    third = size // 3 // MiB * MiB
    with open(path, "r+b") as f:
        f.write(os.urandom(third))
        done = 0
        while done < third:
            piece = text[: third - done]
            f.write(piece)
            done += len(piece)


CPU: dict[str, list[float]] = {}


def timed(argv: list[str] | str, *, shell: bool = False, name: str = "") -> float:
    """Wall seconds; the CPU seconds of every process it ran go to ``CPU[name]``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    subprocess.run(argv, shell=shell, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.setdefault(name, []).append(after.ru_utime + after.ru_stime - before.ru_utime
                                    - before.ru_stime)
    return wall


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024, help="drive size in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.size * MiB
    work = Path(tempfile.mkdtemp(prefix="popsicle-bench-read-", dir="/dev/shm"))
    backing = work / "drive.img"
    with open(backing, "wb") as f:
        f.truncate(size)
    fill(backing, size)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    cli = [sys.executable, "-m", "popsicle_py"]
    times: dict[str, list[float]] = {k: [] for k in ("read", "dd|zstd", "dd|zstd|sha256",
                                                     "erase", "dd+cmp")}
    try:
        for _ in range(args.rounds):
            out = work / "out.img.zst"
            times["read"].append(timed([*cli, "read", dev, str(out), "--force"], name="read"))
            out.unlink()
            times["dd|zstd"].append(timed(
                f"dd if={dev} bs=4M iflag=direct status=none | zstd -q -T0 -3 -o {out}",
                shell=True, name="dd|zstd"))
            out.unlink()
            times["dd|zstd|sha256"].append(timed(  # the same work as read: the sidecar too
                f"dd if={dev} bs=4M iflag=direct status=none | zstd -q -T0 -3 | tee {out} "
                f"| sha256sum > {out}.sha256", shell=True, name="dd|zstd|sha256"))
            out.unlink()
            Path(f"{out}.sha256").unlink()
            fill(backing, size)  # so each erase has old bytes to overwrite
            times["erase"].append(timed([*cli, "erase", dev, "--zero", "--fs", "none",
                                         "--yes"], name="erase"))
            fill(backing, size)
            times["dd+cmp"].append(timed(
                f"dd if=/dev/zero of={dev} bs=4M oflag=direct status=none count={size >> 22}"
                f" && cmp -n {size} {dev} /dev/zero", shell=True, name="dd+cmp"))
            fill(backing, size)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in CPU.items()}
    print(f"drive {args.size} MiB, {args.rounds} rounds, medians (every round: {times})")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    for other in ("dd|zstd", "dd|zstd|sha256"):
        print(f"read .zst   {med['read']:.2f} s ({cpu['read']:.2f} s CPU)   {other}   "
              f"{med[other]:.2f} s ({cpu[other]:.2f} s CPU)   "
              f"ratio {med['read'] / med[other]:.2f}x")
    print(f"erase --zero {med['erase']:.2f} s ({cpu['erase']:.2f} s CPU)   dd + cmp   "
          f"{med['dd+cmp']:.2f} s ({cpu['dd+cmp']:.2f} s CPU)   "
          f"ratio {med['erase'] / med['dd+cmp']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
