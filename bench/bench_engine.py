"""Benchmark of the broadcast engine (issue 2): realistic drives, raw overhead, memory.

Run as root from anywhere:  python bench/bench_engine.py [--quick] [--rounds N]

(a) Realistic drives: 4 loop devices over files on /dev/shm, each throttled to 50 MB/s by a
    blkio cgroup that holds only the benchmarked process; a 256 MiB random image.  The engine
    writing all 4 (O_DIRECT) against ``dd bs=16M oflag=direct`` to one drive alone and to all 4
    one after another.  Target: engine <= 1.10 x dd to one drive.
(b) Raw overhead: the same loop devices unthrottled, a 1 GiB random image.  The engine against
    4 sequential dd, ``tee`` to 4 (then fsync of each device), and a naive single-threaded
    Python loop; the engine with laggards disabled is shown too (drives of equal speed should
    never leave the ring).  Target: wall no worse than the best of them, CPU <= 1.2 x 4
    sequential dd.
(c) Memory: peak RSS (``/usr/bin/time -v``) of the engine runner with default buckets
    (4 x 16 MiB), for the 256 MiB image and a 4 GiB sparse file, each written to 4 ``/dev/null``
    sinks (so that only the source size differs; 4 x 4 GiB of loop devices on tmpfs would need
    16 GiB of RAM); plus the 256 MiB image to the real O_DIRECT loop devices.
    Target: <= 160 MiB, and the same for both sizes.

Methods alternate within each round (the order rotates every round); figures are medians of
3 rounds (5 for part b, the noisiest).
Wall time is from spawn to exit of the measured process (Python start-up included for the
engine); CPU is that process's user+sys time from ``os.wait4``.  Images live on /dev/shm, so
the source is never read from the root disk (issue 9's benchmark measures cold reads); caches
are dropped before every run so that one method's page cache does not burden the next.

Runner modes (used by the benchmark itself, inside the cgroup):
    python bench/bench_engine.py --run-engine [--no-laggards] IMG DEV...
    python bench/bench_engine.py --run-naive IMG DEV...
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _benchlib import (
    MB,
    Bench,
    GiB,
    MiB,
    Run,
    code_version,
    dd_argv,
    drop_caches,
    log,
    median,
    random_file,
    runner_main,
    table,
    throttle,
    version_report,
)

HERE = Path(__file__).resolve()
DRIVES = 4
THROTTLE = 50 * MB


def engine_argv(image: Path, devices: list[str], *extra: str) -> list[str]:
    return [sys.executable, str(HERE), "--run-engine", *extra, str(image), *devices]


def rounds_of(bench: Bench, rounds: int, methods: dict[str, Callable[[], Run]],
              label: str) -> dict[str, list[Run]]:
    """Run every method once per round, rotating the order; caches dropped before each run."""
    names = list(methods)
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            drop_caches()
            run = methods[name]()
            runs[name].append(run)
            log(f"  {label} round {r + 1}/{rounds}: {name}: {run.wall:.2f} s wall, "
                f"{run.cpu:.2f} s CPU, {run.rss_mib:.0f} MiB")
    return runs


def summary_rows(runs: dict[str, list[Run]], reference: str,
                 ratio_of: str = "wall") -> list[list[object]]:
    ref = median(getattr(x, ratio_of) for x in runs[reference])
    rows: list[list[object]] = []
    for name, rs in runs.items():
        walls = [x.wall for x in rs]
        value = median(getattr(x, ratio_of) for x in rs)
        rows.append([name, median(walls), median(x.cpu for x in rs),
                     median(x.rss_mib for x in rs), f"{value / ref:.3f}",
                     " ".join(f"{w:.2f}" for w in walls)])
    return rows


HEADERS = ["method", "wall s", "CPU s", "peak RSS MiB", "ratio", "wall of each run"]


def part_a(bench: Bench, image: Path, devices: list[str], rounds: int) -> tuple[str, bool]:
    cg = bench.cgroup("a")
    for dev in devices:
        throttle(cg, dev, THROTTLE)
    seq = "; ".join(" ".join(dd_argv(image, d)) + " || exit 1" for d in devices)
    methods = {
        "engine -> 4 drives": lambda: bench.run(engine_argv(image, devices), cgroup=cg),
        "dd -> 1 drive": lambda: bench.run(dd_argv(image, devices[0]), cgroup=cg),
        "dd -> 4 drives, one after another": lambda: bench.run(["sh", "-c", seq], cgroup=cg),
    }
    runs = rounds_of(bench, rounds, methods, "(a)")
    ratio = median(x.wall for x in runs["engine -> 4 drives"]) / median(
        x.wall for x in runs["dd -> 1 drive"])
    ok = ratio <= 1.10
    inner = median(x.json_lines()[-1]["end"] - x.json_lines()[-1]["start"]
                   for x in runs["engine -> 4 drives"]) / median(
        x.wall for x in runs["dd -> 1 drive"])
    text = (f"(a) realistic drives: {DRIVES} loop devices at {THROTTLE // MB} MB/s each, "
            f"{image.stat().st_size // MiB} MiB random image, {rounds} rounds, medians; "
            "ratio = wall / wall of dd -> 1 drive\n"
            + table(HEADERS, summary_rows(runs, "dd -> 1 drive")) + "\n" + engine_notes(runs)
            + f"\ntarget engine <= 1.10 x dd -> 1 drive: {ratio:.3f} x -> "
            + ("MET" if ok else "NOT MET")
            + f"\n  (the engine's write() alone, without Python start-up: {inner:.3f} x -> "
            + ("MET" if inner <= 1.10 else "NOT MET") + ")")
    return text, ok


def _med(pairs: list[tuple[Run, dict[str, Any]]], key: Any) -> float:
    return median(key(run, info) for run, info in pairs)


def engine_notes(runs: dict[str, list[Run]]) -> str:
    """Where the engine runner's wall time went, and how many drives left the ring."""
    lines = []
    for name, rs in runs.items():
        if not name.startswith("engine"):
            continue
        p = [(x, x.json_lines()[-1]) for x in rs]
        lines.append(
            f"{name}: interpreter start-up {_med(p, lambda x, i: i['entry'] - x.started):.2f} s,"
            f" imports and opening {_med(p, lambda x, i: i['start'] - i['entry']):.2f} s, "
            f"write() {_med(p, lambda x, i: i['end'] - i['start']):.2f} s wall "
            f"({_med(p, lambda x, i: i['write_cpu']):.2f} s CPU), exit "
            f"{_med(p, lambda x, i: x.started + x.wall - i['end']):.2f} s (medians); "
            f"drives that left the ring as laggards, per run: {[sum(i['solo']) for _, i in p]}")
    return "\n".join(lines)


