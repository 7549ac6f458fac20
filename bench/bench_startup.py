#!/usr/bin/env python3
"""Start-up: how long `popsicle-py --version` and `--help` take, as a user runs them.

Each command is a whole process from spawn to exit (``python -m popsicle_py ...`` with the
code's bytecode written first, as ``pip install`` leaves it), run ``--rounds`` times taking
turns with the ``--old`` code when given; the table has the median and the fastest run of
each.  Issue 23 asks for a median of at most 0.15 s for both.

    python3 bench/bench_startup.py                 # this checkout
    python3 bench/bench_startup.py --old 0653d18   # and the code before the app layer
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from _benchlib import NEW, Bench, Code, add_run_options, log, old_code, run_main

COMMANDS = (("--version",), ("--help",), ("flash", "--help"))


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser, old_rounds=21)
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 21)
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
    return 0


if __name__ == "__main__":
    run_main(main)
