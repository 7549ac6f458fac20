"""Decompress-and-flash throughput per format, and verification against `cmp` (issue 6).

Run as root: ``python bench/bench_formats.py [--size-mib 256] [--runs 3]``.

For each format, in one run, alternating, medians of ``--runs``:
- ``popsicle-py flash --no-verify`` of the compressed image to one loop device, against the
  pipeline people use (``xz -dc IMG | dd of=DEV bs=16M oflag=direct iflag=fullblock``);
- verification: ``popsicle-py verify IMG DEV`` (reads the drive and the image) against
  ``cmp IMG DEV`` on the raw image (page cache dropped before each).
The loop device is backed by a file on /dev/shm, so the drive is not the bottleneck: this
measures the decoder and the pipeline, which is what differs between the methods.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import MB, Bench, MiB, drop_caches, median, table

TOOLS = {  # format -> (compress argv prefix, suffix, decompress-to-stdout argv prefix)
    "gzip": (["gzip", "-k", "-1"], ".gz", ["gzip", "-dc"]),
    "xz": (["xz", "-k", "-T2", "-1"], ".xz", ["xz", "-dc"]),
    "bzip2": (["bzip2", "-k", "-1"], ".bz2", ["bzip2", "-dc"]),
    "zstd": (["zstd", "-q", "-k", "-3"], ".zst", ["zstd", "-dc"]),
}


def make_image(path: Path, size: int) -> None:
    """Half random, half zeros, in 64 KiB blocks: compressible like a real disk image."""
    block = 64 << 10
    with open(path, "wb") as f:
        for i in range(size // block):
            f.write(os.urandom(block) if i % 2 else bytes(block))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--formats", default="raw,gzip,xz,bzip2,zstd")
    args = parser.parse_args()
    size = args.size_mib * MiB
    popsicle = shutil.which("popsicle-py") or "popsicle-py"
    rows = []
    with Bench() as bench:
        work = bench.tempdir("/var/tmp")
        raw = work / "image.img"
        make_image(raw, size)
        dev = bench.loop(bench.tempdir("/dev/shm") / "drive.img", size + 16 * MiB)
        for fmt in args.formats.split(","):
            if fmt == "raw":
                image, pipeline = raw, ["dd", f"if={raw}", f"of={dev}", "bs=16M", "oflag=direct",
                                        "status=none"]
            else:
                compress, suffix, decompress = TOOLS[fmt]
                image = Path(str(raw) + suffix)
                if not image.exists():
                    bench.run([*compress, str(raw)], timeout=1800)
                pipeline = ["sh", "-c", f"{' '.join(decompress)} {image} | dd of={dev} bs=16M "
                            "oflag=direct iflag=fullblock status=none"]
            ours, theirs = [], []
            for _ in range(args.runs):
                drop_caches()
                ours.append(bench.run([popsicle, "flash", str(image), dev, "--yes", "--json",
                                       "--no-verify", "--no-checksum"]).wall)
                drop_caches()
                theirs.append(bench.run(pipeline).wall)
            o, t = median(ours), median(theirs)
            rows.append([f"flash {fmt}", f"{size / o / MB:.0f}", f"{size / t / MB:.0f}",
                         f"{o / t:.2f}", "dd" if fmt == "raw" else f"{TOOLS[fmt][2][0]} | dd"])
        # Verification of the raw image, against cmp (both read the device and the image).
        bench.run([popsicle, "flash", str(raw), dev, "--yes", "--json", "--no-verify"])
        ours, theirs = [], []
        for _ in range(args.runs):
            drop_caches()
            ours.append(bench.run([popsicle, "verify", str(raw), dev, "--json"]).wall)
            drop_caches()
            theirs.append(bench.run(["cmp", "-n", str(size), str(raw), dev]).wall)
        o, t = median(ours), median(theirs)
        rows.append(["verify raw", f"{size / o / MB:.0f}", f"{size / t / MB:.0f}",
                     f"{o / t:.2f}", "cmp"])
    print(f"image: {args.size_mib} MiB (half random); device: loop on /dev/shm; "
          f"medians of {args.runs}")
    print(table(["method", "ours MB/s", "theirs MB/s", "time ratio", "theirs"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