def part_b(bench: Bench, image: Path, devices: list[str], rounds: int) -> tuple[str, bool]:
    seq = "; ".join(" ".join(dd_argv(image, d)) + " || exit 1" for d in devices)
    tee = (f"tee {' '.join(devices[:-1])} < {image} > {devices[-1]} && "
           f"sync {' '.join(devices)}")
    engine, no_lag, dd4 = ("engine -> 4 drives", "engine -> 4 drives, laggards off",
                           "dd -> 4 drives, one after another")
    methods = {
        engine: lambda: bench.run(engine_argv(image, devices)),
        no_lag: lambda: bench.run(engine_argv(image, devices, "--no-laggards")),
        dd4: lambda: bench.run(["sh", "-c", seq]),
        "tee -> 4 drives (+ fsync)": lambda: bench.run(["sh", "-c", tee]),
        "naive Python loop -> 4 drives": lambda: bench.run(
            [sys.executable, str(HERE), "--run-naive", str(image), *devices]),
    }
    runs = rounds_of(bench, rounds, methods, "(b)")
    wall = median(x.wall for x in runs[engine])
    best_name, best = min(((n, median(x.wall for x in rs)) for n, rs in runs.items()
                           if not n.startswith("engine")), key=lambda t: t[1])
    cpu = median(x.cpu for x in runs[engine])
    dd_cpu = median(x.cpu for x in runs[dd4])
    wall_ok = wall <= best
    cpu_ok = cpu <= 1.2 * dd_cpu
    rows = summary_rows(runs, dd4)
    for row, rs in zip(rows, runs.values(), strict=True):
        row.insert(5, f"{median(x.cpu for x in rs) / dd_cpu:.3f}")
    headers = [*HEADERS[:4], "wall ratio", "CPU ratio", HEADERS[5]]
    text = (f"(b) raw overhead: {DRIVES} loop devices, no throttle, "
            f"{image.stat().st_size // MiB} MiB random image, {rounds} rounds, medians; "
            f"ratios against {dd4}\n"
            + table(headers, rows) + "\n" + engine_notes(runs)
            + f"\ntarget engine wall <= best other ({best_name}, {best:.2f} s): "
            + f"{wall:.2f} s -> " + ("MET" if wall_ok else "NOT MET")
            + f"\ntarget engine CPU <= 1.2 x 4 sequential dd ({dd_cpu:.2f} s): {cpu:.2f} s = "
            + f"{cpu / dd_cpu:.2f} x -> " + ("MET" if cpu_ok else "NOT MET"))
    return text, wall_ok and cpu_ok


def max_rss_time_v(run: Run) -> float:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
    if not m:
        raise RuntimeError(f"no peak RSS in /usr/bin/time output: {run.stderr[-500:]}")
    return int(m.group(1)) / 1024


