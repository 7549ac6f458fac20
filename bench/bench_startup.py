#!/usr/bin/env python3
"""Start-up: how long `popsicle-py --version` and `--help` take, and a flash's first write.

Each command is a whole process from spawn to exit (``python -m popsicle_py ...`` with the
code's bytecode written first, as ``pip install`` leaves it), run ``--rounds`` times taking
turns with the ``--old`` code when given; the table has the median and the fastest run of
each.  Issue 23 asks for a median of at most 0.15 s for both.

Then (issue 30) ``flash IMG DEV... --yes --json`` of an 8 MiB random image to 4 and to 32
loop devices (``--drives``), unthrottled, capacity probe on: the median time from the spawn to
the ``start`` event (imports, plan, checks, drives opened) and to the first ``writing`` phase
(probe included), and from the last ``result`` to the exit.  Issue 30 asks for the first write
at most 0.15 s after the spawn with 4 drives and 0.3 s with 32.  Needs root (loop devices).

    python3 bench/bench_startup.py                 # this checkout
    python3 bench/bench_startup.py --old 0653d18   # and the code before the app layer
    python3 bench/bench_startup.py --drives 4 --rounds 11
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from _benchlib import (
    NEW,
    Bench,
    Code,
    MiB,
    Run,
    add_run_options,
    cli_argv,
    cli_results,
    log,
    old_code,
    random_file,
    run_main,
)

COMMANDS = (("--version",), ("--help",), ("flash", "--help"))
IMAGE = 8 * MiB


def spawn(code: Code, args: tuple[str, ...]) -> float:
    """Seconds from spawn to exit of one ``python -m popsicle_py ARGS``."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "popsicle_py", *args], env=code.env(),
                          cwd=code.root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{code.label}: popsicle-py {' '.join(args)} failed: "
                         f"{done.stderr.decode(errors='replace').strip()}")
    return elapsed


def first_seen(run: Run, kind: str, phase: str | None = None) -> float:
    """Seconds from the spawn to the first ``kind`` event (of ``phase``) on stdout."""
    for at, event in run.stamped_json():
        if event.get("event") == kind and (phase is None or event.get("phase") == phase):
            return at
    raise RuntimeError(f"no {kind} {phase or ''} event: {run.stdout[-1000:]}")


def flash_table(bench: Bench, codes: list[Code], counts: list[int], rounds: int) -> str:
    """Spawn to ``start``, to the first write, and last result to exit, per drive count."""
    tmp = bench.tempdir("/dev/shm")
    image = tmp / "image"
    random_file(image, IMAGE)
    devices = [bench.loop(tmp / f"d{i}", 2 * IMAGE) for i in range(max(counts))]
    rows = []
    for n in counts:
        runs: dict[str, list[Run]] = {c.label: [] for c in codes}
        for round_ in range(rounds):
            for code in codes if round_ % 2 else reversed(codes):
                run = bench.run(cli_argv(image, devices[:n]), code=code)
                cli_results(run, devices[:n])
                runs[code.label].append(run)
        for code in codes:
            rs = runs[code.label]
            writes = [first_seen(r, "phase", "writing") for r in rs]
            exits = [r.wall - max(at for at, e in r.stamped_json() if e.get("event") == "result")
                     for r in rs]
            rows.append(f"| {n} | {code.label} "
                        f"| {statistics.median(first_seen(r, 'start') for r in rs):.3f} "
                        f"| {statistics.median(writes):.3f} ({min(writes):.3f}) "
                        f"| {statistics.median(exits):.3f} |")
    return ("| drives | code | start event s | first write s (fastest) | exit after the last "
            "result s |\n|---|---|---|---|---|\n" + "\n".join(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser, old_rounds=21)
    parser.add_argument("--drives", default="4,32",
                        help="drive counts of the flash table (default %(default)s; 0: none)")
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 21)
    counts = [int(n) for n in args.drives.split(",") if int(n) > 0]
    with Bench() as bench:
        codes = [NEW] if args.old is None else [old_code(bench, args.old), NEW]
        for code in codes:
            code.compile()
        times: dict[tuple[str, tuple[str, ...]], list[float]] = {
            (c.label, cmd): [] for c in codes for cmd in COMMANDS}
        for round_ in range(rounds):
            for cmd in COMMANDS:
                for code in codes if round_ % 2 else reversed(codes):
                    times[code.label, cmd].append(spawn(code, cmd))
        log(f"{rounds} rounds, medians (fastest) in seconds")
        print(f"| command | {' | '.join(c.label for c in codes)} |")
        print(f"|---|{'---|' * len(codes)}")
        for cmd in COMMANDS:
            cells = [f"{statistics.median(times[c.label, cmd]):.3f} "
                     f"({min(times[c.label, cmd]):.3f})" for c in codes]
            print(f"| popsicle-py {' '.join(cmd)} | {' | '.join(cells)} |")
        if counts:
            log(f"flash of {IMAGE // MiB} MiB to {args.drives} loop devices, {rounds} rounds")
            print("\n" + flash_table(bench, codes, counts, rounds))
    return 0


if __name__ == "__main__":
    run_main(main)
