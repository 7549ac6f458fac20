"""Benchmark of laggards (issue 9): does one slow drive hold back the fast ones?

Run as root from anywhere:  python bench/bench_laggards.py [--quick] [--rounds N] [--cli]

Four loop devices over files on /dev/shm, throttled by one blkio cgroup that holds only the
measured process: three at 48 MB/s and one at 8 MB/s.  A 192 MiB random image on the root disk
(/var/tmp), so that reading it cold really reads the disk.  In every round, in rotating order:

- solo: ``dd bs=16M oflag=direct`` to each drive alone, one after another (source warm in the
  page cache, so dd's time is the drive's own time);
- the engine runner (``bench/bench_engine.py --run-engine``) writing all four, with laggards
  enabled (the default) and disabled (``.laggards(False)``), each after ``drop_caches``.
  A drive's completion time runs from the start of ``write()`` to its ``Completed`` message
  (as the CLI's "elapsed" does; the time from the runner's spawn, Python start-up included,
  is shown too); the runner's ``/proc/self/io`` read_bytes around ``write()`` is the source
  read from disk;
- with ``--cli``, also ``popsicle-py flash --json --yes --no-verify`` (``"elapsed"`` of each
  result event, which counts from the start of the job, so without Python start-up).

Targets: each fast drive <= 1.15 x its solo time, the slow one <= 1.10 x, read_bytes <= 1.05 x
the image size (with laggards enabled).  Figures are medians over the rounds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _benchlib import (
    MB,
    Bench,
    MiB,
    Run,
    caches_dropped,
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
    warm,
)

HERE = Path(__file__).resolve()
ENGINE = HERE.parent / "bench_engine.py"
RATES = [48 * MB, 48 * MB, 48 * MB, 8 * MB]
TARGET_FAST, TARGET_SLOW, TARGET_READ = 1.15, 1.10, 1.05


def main() -> int:
    mode = runner_main(sys.argv[1:])
    if mode is not None:
        return mode
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a 96 MiB image and one round (for development)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument("--cli", action="store_true",
                        help="also time popsicle-py flash --json (adds a run per round)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    size = (96 if args.quick else 192) * MiB

    version = code_version()
    with Bench() as bench:
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

        def solo() -> list[float]:
            warm(image)
            times = []
            for dev in devices:
                run = bench.run(dd_argv(image, dev), cgroup=cg)
                times.append(run.wall)
            return times

        def engine(*extra: str) -> tuple[list[float], int, Run]:
            drop_caches()
            drops = caches_dropped()
            run = bench.run([sys.executable, str(ENGINE), "--run-engine", *extra, str(image),
                             *devices], cgroup=cg)
            info = run.json_lines()[-1]
            # Someone else dropping the page cache mid-run sends a laggard's reads to disk.
            info["disturbed"] = caches_dropped() != drops
            times = [t - info["start"] for t in info["completed"]]
            info["from_spawn"] = [t - run.started for t in info["completed"]]
            run.extra = info
            return times, info["read_bytes"], run

        def cli() -> tuple[list[float], int, Run]:
            drop_caches()
            run = bench.run([sys.executable, "-m", "popsicle_py", "flash", str(image), *devices,
                             "--yes", "--json", "--no-verify"], cgroup=cg)
            results = {e["device"]: e for e in run.json_lines() if e.get("event") == "result"}
            bad = [d for d in devices if results.get(d, {}).get("status") != "ok"]
            if bad:
                raise RuntimeError(f"popsicle-py flash failed on {bad}: {run.stdout[-2000:]}")
            return [results[d]["elapsed"] for d in devices], -1, run

        configs: dict[str, Any] = {
            "solo": solo,
            "laggards on": lambda: engine(),
            "laggards off": lambda: engine("--no-laggards"),
        }
        if args.cli:
            configs["CLI"] = cli
        times: dict[str, list[list[float]]] = {name: [] for name in configs}
        spawned: dict[str, list[list[float]]] = {name: [] for name in configs}
        reads: dict[str, list[int]] = {name: [] for name in configs if name != "solo"}
        solos: dict[str, list[int]] = {name: [] for name in configs if name != "solo"}
        disturbed: dict[str, list[bool]] = {name: [] for name in configs if name != "solo"}
        names = list(configs)
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                if name == "solo":
                    t = configs[name]()
                else:
                    t, read_bytes, run = configs[name]()
                    reads[name].append(read_bytes)
                    solos[name].append(sum(run.extra.get("solo", [])))
                    disturbed[name].append(bool(run.extra.get("disturbed")))
                    spawned[name].append(run.extra.get("from_spawn", t))
                times[name].append(t)
                log(f"  round {r + 1}/{rounds}: {name}: " + " ".join(f"{x:.2f}" for x in t)
                    + (" (from spawn: " + " ".join(f"{x:.2f}" for x in spawned[name][-1])
                       + ")" if name.startswith("laggards") else ""))

    med = {name: [median(run[i] for run in ts) for i in range(len(devices))]
           for name, ts in times.items()}
    spawn_med = {name: [median(run[i] for run in ts) for i in range(len(devices))]
                 for name, ts in spawned.items() if ts and name.startswith("laggards")}
    headers = ["drive", "throttle", "solo dd s"]
    engines = [n for n in names if n != "solo"]
    for n in engines:
        headers += [f"{n} s", "x solo"]
    headers += ["laggards on, from spawn s", "x solo"]
    rows = []
    verdicts = []
    for i, dev in enumerate(devices):
        limit = TARGET_SLOW if RATES[i] == min(RATES) else TARGET_FAST
        row: list[object] = [dev, f"{RATES[i] // MB} MB/s", med["solo"][i]]
        for n in engines:
            ratio = med[n][i] / med["solo"][i]
            row += [med[n][i], f"{ratio:.3f}"]
            if n == "laggards on":
                verdicts.append((f"{dev} ({RATES[i] // MB} MB/s) <= {limit:.2f} x solo",
                                 ratio, ratio <= limit))
        spawn = spawn_med["laggards on"][i]
        row += [spawn, f"{spawn / med['solo'][i]:.3f}"]
        rows.append(row)
    read_rows = []
    for n in engines:
        if n == "CLI":
            continue
        ratio = median(reads[n]) / size
        read_rows.append([n, f"{median(reads[n]) / MiB:.1f}",
                          " ".join(f"{x / MiB:.1f}" for x in reads[n]), f"{ratio:.3f}",
                          " ".join(str(x) for x in solos[n]),
                          " ".join("yes" if x else "no" for x in disturbed[n])])
        if n == "laggards on":
            verdicts.append((f"source read from disk <= {TARGET_READ:.2f} x image", ratio,
                             ratio <= TARGET_READ))

    lines, same = version_report(version, code_version())
    print("\n".join(lines))
    if not same:
        verdicts.append(("the engine's code unchanged throughout", 0.0, False))
    print()
    print(f"laggards: {size // MiB} MiB random image on /var/tmp, 4 loop devices "
          f"({', '.join(f'{r // MB}' for r in RATES)} MB/s), {rounds} rounds, medians; "
          "engine times from the start of write() to each drive's Completed (last column: "
          "from the runner's spawn, Python start-up included)"
          + ("; CLI times are its \"elapsed\" (from the job's start)" if args.cli else ""))
    print(table(headers, rows))
    print()
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
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; loop devices, cgroups and files were removed", file=sys.stderr)
        sys.exit(130)
