"""Writing only what a Raspberry-Pi-like image's file systems use, against every byte (issue 31).

Run as root: ``python bench/bench_trim.py [--root-mib 640] [--runs 3] [--compress zst]
[--etcher DIR]``.

The image: an MBR, a FAT32 boot partition (256 MiB, 40 MiB of files) and an ext4 root
(``--root-mib``, 40% of it files, 60% free), made by mkfs.vfat and mke2fs over random bytes: the
free space holds old data, not zeros, so it cannot be skipped as holes.  Two loop devices (files
on /dev/shm) play SD cards writing at 20 MB/s and reading at 80 MB/s (one blkio cgroup holds the
flashing process).  ``popsicle-py flash`` of the image to both drives, verification on, is
timed with and without ``--no-trim``, taking turns, medians of ``--runs``; the target is the
used bytes written and read back at those rates: used/20 MB/s + used/80 MB/s.

``--compress xz|zst`` (default zst; ``none`` to leave it out): the same image compressed is
flashed too, with and without ``--no-trim``: its free space is decided as it is decoded (every
byte decoded once, only the used ones written and read back); the same target applies.

``--etcher DIR``: a directory where ``npm install etcher-sdk`` was run; etcher-sdk's
``decompressThenFlash`` with ``trim: true`` (its autoBlockmapping) is timed too, same drives,
same throttle.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import MB, Bench, MiB, median, random_file, schedule, table

WRITE_RATE = 20 * MB
READ_RATE = 80 * MB
BOOT = 256 * MiB
START = 4 * MiB

ETCHER_JS = r"""
const sdk = require('etcher-sdk');
const [image, ...devices] = process.argv.slice(2);
(async () => {
  const source = new sdk.sourceDestination.File({ path: image });
  const dests = devices.map((d) => new sdk.sourceDestination.File({ path: d, write: true }));
  const started = Date.now();
  const result = await sdk.multiWrite.decompressThenFlash({
    source, destinations: dests, onFail: (d, e) => { console.error(e); process.exit(1); },
    onProgress: () => {}, verify: true, trim: true, numBuffers: 16,
  });
  console.log(JSON.stringify({ seconds: (Date.now() - started) / 1000,
                               failures: result.failures.size, bytes: result.bytesWritten }));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def limit(cg: Path, dev: str) -> None:
    rdev = os.stat(dev).st_rdev
    for kind, rate in (("write", WRITE_RATE), ("read", READ_RATE)):
        (cg / f"blkio.throttle.{kind}_bps_device").write_text(
            f"{os.major(rdev)}:{os.minor(rdev)} {rate}\n")


def files(root: Path, total: int, seed: int, mu: float = 11) -> None:
    """Random files of 4 KiB to 16 MiB, ``total`` bytes in all (a root file system's mix)."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    n = 0
    while total > 0:
        size = min(total, int(rng.lognormvariate(mu, 2.2)) + 4096, 16 * MiB)
        (root / f"F{n:05d}").write_bytes(os.urandom(size))
        total -= size
        n += 1


def build(shm: Path, root_size: int) -> Path:
    image = shm / "rpi.img"
    size = START + BOOT + root_size + MiB
    random_file(image, size)  # old data everywhere free space will be
    ext_at = START + BOOT
    subprocess.run(["sfdisk", "-q", str(image)], check=True, text=True,
                   input=f"label: dos\n{START // 512},{BOOT // 512},c\n"
                         f"{ext_at // 512},{root_size // 512},83\n")
    boot, rootfs = shm / "boot", shm / "root"
    files(boot, 40 * MiB, 1, mu=13)  # a few dozen files: a FAT root directory's worth
    files(rootfs, root_size * 2 // 5, 2)
    subprocess.run(["mkfs.vfat", "-F", "32", "-s", "4", "--offset", str(START // 512), str(image),
                    str(BOOT // 1024)], check=True, capture_output=True)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(["mcopy", "-i", f"{image}@@{START}", *map(str, sorted(boot.iterdir())),
                    "::"], check=True, capture_output=True, env=env)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"nodiscard,offset={ext_at}",
                    "-d", str(rootfs), str(image), f"{root_size // 1024}k"], check=True,
                   capture_output=True)
    return image


def compress(image: Path, kind: str) -> Path:
    """The image compressed (xz -T0 -1, or zstd -T0 -3), beside it."""
    out = image.with_name(f"{image.name}.{kind}")
    tool = ["xz", "-T0", "-1", "-k", "-c"] if kind == "xz" else ["zstd", "-T0", "-3", "-q", "-c"]
    with open(out, "wb") as f:
        subprocess.run([*tool, str(image)], check=True, stdout=f)
    return out


def used_bytes(image: Path) -> tuple[int, int]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from popsicle_py.app.trim import read_usage
    from popsicle_py.images import open_image

    usage = read_usage(open_image(str(image)))
    return usage.used, usage.size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root-mib", type=int, default=640)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compress", choices=("xz", "zst", "none"), default="zst")
    parser.add_argument("--etcher", type=Path, default=None,
                        help="a directory holding node_modules/etcher-sdk")
    args = parser.parse_args()
    popsicle = [sys.executable, "-m", "popsicle_py"]
    with Bench() as bench:
        shm = bench.tempdir("/dev/shm")
        image = build(shm, args.root_mib * MiB)
        used, size = used_bytes(image)
        devices = [bench.loop(shm / f"d{i}.img", size + 16 * MiB) for i in range(2)]
        cg = bench.cgroup("trim")
        for dev in devices:
            limit(cg, dev)
        flash = [*popsicle, "flash", "IMAGE", *devices, "--yes", "--json", "--no-checksum"]
        methods = {"every byte (--no-trim)": [str(image), "--no-trim"],
                   "trim (default)": [str(image)]}
        if args.compress != "none":
            packed = str(compress(image, args.compress))
            methods[f".{args.compress}, every byte (--no-trim)"] = [packed, "--no-trim"]
            methods[f".{args.compress}, trim (default)"] = [packed]
        script = None
        if args.etcher is not None:
            script = args.etcher / "flash.js"
            script.write_text(ETCHER_JS)
            methods["etcher-sdk, trim on"] = []
        walls: dict[str, list[float]] = {name: [] for name in methods}
        written: dict[str, int] = {}
        for _, name in schedule({name: args.runs for name in methods}):
            if name.startswith("etcher"):
                assert script is not None
                run = bench.run(["node", str(script), str(image), *devices], cgroup=cg,
                                timeout=3600)
                out = json.loads(run.stdout.strip().splitlines()[-1])
                assert out["failures"] == 0, out
                written[name] = int(out["bytes"])
            else:
                image_arg, *options = methods[name]
                argv = [image_arg if a == "IMAGE" else a for a in flash]
                run = bench.run([*argv, *options], cgroup=cg, timeout=3600)
                summary = [e for e in run.json_lines() if e.get("event") == "summary"][-1]
                assert summary["ok"], summary
                written[name] = summary["results"][0]["bytes_written"]
            walls[name].append(run.wall)
        target = used / WRITE_RATE + used / READ_RATE
        rows = []
        for name, w in walls.items():  # each against every byte of its own format
            kind = name.split(",")[0] + ", " if name.startswith(".") else ""
            full = median(walls[f"{kind}every byte (--no-trim)"])
            rows.append([name, median(w), f"{written[name] / MiB:.0f}", median(w) / full,
                         median(w) / target])
    print(f"image: {size / MiB:.0f} MiB (FAT32 boot 256 MiB with 40 MiB of files, ext4 root "
          f"{args.root_mib} MiB 40% used, free space random), {used / MiB:.0f} MiB used; "
          f"2 drives writing at {WRITE_RATE // MB} MB/s and reading at {READ_RATE // MB} MB/s, "
          f"verification on, medians of {args.runs}; target (used/write + used/read rate): "
          f"{target:.1f} s")
    print(table(["method", "wall s", "MiB written per drive", "vs every byte", "vs target"],
                rows))
    print(json.dumps({"walls": walls, "used": used, "size": size, "target": target}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
