#!/usr/bin/env python3
"""popsicle-py beside its peers, against the physical limit of the drives (issue 30).

Not a test.  Every method is a whole process (a shell for the peers that need several), spawn
to exit, in a blkio cgroup that throttles each loop device's writes and reads; the methods take
turns round by round.  The physical limit is what the drives themselves need to be written and
read back once: ``image size / write rate + image size / read rate``; each figure is the
median wall time divided by it.  Every run starts with the drives' page cache empty
(``blockdev --flushbufs``): the peers' ``cmp`` reads them through it, and no run should pay
for dropping another's pages.

(a) 4 drives at 30 MB/s write and 90 MB/s read, a random image of 256 MiB and 1 GiB:

- popsicle-py flash, verify on (``flash IMG DEV... --yes --json``);
- 4 parallel ``dd oflag=direct``, then 4 parallel ``cmp`` (GNOME MultiWriter's way);
- ``dcfldd`` and ``dc3dd`` with 4 outputs, then 4 parallel ``cmp`` (256 MiB only: slow).
  They write through the page cache, and cgroup v1 blkio does not throttle the kernel's
  writeback of it: their writes are not held to 30 MB/s, which flatters them;
- ``bmaptool copy --nobmap`` to each drive in turn (256 MiB only; it reads nothing back);
- balenaEtcher's engine, etcher-sdk, verify on (``etcher_flash.js``: all drives at once, as
  Etcher does), when it is installed in bench/etcher (bench/README.md); else skipped, saying so.

(b) the scale table: 1, 16 and 32 drives, a 128 MiB image, 30 MB/s write and 60 MB/s read,
popsicle-py (verify on), the same with ``--no-probe`` (every fixed cost but the capacity
probe), and parallel dd then cmp: the ratio to the limit, the first write (the first
``writing`` phase seen on stdout, from the spawn) and the last drive's, the longest verify
phase of a drive (its ``verifying`` phase to its ``result``), the exit after the last result,
peak RSS.  One untimed, unthrottled flash onto every drive comes first (tmpfs allocates the
loop devices' pages then).

    python bench/bench_peers.py                  # both parts, 3 rounds (1 GiB: 2)
    python bench/bench_peers.py --parts b --rounds 2
    python bench/bench_peers.py --quick          # 64 MiB, one round, no 1 GiB
    python bench/bench_peers.py --old 70b9aa4    # the old code too, taking turns
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from _benchlib import (
    MB,
    Bench,
    Code,
    MiB,
    Run,
    add_run_options,
    cli_argv,
    cli_results,
    codes_of,
    dd_argv,
    log,
    median,
    random_file,
    run_main,
    schedule,
    table,
    version_report,
    versions,
)

WRITE_A, READ_A = 30 * MB, 90 * MB
WRITE_B, READ_B = 30 * MB, 60 * MB
SCALE = (1, 16, 32)


def throttle_rw(cg: Path, dev: str, write: int, read: int) -> None:
    import os

    rdev = os.stat(dev).st_rdev
    key = f"{os.major(rdev)}:{os.minor(rdev)}"
    (cg / "blkio.throttle.write_bps_device").write_text(f"{key} {write}\n")
    (cg / "blkio.throttle.read_bps_device").write_text(f"{key} {read}\n")


def shell(bench: Bench, script: str, cg: Path) -> Run:
    return bench.run(["bash", "-c", "set -e -o pipefail\n" + script], cgroup=cg)


def parallel(commands: list[str]) -> str:
    """Run every command at once; fail if any failed."""
    body = "\n".join(f"{c} & pids+=($!)" for c in commands)
    return f"pids=()\n{body}\nfor p in \"${{pids[@]}}\"; do wait $p; done\n"


def cmp_all(image: Path, devices: list[str]) -> str:
    """Compare each drive with the image, read from the drive (its page cache dropped first:
    a buffered writer leaves the image there)."""
    size = image.stat().st_size
    return (f"sync\nblockdev --flushbufs {' '.join(devices)}\n"
            + parallel([f"cmp -n {size} {image} {d}" for d in devices]))


def cli_method(bench: Bench, code: Code, image: Path, devices: list[str], cg: Path,
               *flags: str) -> Callable[[], Run]:
    """The CLI's flash as one method (every drive must end ok)."""
    def go() -> Run:
        run = bench.run(cli_argv(image, devices, *flags), cgroup=cg, code=code)
        cli_results(run, devices)
        return run
    return go


