"""How long the capacity probe takes on a 20 MB/s stick (issue 14: "well under a second").

Not a test.  A loop device over a sparse file on /dev/shm, throttled by a blkio (cgroup v1)
group to 20 MB/s for reads and writes (and, with ``--iops``, to a USB-stick-like number of
requests per second), and the probe run in a child process inside that group, several
rounds per claimed size; prints the median and the number of writes and reads.

    python bench/bench_probe.py                 # 1, 16, 64 GiB claims, 5 rounds
    python bench/bench_probe.py --iops 1000,3000 --rounds 3
    python bench/bench_probe.py --image 4 --iops 1000,3000   # a flash's probe, two ways

With ``--image GiB`` the probe is the one a flash of an image that big runs (on the opened
drive, 16 MiB buckets, what its stamps overwrote put back), taking turns: putting everything
back ("all", as before issue 30) and leaving the stamps the flash overwrites ("flash").

``--dir /var/tmp`` puts the loop device's backing file on a disk's file system instead of
/dev/shm, so that each cache flush of the device is a real fsync of that disk (as a stick's
SYNCHRONIZE CACHE costs time; on tmpfs it costs nothing).  ``--old REV`` runs that code's
probe too, taking turns.  The table counts the device's cache flushes
(``/sys/block/*/stat``).

    python bench/bench_probe.py --image 4 --sizes 1,16 --dir /var/tmp --old 59d0369
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CGROUP = Path("/sys/fs/cgroup/blkio")

CHILD = """
import json, os, sys
sys.path.insert(0, {repo!r})
with open({procs!r}, "w") as f:
    f.write(str(os.getpid()))
from popsicle_py.probe import probe
before = open({stat!r}).read().split()[15]
r = probe({dev!r}, {claimed}, boundaries=range(0, 4 << 30, 16 << 20))
flushes = int(open({stat!r}).read().split()[15]) - int(before)
print(json.dumps({{**r.to_json(), "flushes": flushes}}))
"""

FLASH_CHILD = """
import json, os, sys
sys.path.insert(0, {repo!r})
with open({procs!r}, "w") as f:
    f.write(str(os.getpid()))
from popsicle_py import blockdev
from popsicle_py.probe import probe_device
image, bucket = {image}, 16 << 20
device = blockdev.open_for_writing(blockdev.OpenSpec({dev!r}, {claimed}))
before = open({stat!r}).read().split()[15]
try:
    r = probe_device(device, [*range(bucket, image, bucket), image],
                     overwritten=((0, image),) if {leave} else ())
finally:
    device.close()
flushes = int(open({stat!r}).read().split()[15]) - int(before)
print(json.dumps({{**r.to_json(), "restored": r.restored, "flushes": flushes}}))
"""


def old_root(rev: str, into: str) -> Path:
    """popsicle_py as it was at ``rev`` (a git revision of this repository), under ``into``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "popsicle_py"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return Path(into)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,16,64", help="claimed sizes in GiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=int, default=20_000_000, help="bytes/s, read and write")
    parser.add_argument("--iops", default="", help="WRITE,READ requests per second (optional)")
    parser.add_argument("--image", type=float, default=0,
                        help="GiB: a flash's probe for an image that big, both ways")
    parser.add_argument("--dir", default="/dev/shm", help="where the backing file lives")
    parser.add_argument("--old", metavar="REV", help="also run this revision's probe, in turns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-probe-old-", dir="/var/tmp") as scratch:
        codes = [("new", REPO)] + ([(f"old ({args.old})", old_root(args.old, scratch))]
                                   if args.old else [])
        rows = measure(args, codes)
    limit = f"{args.rate / 1e6:.0f} MB/s" + (f", {args.iops} IOPS" if args.iops else "")
    print(f"probe on a loop device over {args.dir} throttled to {limit}, {args.rounds} rounds"
          + (f", a flash's of a {args.image:g} GiB image" if args.image else ""))
    print("claim GiB | code | put back | median s | max s | writes | reads | restored | flushes")
    for gib, label, mode, med, worst, writes, reads, restored, flushes in rows:
        print(f"{gib:9} | {label} | {mode or '-':8} | {med:8.3f} | {worst:5.3f} | {writes:6} |"
              f" {reads:5} | {restored} | {flushes}")
    return 0


def measure(args: argparse.Namespace, codes: list[tuple[str, Path]]) -> list[tuple[object, ...]]:
    modes = ["all", "flash"] if args.image else [""]
    rows: list[tuple[object, ...]] = []
    for gib in (int(s) for s in args.sizes.split(",")):
        claimed = gib << 30
        fd, backing = tempfile.mkstemp(prefix="faultfs-bench-", dir=args.dir)
        os.close(fd)
        os.truncate(backing, claimed)
        dev = subprocess.run(["losetup", "-f", "--show", backing], check=True,
                             capture_output=True, text=True).stdout.strip()
        stat = f"/sys/block/{os.path.basename(dev)}/stat"
        group = CGROUP / f"faultfs-bench-{uuid.uuid4().hex[:8]}"
        group.mkdir()
        try:
            rdev = os.stat(dev).st_rdev
            key = f"{os.major(rdev)}:{os.minor(rdev)}"
            for kind in ("read", "write"):
                (group / f"blkio.throttle.{kind}_bps_device").write_text(f"{key} {args.rate}\n")
            if args.iops:
                w, r = args.iops.split(",")
                (group / "blkio.throttle.write_iops_device").write_text(f"{key} {w}\n")
                (group / "blkio.throttle.read_iops_device").write_text(f"{key} {r}\n")
            runs = [(label, repo, mode) for label, repo in codes for mode in modes]
            results: dict[tuple[str, str], list[dict[str, object]]] = {
                (label, mode): [] for label, _, mode in runs}
            for _ in range(args.rounds):
                for label, repo, mode in runs:  # taking turns: the same load for each
                    code = CHILD.format(repo=str(repo), procs=str(group / "cgroup.procs"),
                                        dev=dev, claimed=claimed, stat=stat) if not mode else \
                        FLASH_CHILD.format(repo=str(repo), procs=str(group / "cgroup.procs"),
                                           dev=dev, claimed=claimed, leave=mode == "flash",
                                           image=min(claimed, int(args.image * (1 << 30))),
                                           stat=stat)
                    out = subprocess.run([sys.executable, "-c", code], check=True,
                                         capture_output=True, text=True).stdout
                    results[(label, mode)].append(json.loads(out))
            for (label, mode), done in results.items():
                assert all(r["ok"] for r in done), done
                rows.append((gib, label, mode,
                             statistics.median(float(str(r["elapsed"])) for r in done),
                             max(float(str(r["elapsed"])) for r in done), done[0]["writes"],
                             done[0]["reads"], done[0].get("restored", "-"),
                             done[0]["flushes"]))
        finally:
            group.rmdir()
            subprocess.run(["losetup", "-d", dev], check=False)
            os.unlink(backing)
    return rows


if __name__ == "__main__":
    sys.exit(main())
