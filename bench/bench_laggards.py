"""Benchmark of laggards (issues 9, 13, 16): does one slow drive hold back the fast ones?

Run as root from anywhere:  python bench/bench_laggards.py [--quick] [--rounds N] [--old REV]

Four loop devices over files on /dev/shm, throttled by one blkio cgroup that holds only the
measured process: three at 48 MB/s and one at 8 MB/s.  A 192 MiB random image on the root disk
(/var/tmp), so that reading it cold really reads the disk.  Methods take turns, in rotating order:

- solo: ``dd bs=16M oflag=direct`` to each drive alone (source warm in the page cache, so dd's
  time is the drive's own time).  The slow drive's dd runs beside the fast drives' ones, which
  run one after another: each drive has its own throttle and dd needs next to no CPU;
- the CLI as a user runs it: ``python -m popsicle_py flash IMG DEV... --yes --json
  --no-verify`` after ``drop_caches``: each drive's ``"elapsed"`` (from the job's start), and
  when its ``result`` line reached us (from the spawn, Python start-up included);
- the engine runner (``bench/bench_engine.py --run-engine``), after ``drop_caches``: from the
  start of ``write()`` to each ``Completed``, and from the spawn; its ``/proc/self/io``
  read_bytes around ``write()`` is the source read from disk;
- once: the runner with laggards off (``.laggards(False)``), the lock-step figure.

With ``--old DIR-or-REV`` the CLI and the runner of that code take turns with this one's (in
``--old-rounds`` rounds, default 2, to keep the run short).

Targets (this code, CLI and runner): each fast drive <= 1.15 x its solo time, the slow one <=
1.10 x, read_bytes <= 1.05 x the image size.  Figures are medians over the rounds.
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
    MiB,
    add_run_options,
    caches_dropped,
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
    schedule,
    table,
    throttle,
    version_report,
    versions,
    warm,
)

HERE = Path(__file__).resolve()
ENGINE = HERE.parent / "bench_engine.py"
RATES = [48 * MB, 48 * MB, 48 * MB, 8 * MB]
TARGET_FAST, TARGET_SLOW, TARGET_READ = 1.15, 1.10, 1.05
LOCK_STEP = "engine runner, laggards off, new"


def main() -> int:
    mode = runner_main(sys.argv[1:])
    if mode is not None:
        return mode
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, old_rounds=2)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    size = (96 if args.quick else 192) * MiB

    with Bench() as bench:
        codes = codes_of(bench, args.old)
        version = versions(codes)
        disk = bench.tempdir("/var/tmp")
        shm = bench.tempdir("/dev/shm")
        image = disk / "image.img"
        log(f"creating a {size // MiB} MiB image in {disk} and 4 loop devices")
        random_file(image, size)
        devices = [bench.loop(shm / f"drive{i}.img", size) for i in range(len(RATES))]
        for dev in devices:  # untimed and unthrottled: the backing files are written once
            bench.run(dd_argv(image, dev))
        cg = bench.cgroup("laggards")
        for dev, rate in zip(devices, RATES, strict=True):
            throttle(cg, dev, rate)
        log("drives: " + ", ".join(f"{d} {r // MB} MB/s" for d, r in
                                   zip(devices, RATES, strict=True)))
        slow = RATES.index(min(RATES))

        def solo() -> dict[str, Any]:
            warm(image)
            times = [0.0] * len(devices)
            beside = bench.start(dd_argv(image, devices[slow]), cgroup=cg)
            for i, dev in enumerate(devices):
                if i != slow:
                    times[i] = bench.run(dd_argv(image, dev), cgroup=cg).wall
            times[slow] = bench.finish(beside).wall
            return {"times": times}

        def engine(code: Any, *extra: str) -> dict[str, Any]:
            drop_caches()
            drops = caches_dropped()
            run = bench.run([sys.executable, str(ENGINE), "--run-engine", *extra, str(image),
                             *devices], cgroup=cg, code=code)
            info = run.json_lines()[-1]
            return {"times": [t - info["start"] for t in info["completed"]],
                    "spawn": [t - run.started for t in info["completed"]],
                    "read": info["read_bytes"], "solo": sum(info["solo"]),
                    # Someone else dropping the page cache sends a laggard's reads to disk.
                    "disturbed": caches_dropped() != drops, "wall": run.wall}

        def cli(code: Any) -> dict[str, Any]:
            drop_caches()
            run = bench.run(cli_argv(image, devices, "--no-verify"), cgroup=cg, code=code)
            results = cli_results(run, devices)
            return {"times": [results[d]["elapsed"] for d in devices],
                    "spawn": [results[d]["seen"] for d in devices], "wall": run.wall,
                    "rss": run.time_v_rss_mib()}

        configs: dict[str, Callable[[], dict[str, Any]]] = {"solo dd": solo}
        counts = {"solo dd": rounds}
        for code in codes:
            n = rounds if code is NEW else min(rounds, args.old_rounds)
            configs[f"CLI, {code.label}"] = partial(cli, code)
            configs[f"engine runner, {code.label}"] = partial(engine, code)
            counts[f"CLI, {code.label}"] = counts[f"engine runner, {code.label}"] = n
        configs[LOCK_STEP] = lambda: engine(NEW, "--no-laggards")
        counts[LOCK_STEP] = 1
        got: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        for r, name in schedule(counts):
            info = configs[name]()
            got[name].append(info)
            log(f"  round {r + 1}/{rounds}: {name}: " + " ".join(f"{x:.2f}" for x in info["times"])
                + (" (from spawn: " + " ".join(f"{x:.2f}" for x in info["spawn"]) + ")"
                   if "spawn" in info else ""))
        lines, same = version_report(version, versions(codes))

    def med(name: str, key: str = "times") -> list[float]:
        return [median(run[key][i] for run in got[name]) for i in range(len(devices))]

    solo_t = med("solo dd")
    verdicts = []

    def columns(names: list[str], key: str) -> tuple[list[str], list[list[object]]]:
        headers = ["drive", "throttle", "solo dd s"]
        for n in names:
            headers += [f"{n} s", "x solo"]
        rows = []
        for i, dev in enumerate(devices):
            row: list[object] = [dev, f"{RATES[i] // MB} MB/s", solo_t[i]]
            for n in names:
                value = med(n, key)[i]
                row += [value, f"{value / solo_t[i]:.3f}"]
            rows.append(row)
        return headers, rows

    def check(name: str) -> None:
        for i, dev in enumerate(devices):
            limit = TARGET_SLOW if i == slow else TARGET_FAST
            ratio = med(name)[i] / solo_t[i]
            verdicts.append((f"{name}: {dev} ({RATES[i] // MB} MB/s) <= {limit:.2f} x solo",
                             ratio, ratio <= limit))

    cli_names = [f"CLI, {c.label}" for c in codes]
    engine_names = [f"engine runner, {c.label}" for c in codes]
    check(f"CLI, {NEW.label}")
    check(f"engine runner, {NEW.label}")
    print("\n".join(lines))
    if not same:
        verdicts.append(("the measured code unchanged throughout", 0.0, False))
    print()
    runs_of = ", ".join(f"{n}: {len(got[n])}" for n in configs)
    print(f"laggards: {size // MiB} MiB random image on /var/tmp, 4 loop devices "
          f"({', '.join(f'{r // MB}' for r in RATES)} MB/s), medians (runs: {runs_of})")
    print()
    print("CLI (`python -m popsicle_py flash IMG DEV... --yes --json --no-verify`, page cache "
          "dropped first): each drive's \"elapsed\" from its result event (from the job's start)")
    print(table(*columns(cli_names, "times")))
    print()
    print("CLI, when each drive's result line arrived, from the spawn (Python start-up "
          "included); whole process, spawn to exit: "
          + ", ".join(f"{n} {median(x['wall'] for x in got[n]):.2f} s" for n in cli_names)
          + "; peak RSS (/usr/bin/time -v): "
          + ", ".join(f"{n} {median(x['rss'] for x in got[n]):.1f} MiB" for n in cli_names))
    print(table(*columns(cli_names, "spawn")))
    print()
    print("engine runner: from the start of write() to each drive's Completed; the lock-step "
          "column is the runner with laggards off")
    print(table(*columns([*engine_names, LOCK_STEP], "times")))
    print()
    print("engine runner, from its spawn (Python start-up included)")
    print(table(*columns(engine_names, "spawn")))
    print()
    read_rows = []
    for n in [*engine_names, LOCK_STEP]:
        reads = [x["read"] for x in got[n]]
        ratio = median(reads) / size
        read_rows.append([n, f"{median(reads) / MiB:.1f}",
                          " ".join(f"{x / MiB:.1f}" for x in reads), f"{ratio:.3f}",
                          " ".join(str(x["solo"]) for x in got[n]),
                          " ".join("yes" if x["disturbed"] else "no" for x in got[n])])
        if n == f"engine runner, {NEW.label}":
            verdicts.append((f"{n}: source read from disk <= {TARGET_READ:.2f} x image",
                             ratio, ratio <= TARGET_READ))
    print(f"source read from disk (runner's /proc/self/io read_bytes, cold cache), image "
          f"{size / MiB:.1f} MiB")
    print(table(["engine", "read MiB (median)", "each run", "x image",
                 "drives that left the ring, per run",
                 "page cache dropped by someone else mid-run"], read_rows))
    print()
    for text, ratio, ok in verdicts:
        print(f"target {text}: {ratio:.3f} -> {'MET' if ok else 'NOT MET'}")
    return 0 if all(ok for _, _, ok in verdicts) else 1


if __name__ == "__main__":
    run_main(main)