def methods_for(bench: Bench, codes: list[Code], image: Path, devices: list[str], cg: Path,
                *, slow: bool) -> dict[str, Callable[[], Run]]:
    out: dict[str, Callable[[], Run]] = {
        f"popsicle-py, verify on ({c.label})": cli_method(bench, c, image, devices, cg)
        for c in codes}
    dd = parallel([" ".join(dd_argv(image, d)) for d in devices])
    out["parallel dd oflag=direct, then parallel cmp"] = (
        lambda: shell(bench, dd + cmp_all(image, devices), cg))
    out.update(etcher_methods(bench, image, devices, cg))
    if slow:
        outs = " ".join(f"of={d}" for d in devices)
        if shutil.which("dcfldd"):
            out["dcfldd, N outputs, then parallel cmp"] = lambda: shell(
                bench, f"dcfldd if={image} {outs} bs=4M status=off\n"
                + cmp_all(image, devices), cg)
        if shutil.which("dc3dd"):
            out["dc3dd, N outputs, then parallel cmp"] = lambda: shell(
                bench, f"dc3dd if={image} {outs} nwspc=on log=/dev/null 2>/dev/null\n"
                + cmp_all(image, devices), cg)
        if shutil.which("bmaptool"):
            seq = "\n".join(f"bmaptool -q copy --nobmap {image} {d}" for d in devices)
            out["bmaptool copy, each drive in turn (no read-back)"] = (
                lambda: shell(bench, seq + "\n", cg))
    return out


ETCHER = Path(__file__).resolve().parent / "etcher_flash.js"


def etcher_methods(bench: Bench, image: Path, devices: list[str], cg: Path
                   ) -> dict[str, Callable[[], Run]]:
    """etcher-sdk (issue 30) as a peer, when node and its bench/etcher install are there."""
    import os

    sdk = Path(os.environ.get("ETCHER_SDK_DIR", ETCHER.parent / "etcher"))
    if shutil.which("node") is None or not (sdk / "node_modules" / "etcher-sdk").is_dir():
        log(f"etcher-sdk skipped: no node or no {sdk}/node_modules/etcher-sdk "
            "(cd bench/etcher && npm install; see bench/README.md)")
        return {}
    argv = ["node", str(ETCHER), str(image), *devices]
    return {"etcher-sdk, verify on": lambda: bench.run(argv, cgroup=cg)}


def rounds_of(bench: Bench, counts: dict[str, int], methods: dict[str, Callable[[], Run]],
              tag: str, devices: list[str]) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {name: [] for name in methods}
    for r, name in schedule(counts):
        # cmp reads the drives through the page cache: the next run would pay for its pages.
        subprocess.run(["blockdev", "--flushbufs", *devices], check=True)
        run = methods[name]()
        runs[name].append(run)
        log(f"{tag} round {r + 1}: {name}: {run.wall:.2f} s")
    return runs


def first_write(run: Run) -> float | None:
    for at, event in run.stamped_json():
        if event.get("event") == "phase" and event.get("phase") == "writing":
            return at
    return None


def last_first_write(run: Run) -> float | None:
    """When the last drive began writing: the start-up, then its capacity probe."""
    began: dict[str, float] = {}
    for at, event in run.stamped_json():
        if event.get("event") == "phase" and event.get("phase") == "writing":
            began.setdefault(str(event.get("device")), at)
    return max(began.values()) if began else None


def longest_verify(run: Run) -> float | None:
    began: dict[str, float] = {}
    spans = []
    for at, event in run.stamped_json():
        device = event.get("device")
        if event.get("event") == "phase" and event.get("phase") == "verifying":
            began.setdefault(str(device), at)
        elif event.get("event") == "result" and str(device) in began:
            spans.append(at - began[str(device)])
    return max(spans) if spans else None


def exit_after_last(run: Run) -> float | None:
    results = [at for at, e in run.stamped_json() if e.get("event") == "result"]
    return run.wall - max(results) if results else None


def med(runs: list[Run], f: Callable[[Run], float | None]) -> float | None:
    values = [v for v in map(f, runs) if v is not None]
    return median(values) if values else None