def part_c(bench: Bench, image: Path, sparse: Path, devices: list[str],
           rounds: int) -> tuple[str, bool]:
    sinks = ["/dev/null"] * DRIVES
    timed = ["/usr/bin/time", "-v"]
    cases = {
        f"{image.stat().st_size // MiB} MiB random -> 4 x /dev/null":
            lambda: bench.run([*timed, *engine_argv(image, sinks)]),
        f"{sparse.stat().st_size // GiB} GiB sparse -> 4 x /dev/null":
            lambda: bench.run([*timed, *engine_argv(sparse, sinks)]),
        f"{image.stat().st_size // MiB} MiB random -> 4 loop devices (O_DIRECT)":
            lambda: bench.run([*timed, *engine_argv(image, devices)]),
    }
    runs = rounds_of(bench, rounds, cases, "(c)")
    rows = []
    rss_max = {}
    rss_med = {}
    for name, rs in runs.items():
        values = [max_rss_time_v(x) for x in rs]
        rss_max[name] = max(values)
        rss_med[name] = median(values)
        solo = [sum(x.json_lines()[-1]["solo"]) for x in rs]
        rows.append([name, median(x.wall for x in rs), median(x.cpu for x in rs),
                     rss_med[name], rss_max[name], " ".join(f"{v:.1f}" for v in values),
                     " ".join(str(n) for n in solo)])
    small, big = list(rss_med.values())[:2]
    ok_limit = all(v <= 160 for v in rss_max.values())
    ok_same = abs(big - small) <= 0.05 * small
    text = ("(c) memory: engine runner, default buckets (4 x 16 MiB), peak RSS from "
            f"/usr/bin/time -v, {rounds} rounds\n"
            + table(["source -> sinks", "wall s", "CPU s", "peak RSS MiB (median)",
                     "peak RSS MiB (max)", "each run", "laggards per run"], rows)
            + "\n(a drive that leaves the ring as a laggard keeps the bucket it is writing from "
            "until that write returns, the ring takes a fresh 16 MiB one, and the laggard gets "
            "its own 4 MiB buffer: peaks above the others come with laggards)"
            + f"\ntarget peak RSS <= 160 MiB: max {max(rss_max.values()):.1f} MiB -> "
            + ("MET" if ok_limit else "NOT MET")
            + "\ntarget same for the sparse source as for the small one (medians within 5 %): "
            + f"{big:.1f} vs {small:.1f} MiB -> " + ("MET" if ok_same else "NOT MET"))
    return text, ok_limit and ok_same


def main() -> int:
    mode = runner_main(sys.argv[1:])
    if mode is not None:
        return mode
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small images and one round (for development)")
    parser.add_argument("--rounds", type=int,
                        help="rounds per part (default 3, 5 for part b; quick 1)")
    parser.add_argument("--parts", default="abc", help="which parts to run (default abc)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    rounds_b = args.rounds or (1 if args.quick else 5)  # the noisiest part; tee is slow
    size_a = (64 if args.quick else 256) * MiB
    size_b = (256 if args.quick else 1024) * MiB
    size_c = (1 if args.quick else 4) * GiB
    outputs = []
    verdicts = []
    version = code_version()
    with Bench() as bench:
        shm = bench.tempdir("/dev/shm")
        log(f"creating images in {shm} and {DRIVES} loop devices")
        img_a, img_b, sparse = shm / "a.img", shm / "b.img", shm / "sparse.img"
        random_file(img_a, size_a)
        if "b" in args.parts:
            random_file(img_b, size_b)
        with open(sparse, "wb") as f:
            f.truncate(size_c)
        devices = [bench.loop(shm / f"drive{i}.img", max(size_a, size_b))
                   for i in range(DRIVES)]
        log(f"loop devices: {' '.join(devices)}; one untimed write to each to warm them up")
        warm_image = img_b if "b" in args.parts else img_a
        for dev in devices:
            bench.run(dd_argv(warm_image, dev))
        if "a" in args.parts:
            text, ok = part_a(bench, img_a, devices, rounds)
            outputs.append(text)
            verdicts.append(ok)
        if "b" in args.parts:
            text, ok = part_b(bench, img_b, devices, rounds_b)
            outputs.append(text)
            verdicts.append(ok)
        if "c" in args.parts:
            text, ok = part_c(bench, img_a, sparse, devices, rounds)
            outputs.append(text)
            verdicts.append(ok)
    lines, same = version_report(version, code_version())
    print("\n".join(lines))
    print()
    print("\n\n".join(outputs))
    return 0 if all(verdicts) and same else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; loop devices, cgroups and files were removed", file=sys.stderr)
        sys.exit(130)
