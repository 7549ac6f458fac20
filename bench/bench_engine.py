"""Benchmark of the broadcast engine and the CLI (issues 2, 13, 16): drives, overhead, memory.

Run as root from anywhere:  python bench/bench_engine.py [--quick] [--rounds N] [--old REV]

Every figure is measured twice: for the CLI as a user runs it (``python -m popsicle_py flash
IMG DEV... --yes --json`` under ``/usr/bin/time -v``, a whole process from spawn to exit), and
for the engine runner (``--run-engine``: the engine alone, in a small child process).  With
``--old DIR-or-REV`` the same is also measured for another checkout, taking turns with this one.

(a) Realistic drives: 4 loop devices over files on /dev/shm, each throttled to 50 MB/s by a
    blkio cgroup that holds only the benchmarked process; a 256 MiB random image.  The CLI
    (with ``--no-verify`` and with verification) and the runner writing all 4 (O_DIRECT) against
    ``dd bs=16M oflag=direct`` to one drive alone (and, once, to all 4 one after another).
    Target: CLI --no-verify and runner <= 1.10 x dd to one drive.
(b) Raw overhead: the same loop devices unthrottled, a 1 GiB random image.  The runner (also
    with laggards off) and the CLI --no-verify against 4 sequential dd, ``tee`` to 4 (then
    fsync of each device), and a naive single-threaded Python loop.
    Targets: wall no worse than the best of the others, CPU <= 1.2 x 4 sequential dd.
(c) Memory: peak RSS (``/usr/bin/time -v``) with default buckets (4 x 16 MiB) of the CLI
    --no-verify writing the 256 MiB image to the 4 loop devices and a 1 GiB sparse file to 4
    loop devices of 1 GiB on /dev/shm (4 GiB of RAM: two targets on one file are refused); and
    of the runner for the 256 MiB image and a 4 GiB sparse file to 4 ``/dev/null`` sinks, and
    the 256 MiB image to the loop devices.
    Target: <= 160 MiB, and the same for both sizes (medians within 5 %).

Methods alternate within each round (the order rotates every round); figures are medians of
3 rounds (5 for part b, the noisiest).  Wall time is from spawn to reaping (Python start-up
included); CPU is that process's user+sys time from ``os.wait4``, children included.  Images
live on /dev/shm, so the source is never read from the root disk (bench_laggards.py measures
cold reads); caches are dropped before every run so that one method's page cache does not
burden the next.

Runner modes (used by the benchmark itself, inside the cgroup):
    python bench/bench_engine.py --run-engine [--no-laggards] IMG DEV...
    python bench/bench_engine.py --run-naive IMG DEV...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from _benchlib import (
    MB,
    NEW,
    Bench,
    Code,
    GiB,
    MiB,
    Run,
    cli_argv,
    cli_results,
    codes_of,
    dd_argv,
    drop_caches,
    log,
    median,
    random_file,
    run_main,
    runner_main,
    table,
    throttle,
    version_report,
    versions,
)

HERE = Path(__file__).resolve()
DRIVES = 4
THROTTLE = 50 * MB
TARGET_A, TARGET_RSS = 1.10, 160


def engine_argv(image: Path, devices: list[str], *extra: str) -> list[str]:
    return [sys.executable, str(HERE), "--run-engine", *extra, str(image), *devices]


def rounds_of(bench: Bench, rounds: int, methods: dict[str, Callable[[], Run]],
              label: str, once: frozenset[str] = frozenset()) -> dict[str, list[Run]]:
    """Run every method once per round, rotating the order; caches dropped before each run.

    Methods named in ``once`` run in the first round only (slow ones whose figure is no news).
    """
    names = list(methods)
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if r and name in once:
                continue
            drop_caches()
            run = methods[name]()
            runs[name].append(run)
            log(f"  {label} round {r + 1}/{rounds}: {name}: {run.wall:.2f} s wall, "
                f"{run.cpu:.2f} s CPU, {peak_rss(run):.0f} MiB")
    return runs


def peak_rss(run: Run) -> float:
    """/usr/bin/time -v's figure when the command ran under it, else wait4's (the same)."""
    return run.time_v_rss_mib() if run.argv[:1] == ["/usr/bin/time"] else run.rss_mib


def wall(runs: list[Run]) -> float:
    return median(x.wall for x in runs)


def summary_rows(runs: dict[str, list[Run]], reference: str,
                 ratio_of: str = "wall") -> list[list[object]]:
    ref = median(getattr(x, ratio_of) for x in runs[reference])
    rows: list[list[object]] = []
    for name, rs in runs.items():
        walls = [x.wall for x in rs]
        value = median(getattr(x, ratio_of) for x in rs)
        rows.append([name, median(walls), median(x.cpu for x in rs),
                     median(peak_rss(x) for x in rs), f"{value / ref:.3f}",
                     " ".join(f"{w:.2f}" for w in walls)])
    return rows


HEADERS = ["method", "wall s", "CPU s", "peak RSS MiB", "ratio", "wall of each run"]


def verdict(text: str, ok: bool) -> str:
    return f"target {text} -> {'MET' if ok else 'NOT MET'}"


def _med(pairs: list[tuple[Run, dict[str, Any]]], key: Any) -> float:
    return median(key(run, info) for run, info in pairs)


def engine_notes(runs: dict[str, list[Run]]) -> str:
    """Where the runner's and the CLI's wall time went, and how many drives left the ring."""
    lines = []
    for name, rs in runs.items():
        if name.startswith("engine runner"):
            p = [(x, x.json_lines()[-1]) for x in rs]
            lines.append(
                f"{name}: interpreter start-up "
                f"{_med(p, lambda x, i: i['entry'] - x.started):.2f} s, imports and opening "
                f"{_med(p, lambda x, i: i['start'] - i['entry']):.2f} s, write() "
                f"{_med(p, lambda x, i: i['end'] - i['start']):.2f} s wall "
                f"({_med(p, lambda x, i: i['write_cpu']):.2f} s CPU), exit "
                f"{_med(p, lambda x, i: x.started + x.wall - i['end']):.2f} s (medians); "
                f"drives that left the ring as laggards, per run: {[sum(i['solo']) for _, i in p]}")
        elif name.startswith("CLI"):
            # The CLI's "elapsed" counts from the job's start; the first event's arrival and
            # the time after the last result show what the whole process adds around it.
            def last(run: Run) -> tuple[float, float]:
                results = [(at, e) for at, e in run.stamped_json() if e.get("event") == "result"]
                return max(e["elapsed"] for _, e in results), max(at for at, _ in results)

            first = median(x.stamped_json()[0][0] for x in rs)
            elapsed = median(last(x)[0] for x in rs)
            exit_ = median(x.wall - last(x)[1] for x in rs)
            lines.append(f"{name}: first event {first:.2f} s after the spawn, last drive's "
                         f"\"elapsed\" {elapsed:.2f} s, exit {exit_:.2f} s after the last result "
                         "(medians)")
    return "\n".join(lines)


def cli(bench: Bench, code: Code, image: Path, devices: list[str], *flags: str,
        cgroup: Path | None = None) -> Callable[[], Run]:
    def go() -> Run:
        run = bench.run(cli_argv(image, devices, *flags), cgroup=cgroup, code=code)
        cli_results(run, devices)  # every drive ok, or the run means nothing
        return run
    return go


def old_vs_new(runs: dict[str, list[Run]], codes: list[Code], kind: str) -> str:
    """One line per kind of method: the old code's median wall against the new's."""
    if len(codes) < 2:
        return ""
    new, old = (f"{kind}, {codes[0].label}", f"{kind}, {codes[1].label}")
    if new not in runs or old not in runs:
        return ""
    return (f"\n{kind}: new {wall(runs[new]):.2f} s, old {wall(runs[old]):.2f} s, "
            f"new / old {wall(runs[new]) / wall(runs[old]):.3f}")


def part_a(bench: Bench, codes: list[Code], image: Path, devices: list[str],
           rounds: int) -> tuple[str, bool]:
    cg = bench.cgroup("a")
    for dev in devices:
        throttle(cg, dev, THROTTLE)
    seq = "; ".join(" ".join(dd_argv(image, d)) + " || exit 1" for d in devices)
    dd1, dd4 = "dd -> 1 drive", "dd -> 4 drives, one after another"
    methods: dict[str, Callable[[], Run]] = {dd1: lambda: bench.run(dd_argv(image, devices[0]),
                                                                     cgroup=cg)}
    for code in codes:
        methods[f"CLI --no-verify, {code.label}"] = cli(bench, code, image, devices,
                                                          "--no-verify", cgroup=cg)
        methods[f"CLI with verify, {code.label}"] = cli(bench, code, image, devices, cgroup=cg)
        methods[f"engine runner, {code.label}"] = (
            partial(bench.run, engine_argv(image, devices), cgroup=cg, code=code))
    methods[dd4] = lambda: bench.run(["sh", "-c", seq], cgroup=cg)
    runs = rounds_of(bench, rounds, methods, "(a)", once=frozenset({dd4}))
    ref = wall(runs[dd1])
    checks = []
    for name in (f"CLI --no-verify, {NEW.label}", f"engine runner, {NEW.label}"):
        ratio = wall(runs[name]) / ref
        checks.append(verdict(f"{name} <= {TARGET_A:.2f} x {dd1}: {ratio:.3f} x",
                              ratio <= TARGET_A))
    verify = wall(runs[f"CLI with verify, {NEW.label}"]) / ref
    inner = median(x.json_lines()[-1]["end"] - x.json_lines()[-1]["start"]
                   for x in runs[f"engine runner, {NEW.label}"]) / ref
    text = (f"(a) realistic drives: {DRIVES} loop devices at {THROTTLE // MB} MB/s each, "
            f"{image.stat().st_size // MiB} MiB random image, {rounds} rounds ({dd4}: one run), "
            f"medians; ratio = wall / wall of {dd1}\n"
            + table(HEADERS, summary_rows(runs, dd1)) + "\n" + engine_notes(runs)
            + "".join(old_vs_new(runs, codes, k) for k in
                      ("CLI --no-verify", "CLI with verify", "engine runner"))
            + "\n" + "\n".join(checks)
            + f"\n  (no target: the CLI with verify, {verify:.3f} x; the engine's write() alone, "
            f"without Python start-up, {inner:.3f} x)")
    return text, all(c.endswith("-> MET") for c in checks)


def part_b(bench: Bench, codes: list[Code], image: Path, devices: list[str],
           rounds: int) -> tuple[str, bool]:
    seq = "; ".join(" ".join(dd_argv(image, d)) + " || exit 1" for d in devices)
    tee = (f"tee {' '.join(devices[:-1])} < {image} > {devices[-1]} && "
           f"sync {' '.join(devices)}")
    dd4 = "dd -> 4 drives, one after another"
    methods: dict[str, Callable[[], Run]] = {}
    for code in codes:
        methods[f"CLI --no-verify, {code.label}"] = cli(bench, code, image, devices,
                                                          "--no-verify")
        methods[f"engine runner, {code.label}"] = (
            partial(bench.run, engine_argv(image, devices), code=code))
    methods[f"engine runner laggards off, {NEW.label}"] = (
        lambda: bench.run(engine_argv(image, devices, "--no-laggards")))
    methods[dd4] = lambda: bench.run(["sh", "-c", seq])
    methods["tee -> 4 drives (+ fsync)"] = lambda: bench.run(["sh", "-c", tee])
    methods["naive Python loop -> 4 drives"] = lambda: bench.run(
        [sys.executable, str(HERE), "--run-naive", str(image), *devices])
    runs = rounds_of(bench, rounds, methods, "(b)")
    best_name, best = min(((n, wall(rs)) for n, rs in runs.items()
                           if not n.startswith(("engine", "CLI"))), key=lambda t: t[1])
    dd_cpu = median(x.cpu for x in runs[dd4])
    checks = []
    for name in (f"CLI --no-verify, {NEW.label}", f"engine runner, {NEW.label}"):
        w, cpu = wall(runs[name]), median(x.cpu for x in runs[name])
        checks.append(verdict(f"{name} wall <= best other ({best_name}, {best:.2f} s): "
                              f"{w:.2f} s", w <= best))
        checks.append(verdict(f"{name} CPU <= 1.2 x 4 sequential dd ({dd_cpu:.2f} s): "
                              f"{cpu:.2f} s = {cpu / dd_cpu:.2f} x", cpu <= 1.2 * dd_cpu))
    rows = summary_rows(runs, dd4)
    for row, rs in zip(rows, runs.values(), strict=True):
        row.insert(5, f"{median(x.cpu for x in rs) / dd_cpu:.3f}")
    headers = [*HEADERS[:4], "wall ratio", "CPU ratio", HEADERS[5]]
    text = (f"(b) raw overhead: {DRIVES} loop devices, no throttle, "
            f"{image.stat().st_size // MiB} MiB random image, {rounds} rounds, medians; "
            f"ratios against {dd4}\n"
            + table(headers, rows) + "\n" + engine_notes(runs)
            + "".join(old_vs_new(runs, codes, k) for k in ("CLI --no-verify", "engine runner"))
            + "\n" + "\n".join(checks))
    return text, all(c.endswith("-> MET") for c in checks)


def part_c(bench: Bench, codes: list[Code], image: Path, sparse: Path, devices: list[str],
           sparse_cli: Path, big_devices: list[str], rounds: int) -> tuple[str, bool]:
    sinks = ["/dev/null"] * DRIVES
    timed = ["/usr/bin/time", "-v"]
    small_name = f"{image.stat().st_size // MiB} MiB random"
    big_name = f"{sparse.stat().st_size // GiB} GiB sparse"
    big_cli_name = f"{sparse_cli.stat().st_size // MiB} MiB sparse"
    names = {"CLI --no-verify": big_cli_name, "engine runner": big_name}
    cases: dict[str, Callable[[], Run]] = {}
    for code in codes:
        cases[f"CLI --no-verify, {code.label}: {small_name} -> 4 loop devices"] = cli(
            bench, code, image, devices, "--no-verify")
        cases[f"CLI --no-verify, {code.label}: {big_cli_name} -> 4 loop devices"] = cli(
            bench, code, sparse_cli, big_devices, "--no-verify")
        for src, sname in ((image, small_name), (sparse, big_name)):
            cases[f"engine runner, {code.label}: {sname} -> 4 x /dev/null"] = (
                partial(bench.run, [*timed, *engine_argv(src, sinks)], code=code))
        cases[f"engine runner, {code.label}: {small_name} -> 4 loop devices"] = (
            partial(bench.run, [*timed, *engine_argv(image, devices)], code=code))
    runs = rounds_of(bench, rounds, cases, "(c)")
    rows = []
    rss: dict[str, list[float]] = {}
    for name, rs in runs.items():
        values = rss[name] = [peak_rss(x) for x in rs]
        solo = [str(sum(x.json_lines()[-1]["solo"])) if name.startswith("engine") else ""
                for x in rs]
        rows.append([name, wall(rs), median(x.cpu for x in rs), median(values), max(values),
                     " ".join(f"{v:.1f}" for v in values), " ".join(solo)])
    checks = []
    for kind in ("CLI --no-verify", "engine runner"):
        mine = {n: v for n, v in rss.items() if n.startswith(f"{kind}, {NEW.label}:")}
        top = max(max(v) for v in mine.values())
        checks.append(verdict(f"{kind}, {NEW.label}: peak RSS <= {TARGET_RSS} MiB: max "
                              f"{top:.1f} MiB", top <= TARGET_RSS))
        sink = "4 loop devices" if kind == "CLI --no-verify" else "4 x /dev/null"
        small = median(mine[f"{kind}, {NEW.label}: {small_name} -> {sink}"])
        big = median(mine[f"{kind}, {NEW.label}: {names[kind]} -> {sink}"])
        checks.append(verdict(f"{kind}, {NEW.label}: the same for the {names[kind]} source as for "
                              f"the {small_name} one (medians within 5 %): {big:.1f} vs "
                              f"{small:.1f} MiB", abs(big - small) <= 0.05 * small))
    text = ("(c) memory: default buckets (4 x 16 MiB), peak RSS from /usr/bin/time -v, "
            f"{rounds} rounds; the CLI writes the {big_cli_name} source to 4 loop devices of "
            "its size\n"
            + table(["method: source -> sinks", "wall s", "CPU s", "peak RSS MiB (median)",
                     "peak RSS MiB (max)", "each run", "laggards per run"], rows)
            + "\n" + "\n".join(checks))
    return text, all(c.endswith("-> MET") for c in checks)


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
    parser.add_argument("--old", metavar="DIR-or-REV",
                        help="also measure this checkout or git revision, taking turns")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    rounds_b = args.rounds or (1 if args.quick else 5)  # the noisiest part
    size_a = (64 if args.quick else 256) * MiB
    size_b = (256 if args.quick else 1024) * MiB
    size_c = (1 if args.quick else 4) * GiB
    outputs = []
    verdicts = []
    with Bench() as bench:
        codes = codes_of(bench, args.old)
        version = versions(codes)
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
            text, ok = part_a(bench, codes, img_a, devices, rounds)
            outputs.append(text)
            verdicts.append(ok)
        if "b" in args.parts:
            text, ok = part_b(bench, codes, img_b, devices, rounds_b)
            outputs.append(text)
            verdicts.append(ok)
        if "c" in args.parts:
            # The CLI needs block devices for its big source, each on a file of its own (two
            # targets on one file are refused), and 4 x 4 GiB of tmpfs would take 16 GiB of
            # RAM: its big source is 1 GiB, still 16 rings' worth.
            size_cli = min(size_c, GiB)
            sparse_cli = shm / "sparse-cli.img"
            with open(sparse_cli, "wb") as f:
                f.truncate(size_cli)
            big = [bench.loop(shm / f"big{i}.img", size_cli, allocate=False)
                   for i in range(DRIVES)]
            text, ok = part_c(bench, codes, img_a, sparse, devices, sparse_cli, big, rounds)
            outputs.append(text)
            verdicts.append(ok)
        lines, same = version_report(version, versions(codes))
    print("\n".join(lines))
    print()
    print("\n\n".join(outputs))
    return 0 if all(verdicts) and same else 1


if __name__ == "__main__":
    run_main(main)
