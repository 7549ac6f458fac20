"""Benchmark of compressed images at every drive's own pace (issue 16): the spill file.

Run as root from anywhere:  python bench/bench_spill.py [--quick] [--rounds N] [--old REV]

Four loop devices over files on /dev/shm, throttled by one blkio cgroup that holds only the
measured process: three at 48 MB/s and one at 8 MB/s.  A 192 MiB image that compresses like a
disk image (two thirds real files from /usr, one third zeros, in 1 MiB blocks) is made on
/var/tmp as ``.xz`` (``xz -T1 -0``: one block, so ``xz -dc`` decodes on one thread as Python's
lzma does) and ``.zst`` (``zstd -3``).  Methods take turns, in rotating order, with the
compressed files warm in the page cache:

- solo: ``xz -dc IMG.xz | dd of=FAST bs=16M oflag=direct iflag=fullblock`` and the same with
  ``zstd -dc`` to one fast drive, one after the other, while ``zstd -dc | dd`` writes the slow
  drive beside them (each drive has its own throttle; the slow pipeline needs next to no CPU);
- the CLI as a user runs it, ``python -m popsicle_py flash IMG.xz|IMG.zst DEV... --yes --json
  --no-verify`` under ``/usr/bin/time -v``: each drive's ``"elapsed"`` from its result event,
  when that line arrived (from the spawn), the whole process's wall time and peak RSS;
- once: the CLI writing the raw image, for its peak RSS (the target is "as for raw images").

With ``--old DIR-or-REV`` the CLI of that code takes turns with this one's (``--old-rounds``,
default 1: the code before the spill keeps every drive of a compressed image in lock-step, and
one run shows that).

Targets (this code): each fast drive <= 1.15 x the solo pipeline of its format (for .xz that
solo is bound by decompression), the slow drive <= 1.05 x its solo, peak RSS <= 160 MiB and
no more than 1.05 x the raw image's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from _benchlib import (
    MB,
    NEW,
    Bench,
    Code,
    MiB,
    add_run_options,
    cli_argv,
    cli_notes,
    cli_results,
    codes_of,
    dd_argv,
    log,
    median,
    run_main,
    schedule,
    table,
    throttle,
    version_report,
    versions,
    warm,
)

RATES = [48 * MB, 48 * MB, 48 * MB, 8 * MB]
TARGET_FAST, TARGET_SLOW, TARGET_RSS, TARGET_RSS_RAW = 1.15, 1.05, 160, 1.05
FORMATS = {".xz": (["xz", "-T1", "-0", "-k", "-c"], ["xz", "-dc"]),
           ".zst": (["zstd", "-q", "-3", "-c"], ["zstd", "-dc"])}
CONTENT = ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib", "/usr/share")


def _content() -> Any:
    """Bytes of real files (libraries, programs, data), in a stable order, for ever."""
    while True:
        for top in CONTENT:
            for directory, subdirs, files in os.walk(top):
                subdirs.sort()
                for name in sorted(files):
                    path = os.path.join(directory, name)
                    if os.path.islink(path) or not os.path.isfile(path):
                        continue
                    try:
                        with open(path, "rb") as f:
                            data = f.read(64 * MiB)
                    except OSError:
                        continue
                    if data:
                        yield data


def make_disk_like(path: Path, size: int) -> None:
    """Two 1 MiB blocks of real files, then one of zeros, and again: like a filesystem 2/3
    full.  Random data would be unrealistic here: xz stores it, and decodes it at memcpy speed."""
    content = _content()
    pending = b""
    with open(path, "wb") as f:
        for i in range(size // MiB):
            if i % 3 == 2:
                f.write(bytes(MiB))
                continue
            while len(pending) < MiB:
                pending += next(content)
            f.write(pending[:MiB])
            pending = pending[MiB:]


def pipeline(decompress: list[str], image: Path, dev: str) -> list[str]:
    dd = ["dd", f"of={dev}", "bs=16M", "oflag=direct", "iflag=fullblock", "status=none"]
    return ["bash", "-o", "pipefail", "-c",
            f"{shlex.join([*decompress, str(image)])} | {shlex.join(dd)}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, old_rounds=1)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    size = (96 if args.quick else 192) * MiB

    with Bench() as bench:
        codes = codes_of(bench, args.old)
        version = versions(codes)
        disk = bench.tempdir("/var/tmp")
        shm = bench.tempdir("/dev/shm")
        raw = disk / "image.img"
        log(f"making a {size // MiB} MiB disk-like image in {disk}, and its .xz and .zst")
        make_disk_like(raw, size)
        images = {}
        for suffix, (compress, _) in FORMATS.items():
            images[suffix] = disk / f"image.img{suffix}"
            with open(images[suffix], "wb") as out:
                subprocess.run([*compress, str(raw)], stdout=out, check=True)
            log(f"  {images[suffix].name}: {images[suffix].stat().st_size / MiB:.1f} MiB")
        sizes = ", ".join(f"{s} {p.stat().st_size / MiB:.1f} MiB" for s, p in images.items())
        devices = [bench.loop(shm / f"drive{i}.img", size) for i in range(len(RATES))]
        for dev in devices:  # untimed and unthrottled: the backing files are written once
            bench.run(dd_argv(raw, dev))
        cg = bench.cgroup("spill")
        for dev, rate in zip(devices, RATES, strict=True):
            throttle(cg, dev, rate)
        slow = RATES.index(min(RATES))
        fast = 0
        log("drives: " + ", ".join(f"{d} {r // MB} MB/s" for d, r in
                                   zip(devices, RATES, strict=True)))

        def solo() -> dict[str, Any]:
            for image in images.values():
                warm(image)
            beside = bench.start(pipeline(FORMATS[".zst"][1], images[".zst"], devices[slow]),
                                 cgroup=cg)
            out = {suffix: bench.run(pipeline(FORMATS[suffix][1], images[suffix],
                                              devices[fast]), cgroup=cg).wall
                   for suffix in FORMATS}
            out["slow"] = bench.finish(beside).wall
            return out

        def cli(code: Code, image: Path) -> dict[str, Any]:
            warm(image)
            run = bench.run(cli_argv(image, devices, "--no-verify"), cgroup=cg, code=code)
            results = cli_results(run, devices)
            return {"times": [results[d]["elapsed"] for d in devices],
                    "spawn": [results[d]["seen"] for d in devices], "wall": run.wall,
                    "rss": run.time_v_rss_mib(), "notes": cli_notes(run)}

        configs: dict[str, Callable[[], dict[str, Any]]] = {"solo": solo}
        counts = {"solo": rounds}
        for code in codes:
            for suffix, image in images.items():
                name = f"CLI {suffix}, {code.label}"
                configs[name] = partial(cli, code, image)
                counts[name] = rounds if code is NEW else min(rounds, args.old_rounds)
        configs["CLI raw, new"] = lambda: cli(NEW, raw)
        counts["CLI raw, new"] = 1
        got: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        for r, name in schedule(counts):
            info = configs[name]()
            got[name].append(info)
            if name == "solo":
                log(f"  round {r + 1}/{rounds}: solo: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in info.items()))
            else:
                log(f"  round {r + 1}/{rounds}: {name}: "
                    + " ".join(f"{x:.2f}" for x in info["times"])
                    + f" (wall {info['wall']:.2f}, {info['rss']:.0f} MiB)"
                    + "".join(f"\n    note: {n}" for n in info["notes"]))
        lines, same = version_report(version, versions(codes))

    solo_t = {k: median(x[k] for x in got["solo"]) for k in [*FORMATS, "slow"]}
    raw_rss = median(x["rss"] for x in got["CLI raw, new"])
    headers = ["method", "runs", "fast drives elapsed s (median, each)", "x solo",
               "slow drive elapsed s", "x solo", "fast drives seen from spawn s", "x solo",
               "wall s", "peak RSS MiB", "notes"]
    rows = []
    verdicts = []
    for name, runs in got.items():
        if name == "solo":
            continue
        suffix = name.split()[1].rstrip(",")
        ref = solo_t.get(suffix, solo_t[".zst"])  # raw: against the zstd pipeline, as context
        fast_each = [median(x["times"][i] for x in runs) for i in range(len(devices))
                     if i != slow]
        fast_med = median(fast_each)
        spawn = median(median(x["spawn"][i] for x in runs) for i in range(len(devices))
                       if i != slow)
        slow_t = median(x["times"][slow] for x in runs)
        rss = median(x["rss"] for x in runs)
        notes = sorted({n for x in runs for n in x["notes"]})
        rows.append([name, len(runs), f"{fast_med:.2f} ("
                     + " ".join(f"{v:.2f}" for v in fast_each) + ")",
                     f"{max(fast_each) / ref:.3f}", slow_t, f"{slow_t / solo_t['slow']:.3f}",
                     spawn, f"{spawn / ref:.3f}", median(x["wall"] for x in runs), rss,
                     "; ".join(notes) or "-"])
        if name.endswith(f", {NEW.label}") and suffix in FORMATS:
            ratio = max(fast_each) / ref
            verdicts.append((f"{name}: slowest fast drive <= {TARGET_FAST:.2f} x "
                             f"{' '.join(FORMATS[suffix][1])} | dd solo", ratio,
                             ratio <= TARGET_FAST))
            ratio = slow_t / solo_t["slow"]
            verdicts.append((f"{name}: slow drive <= {TARGET_SLOW:.2f} x its solo", ratio,
                             ratio <= TARGET_SLOW))
            top = max(x["rss"] for x in runs)
            verdicts.append((f"{name}: peak RSS (max of runs, {top:.1f} MiB) <= "
                             f"{TARGET_RSS} MiB", top / TARGET_RSS, top <= TARGET_RSS))
            verdicts.append((f"{name}: peak RSS (median {rss:.1f} MiB) <= {TARGET_RSS_RAW:.2f}"
                             f" x the raw image's ({raw_rss:.1f} MiB)", rss / raw_rss,
                             rss <= TARGET_RSS_RAW * raw_rss))
    print("\n".join(lines))
    if not same:
        verdicts.append(("the measured code unchanged throughout", 0.0, False))
    print()
    print(f"spill: {size // MiB} MiB disk-like image ({sizes}) on /var/tmp, "
          f"4 loop devices ({', '.join(f'{r // MB}' for r in RATES)} MB/s), medians; solo "
          f"pipelines to one fast drive: xz -dc | dd {solo_t['.xz']:.2f} s, zstd -dc | dd "
          f"{solo_t['.zst']:.2f} s; to the slow drive: zstd -dc | dd {solo_t['slow']:.2f} s "
          f"({len(got['solo'])} runs: xz "
          + " ".join(f"{x['.xz']:.2f}" for x in got["solo"]) + ", zstd "
          + " ".join(f"{x['.zst']:.2f}" for x in got["solo"]) + ", slow "
          + " ".join(f"{x['slow']:.2f}" for x in got["solo"]) + ")")
    print("CLI: `python -m popsicle_py flash IMG DEV... --yes --json --no-verify`; elapsed from "
          "each result event (from the job's start); x solo of the slowest fast drive against "
          "its format's pipeline (raw: against zstd's, as context)")
    print(table(headers, rows))
    print()
    for text, ratio, ok in verdicts:
        print(f"target {text}: {ratio:.3f} -> {'MET' if ok else 'NOT MET'}")
    return 0 if all(ok for _, _, ok in verdicts) else 1


if __name__ == "__main__":
    run_main(main)
