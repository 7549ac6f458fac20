"""Re-flashing drives that already hold the image, with and without --skip-identical (issue 10).

Run as root: ``python bench/bench_skip.py [--size-mib 256] [--runs 3]``.

Two loop devices (files on /dev/shm) play USB sticks that write at 20 MB/s and read at
80 MB/s (one blkio cgroup holds the flashing process).  Both already hold the image; the
script times ``popsicle-py flash`` of the same image to both, alternating with and without
``--skip-identical`` (verification on, as a user would run it), medians of ``--runs``.  It also
times a re-flash where 3 buckets differ, which is the resume case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import MB, Bench, MiB, median, random_file, table

WRITE_RATE = 20 * MB
READ_RATE = 80 * MB


def limit(cg: Path, dev: str) -> None:
    rdev = os.stat(dev).st_rdev
    for kind, rate in (("write", WRITE_RATE), ("read", READ_RATE)):
        (cg / f"blkio.throttle.{kind}_bps_device").write_text(
            f"{os.major(rdev)}:{os.minor(rdev)} {rate}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib * MiB
    # This checkout's code, as the other benches run it (an installed popsicle-py may be older).
    popsicle = [sys.executable, "-m", "popsicle_py"]
    rows = []
    with Bench() as bench:
        shm = bench.tempdir("/dev/shm")
        image = shm / "image.img"
        random_file(image, size)
        devices = [bench.loop(shm / f"d{i}.img", size + 16 * MiB) for i in range(2)]
        cg = bench.cgroup("skip")
        for dev in devices:
            limit(cg, dev)
        flash = [*popsicle, "flash", str(image), *devices, "--yes", "--json", "--no-checksum"]
        bench.run(flash)  # both drives hold the image now (unthrottled set-up)

        def timed(*extra: str) -> tuple[float, int]:
            run = bench.run([*flash, *extra], cgroup=cg, timeout=1800)
            summary = [e for e in run.json_lines() if e.get("event") == "summary"][-1]
            assert summary["ok"], summary
            return run.wall, sum(r["bytes_written"] for r in summary["results"])

        plain, skip = [], []
        written = {}
        for _ in range(args.runs):
            wall, written["plain"] = timed()
            plain.append(wall)
            wall, written["skip"] = timed("--skip-identical")
            skip.append(wall)
        # Resume-like: three buckets differ on each drive.
        changed = []
        for _ in range(args.runs):
            for dev in devices:
                fd = os.open(dev, os.O_WRONLY)
                for bucket in (0, 7, 13):
                    os.pwrite(fd, b"\xff" * 512, bucket * 16 * MiB + 4096)
                os.fsync(fd)
                os.close(fd)
            wall, written["changed"] = timed("--skip-identical")
            changed.append(wall)
        base = median(plain)
        for name, runs, key in (("re-flash, every byte", plain, "plain"),
                                ("re-flash, --skip-identical", skip, "skip"),
                                ("3 buckets differ, --skip-identical", changed, "changed")):
            rows.append([name, f"{median(runs):.2f}", f"{written[key] / MiB:.0f}",
                         f"{median(runs) / base:.2f}"])
    print(f"image: {args.size_mib} MiB random, 2 drives writing at {WRITE_RATE // MB} MB/s and "
          f"reading at {READ_RATE // MB} MB/s, verification on, medians of {args.runs}")
    print(table(["method", "wall s", "MiB written (both drives)", "ratio"], rows))
    print(json.dumps({"plain": plain, "skip": skip, "changed": changed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
