"""flash --customize against a plain flash of the same image to the same drives (issue 27).

Run as root: ``python bench/bench_customize.py [--boot-mib 256] [--root-mib 256] [--runs 3]``.

A Raspberry-Pi-like image (tests/pi_image.py: FAT32 boot partition holding firmware-like
random files, ext4 root) is flashed to two loop devices (files on /dev/shm) that play USB sticks
writing at 20 MB/s and reading at 80 MB/s (one blkio cgroup holds the flashing process),
alternating plain runs and runs with ``--customize`` (cloud-init, a CSV row per drive), medians
of ``--runs``.  The issue's budget: at most 1.1x the plain run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import pi_image  # noqa: E402
from _benchlib import MB, Bench, MiB, median, table  # noqa: E402
from bench_skip import READ_RATE, WRITE_RATE, limit  # noqa: E402  (20 MB/s, 80 MB/s)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK7y7UxIbBf10hjkkKaoDhFxSFdfZG1ZjTmXCUdxf9Rz a@x"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--boot-mib", type=int, default=256)
    parser.add_argument("--firmware-mib", type=int, default=48)
    parser.add_argument("--root-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    popsicle = [sys.executable, "-m", "popsicle_py"]
    with Bench() as bench, tempfile.TemporaryDirectory(dir="/var/tmp") as build:
        image = pi_image.build(Path(build), boot_mib=args.boot_mib, root_mib=args.root_mib,
                               firmware_mib=args.firmware_mib)
        size = image.stat().st_size
        shm = bench.tempdir("/dev/shm")
        devices = [bench.loop(shm / f"d{i}.img", size + 16 * MiB) for i in range(2)]
        cg = bench.cgroup("customize")
        for dev in devices:
            limit(cg, dev)
        toml, values = Path(build) / "class.toml", Path(build) / "class.csv"
        toml.write_text('hostname = "{hostname}"\nuser = "student"\n'
                        'password = "correct horse battery"\n'
                        'ssh_authorized_keys = ["{ssh_key}"]\ntimezone = "Europe/Berlin"\n'
                        '[wifi]\nssid = "classroom"\npassphrase = "wifi password"\n'
                        'country = "DE"\n')
        values.write_text(f"seq,hostname,ssh_key\n1,pi-01,{KEY}\n2,pi-02,{KEY}\n")
        flash = [*popsicle, "flash", str(image), *devices, "--yes", "--json", "--no-checksum"]
        custom = ["--customize", str(toml), "--values", str(values),
                  "--customize-format", "cloud-init"]

        def timed(*extra: str) -> float:
            run = bench.run([*flash, *extra], cgroup=cg, timeout=1800)
            summary = [e for e in run.json_lines() if e.get("event") == "summary"][-1]
            assert summary["ok"], summary
            return run.wall

        plain, customized = [], []
        for _ in range(args.runs):
            plain.append(timed())
            customized.append(timed(*custom))
        base = median(plain)
        print(f"image {size / MiB:.0f} MiB (boot {args.boot_mib} MiB with "
              f"{args.firmware_mib} MiB of files, root {args.root_mib} MiB), 2 drives at "
              f"{WRITE_RATE / MB:.0f} MB/s write, {READ_RATE / MB:.0f} MB/s read")
        print(table(["run", "median s", "runs", "x plain"],
                    [["plain flash", f"{base:.1f}", " ".join(f"{w:.1f}" for w in plain), "1.00"],
                     ["--customize", f"{median(customized):.1f}",
                      " ".join(f"{w:.1f}" for w in customized),
                      f"{median(customized) / base:.3f}"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
