"""Decompression throughput of Image.open() against the command-line tools (run by hand).

    PYTHONPATH=. python bench/bench_images.py [--size-mib 256] [--runs 3] [--workdir DIR]

Builds a compressible image (random 64 KiB blocks mixed with zero blocks), compresses it once
per format with the usual tools, then times, alternating, reading Image.open() into a 16 MiB
buffer and `TOOL -dc FILE > /dev/null`. MB/s are uncompressed bytes (10**6) per second, medians.

With --gzip-libs it also compares the gzip decoders a pure-Python reader could use (the stdlib
zlib that images/decoders.py uses, stdlib gzip.GzipFile, and python-isal / zlib-ng if importable;
put them on PYTHONPATH without installing them, e.g. `pip install --target /tmp/libs isal zlib-ng`).
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from popsicle_py.images import open_image

BUF = 16 << 20
FORMATS: dict[str, tuple[list[str], list[str]]] = {
    # format: (compress command (file appended, writes stdout), decompress-to-stdout command)
    "gzip": (["gzip", "-c"], ["gzip", "-dc"]),
    "xz": (["xz", "-c", "-T0"], ["xz", "-dc"]),
    "bzip2": (["bzip2", "-c"], ["bzip2", "-dc"]),
    "zstd": (["zstd", "-qc"], ["zstd", "-qdc"]),
    "zip": ([], ["unzip", "-p"]),
}
EXT = {"gzip": ".gz", "xz": ".xz", "bzip2": ".bz2", "zstd": ".zst", "zip": ".zip"}


def make_image(path: Path, size: int) -> None:
    rng = random.Random(256)
    block = 64 << 10
    with open(path, "wb") as f:
        for _ in range(size // block):
            f.write(rng.randbytes(block) if rng.random() < 0.5 else bytes(block))


def compress(fmt: str, image: Path, dest: Path) -> None:
    if dest.exists():
        return
    tmp = dest.with_name(dest.name + ".part" + dest.suffix)  # zip insists on an extension
    if fmt == "zip":
        if shutil.which("zip"):
            subprocess.run(["zip", "-qj", str(tmp), str(image)], check=True)
        else:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.write(image, image.name)
    else:
        with open(tmp, "wb") as out:
            subprocess.run([*FORMATS[fmt][0], str(image)], stdout=out, check=True)
    tmp.rename(dest)


def time_ours(path: Path) -> tuple[float, int]:
    buf = bytearray(BUF)
    start = time.perf_counter()
    total = 0
    with open_image(str(path)).open() as stream:
        while n := stream.readinto(buf):
            total += n
    return time.perf_counter() - start, total


def time_tool(fmt: str, path: Path) -> float:
    start = time.perf_counter()
    with open(os.devnull, "wb") as null:
        subprocess.run([*FORMATS[fmt][1], str(path)], stdout=null, check=True)
    return time.perf_counter() - start


def median_pair(runs: int, a: Callable[[], float], b: Callable[[], float]) -> tuple[float, float]:
    """Alternate a and b so drift (page cache, CPU clocks, neighbours) hits both alike."""
    ta: list[float] = []
    tb: list[float] = []
    for i in range(runs):
        for fn, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            out.append(fn())
    return statistics.median(ta), statistics.median(tb)


def gzip_decoders() -> dict[str, Callable[[], Any] | None]:
    """Decompressobj factories for a gzip member (wbits=31), where the library is importable."""
    import zlib

    found: dict[str, Callable[[], Any] | None] = {"stdlib zlib": lambda: zlib.decompressobj(31)}
    try:
        from isal import isal_zlib

        found["python-isal"] = lambda: isal_zlib.decompressobj(31)
    except ImportError:
        found["python-isal"] = None
    try:
        from zlib_ng import zlib_ng

        found["zlib-ng"] = lambda: zlib_ng.decompressobj(31)
    except ImportError:
        found["zlib-ng"] = None
    return found


def time_decoder(path: Path, factory: Callable[[], Any]) -> float:
    """The same loop images/decoders.py runs for gzip (1 MiB reads, output capped at 16 MiB)."""
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        dec, pending = factory(), b""
        while True:
            if not pending and not (pending := f.read(1 << 20)):
                break
            dec.decompress(pending, BUF)
            pending = dec.unused_data if dec.eof else dec.unconsumed_tail
            if dec.eof:
                if not pending.lstrip(b"\0"):
                    pending = f.read(1 << 20)
                    if not pending:
                        break
                dec = factory()
    return time.perf_counter() - start


def time_gzipfile(path: Path) -> float:
    buf = bytearray(BUF)
    start = time.perf_counter()
    with gzip.open(path, "rb") as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "popsicle-bench"
    )
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--gzip-libs", action="store_true")
    args = parser.parse_args()

    size = args.size_mib << 20
    args.workdir.mkdir(parents=True, exist_ok=True)
    image = args.workdir / f"bench-{args.size_mib}M.img"
    if not image.exists() or image.stat().st_size != size:
        make_image(image, size)
    mb = size / 1e6
    print(f"image: {args.size_mib} MiB, half random 64 KiB blocks, half zeros; {args.runs} runs")
    head = ("format", "file MB", "open ms", "ours MB/s", "tool MB/s", "ratio")
    print("{:<7} {:>8} {:>8} {:>10} {:>10} {:>6}".format(*head))
    for fmt in args.formats.split(","):
        tool = FORMATS[fmt][1][0]
        if not shutil.which(tool) or (fmt != "zip" and not shutil.which(FORMATS[fmt][0][0])):
            print(f"{fmt:<7} skipped: {tool} not installed")
            continue
        path = args.workdir / f"bench-{args.size_mib}M.img{EXT[fmt]}"
        compress(fmt, image, path)
        t0 = time.perf_counter()
        info = open_image(str(path))
        open_ms = (time.perf_counter() - t0) * 1e3
        total = time_ours(path)[1]  # also warms the page cache
        assert total == size and info.format == fmt, (fmt, total, info)
        ours, theirs = median_pair(
            args.runs, lambda p=path: time_ours(p)[0], lambda f=fmt, p=path: time_tool(f, p)  # type: ignore[misc]
        )
        print(
            f"{fmt:<7} {path.stat().st_size / 1e6:>8.1f} {open_ms:>8.1f} {mb / ours:>10.0f} "
            f"{mb / theirs:>10.0f} {theirs / ours:>6.2f}"
        )

    if args.gzip_libs:
        path = args.workdir / f"bench-{args.size_mib}M.img.gz"
        compress("gzip", image, path)
        print("\ngzip decoders, same read loop (MB/s of uncompressed data):")
        base = statistics.median(time_gzipfile(path) for _ in range(args.runs))
        print(f"  {'stdlib gzip.GzipFile':<22} {mb / base:>6.0f}")
        for name, factory in gzip_decoders().items():
            if factory is None:
                print(f"  {name:<22} not importable")
                continue
            t = statistics.median(time_decoder(path, factory) for _ in range(args.runs))
            print(f"  {name:<22} {mb / t:>6.0f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