def part_a(bench: Bench, codes: list[Code], sizes: list[int], rounds: dict[int, int],
           tmp: Path) -> str:
    devices = [bench.loop(tmp / f"a{i}", max(sizes)) for i in range(4)]
    cg = bench.cgroup("a")
    for dev in devices:
        throttle_rw(cg, dev, WRITE_A, READ_A)
    columns: dict[str, dict[int, str]] = {}
    details = []
    for size in sizes:
        image = tmp / f"image-{size // MiB}"
        random_file(image, size)
        limit = size / WRITE_A + size / READ_A
        methods = methods_for(bench, codes, image, devices, cg, slow=size <= 256 * MiB)
        runs = rounds_of(bench, dict.fromkeys(methods, rounds[size]), methods,
                         f"(a) {size // MiB} MiB", devices)
        for name, rs in runs.items():
            columns.setdefault(name, {})[size] = f"{median(r.wall for r in rs) / limit:.3f}x"
            details.append([name, f"{size // MiB} MiB", len(rs), median(r.wall for r in rs),
                            limit, med(rs, first_write), med(rs, exit_after_last),
                            med(rs, lambda r: r.time_v_rss_mib()) if "popsicle" in name
                            else None])
        image.unlink()
    heads = ["method", *(f"{s // MiB} MiB" if s < 1 << 30 else f"{s >> 30} GiB" for s in sizes)]
    rows = [[name, *(cells.get(s, "-") for s in sizes)] for name, cells in columns.items()]
    return (f"(a) 4 drives at {WRITE_A // MB} MB/s write, {READ_A // MB} MB/s read; median wall "
            "/ physical limit (size / write rate + size / read rate)\n" + table(heads, rows)
            + "\n\n" + table(["method", "image", "runs", "wall s", "limit s", "first write s",
                              "exit after last result s", "peak RSS MiB"], details))


def part_b(bench: Bench, codes: list[Code], size: int, rounds: int, tmp: Path,
           scale: tuple[int, ...] = SCALE) -> str:
    image = tmp / "image-scale"
    random_file(image, size)
    devices = [bench.loop(tmp / f"b{i}", size) for i in range(max(scale))]
    # Unthrottled and untimed: the loop devices' tmpfs pages are allocated here, not in the
    # first round (32 drives' first run took 17.8 s against 7.1 s for the next ones).
    bench.run(cli_argv(image, devices, "--no-probe", "--no-verify"), code=codes[0])
    limit = size / WRITE_B + size / READ_B
    rows = []
    for n in scale:
        cg = bench.cgroup(f"b{n}")
        for dev in devices[:n]:
            throttle_rw(cg, dev, WRITE_B, READ_B)
        methods = methods_for(bench, codes, image, devices[:n], cg, slow=False)
        # Every fixed cost but the capacity probe's: the floor the probe adds to.
        methods[f"popsicle-py --no-probe ({codes[0].label})"] = cli_method(
            bench, codes[0], image, devices[:n], cg, "--no-probe")
        runs = rounds_of(bench, dict.fromkeys(methods, rounds), methods, f"(b) {n} drives",
                         devices[:n])
        for name, rs in runs.items():
            mine = "popsicle" in name
            rows.append([n, name, f"{median(r.wall for r in rs) / limit:.3f}x",
                         med(rs, first_write) if mine else None,
                         med(rs, last_first_write) if mine else None,
                         med(rs, longest_verify) if mine else None,
                         med(rs, exit_after_last) if mine else None,
                         med(rs, lambda r: r.time_v_rss_mib()) if mine else None,
                         median(r.cpu for r in rs)])
    return (f"(b) scale: {size // MiB} MiB image, {WRITE_B // MB} MB/s write, {READ_B // MB} "
            f"MB/s read each, {rounds} rounds, medians; limit {limit:.2f} s\n"
            + table(["drives", "method", "wall / limit", "first write s",
                     "last drive's first write s", "longest verify s",
                     "exit after last result s", "peak RSS MiB", "CPU s"], rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser, old_rounds=3)
    parser.add_argument("--parts", default="ab", help="a (peers), b (scale) or ab")
    parser.add_argument("--drives", default=",".join(map(str, SCALE)),
                        help="part b's drive counts (default %(default)s)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    sizes = [64 * MiB] if args.quick else [256 * MiB, 1 << 30]
    per_size = {s: rounds if s < 1 << 30 else min(rounds, 2) for s in sizes}
    with Bench() as bench:
        codes = codes_of(bench, args.old)
        before = versions(codes)
        out = []
        tmp = bench.tempdir("/dev/shm")
        if "a" in args.parts:
            out.append(part_a(bench, codes, sizes, per_size, tmp))
        if "b" in args.parts:
            scale = tuple(int(n) for n in args.drives.split(","))
            out.append(part_b(bench, codes, 32 * MiB if args.quick else 128 * MiB, rounds, tmp,
                              scale))
        lines, same = version_report(before, versions(codes))
        print("\n".join(lines) + "\n\n" + "\n\n".join(out))
    return 0 if same else 1


if __name__ == "__main__":
    run_main(main)
