"""Flash of a URL against flash of the same local file, onto throttled drives (issue 18).

Run as root: ``python bench/bench_url.py [--size-mib 192] [--runs 3] [--drives 2]
[--rate-mb 40] [--format raw|gzip]``.

The image is served by the test suite's web server (tests/webserver.py) on 127.0.0.1, from a
file in /var/tmp; each drive is a loop device on /dev/shm throttled to ``--rate-mb`` MB/s by a
blkio cgroup holding the flashing process.  Local and URL flashes (``--no-verify
--no-checksum``, so that only the write pass differs) take turns, the page cache is dropped
before each, and the figure is the ratio of the medians: URL time / local time, target 1.05.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _benchlib import MB, REPO, Bench, MiB, drop_caches, log, median, random_file, table
from webserver import Served, serving

TARGET = 1.05


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=192)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--drives", type=int, default=2)
    parser.add_argument("--rate-mb", type=int, default=40, help="each drive's write speed")
    parser.add_argument("--format", choices=("raw", "gzip"), default="raw")
    args = parser.parse_args()
    size = args.size_mib * MiB
    cmd = [sys.executable, "-m", "popsicle_py", "flash"]
    os.environ["PYTHONPATH"] = str(REPO)
    with Bench() as bench, serving() as web:
        work = bench.tempdir("/var/tmp")
        image = work / "image.img"
        random_file(image, size)
        if args.format == "gzip":  # incompressible data: gzip costs the same for both sides
            packed = work / "image.img.gz"
            with open(image, "rb") as src, gzip.open(packed, "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst, 16 * MiB)
            image = packed
        web.add(f"/{image.name}", Served(file=image))
        url = web.url(f"/{image.name}")
        shm = bench.tempdir("/dev/shm")
        devs = [bench.loop(shm / f"d{i}.img", size + 16 * MiB) for i in range(args.drives)]
        cg = bench.cgroup("url")
        for dev in devs:
            rdev = os.stat(dev).st_rdev
            (cg / "blkio.throttle.write_bps_device").write_text(
                f"{os.major(rdev)}:{os.minor(rdev)} {args.rate_mb * MB}\n")
        times: dict[str, list[float]] = {"local": [], "url": []}
        for n in range(args.runs):
            for kind, source in (("local", str(image)), ("url", url)):
                drop_caches()
                run = bench.run([*cmd, source, *devs, "--yes", "--json", "--no-verify",
                                 "--no-checksum"], cgroup=cg)
                if '"ok": true' not in run.stdout.splitlines()[-1]:
                    raise SystemExit(f"{kind} flash failed: {run.stdout[-500:]}")
                times[kind].append(run.wall)
                log(f"run {n + 1} {kind}: {run.wall:.2f} s")
    local, remote = median(times["local"]), median(times["url"])
    ratio = remote / local
    print(f"image: {args.size_mib} MiB random ({args.format}); {args.drives} drives at "
          f"{args.rate_mb} MB/s each; medians of {args.runs}")
    print(table(["source", "seconds", "MB/s per drive"],
                [["local file", f"{local:.2f}", f"{size / local / MB:.1f}"],
                 ["URL (127.0.0.1)", f"{remote:.2f}", f"{size / remote / MB:.1f}"]]))
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"URL / local time: {ratio:.3f} (target {TARGET}: {verdict})")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
