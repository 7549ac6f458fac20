"""A counterfeit whose controller keeps its latest writes in a cache it answers reads from,
past every flush: the probe must not take it for genuine (review, session 16).

Before: the stamps were read back straight after they were written, so a cache holding the
last stamp written (the lowest, at 64 KiB) hid a wrap, and one holding the last few dozen
stamps hid dropped writes: ``popsicle-py probe`` said "genuine" and exited 0.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest
from conftest import needs_root, popsicle_cmd
from faulty import FaultyDrive, MiB

from popsicle_py.probe import run_probe
from popsicle_py.probe_plan import FLUSH, plan_positions, plan_reads

GiB = 1 << 30


class CachedDrive:
    """In memory: a drive that holds ``real`` bytes (wrapping or dropping past them) behind
    a write cache of ``cache`` bytes that answers reads (keyed by the address written)."""

    def __init__(self, real: int, cache: int, *, wraps: bool, block: int = 512) -> None:
        self.real, self.cache_size, self.wraps, self.block = real, cache, wraps, block
        self.stored: dict[int, bytes] = {}
        self.cache: dict[int, bytes] = {}  # oldest first
        self.writes = self.reads = 0

    def _store(self, offset: int, data: bytes) -> None:
        if self.wraps:
            self.stored[offset % self.real] = data
        elif offset < self.real:
            self.stored[offset] = data

    def write(self, offset: int, data: bytes) -> None:
        for at in range(0, len(data), self.block):
            self.writes += 1
            self.cache.pop(offset + at, None)
            self.cache[offset + at] = data[at:at + self.block]
            while len(self.cache) * self.block > self.cache_size:
                old = next(iter(self.cache))
                self._store(old, self.cache.pop(old))

    def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        out = b""
        for at in range(offset, offset + length, self.block):
            physical = at % self.real if self.wraps else at
            out += self.cache.get(at) or self.stored.get(physical, b"\0" * self.block)
        return out

    def settle(self) -> None:
        pass  # the cache ignores every flush


def probed(claimed: int, drive: CachedDrive) -> tuple[bool, int | None]:
    positions = plan_positions(claimed, drive.block)
    result = run_probe(drive, claimed, positions, plan_reads(claimed, drive.block, positions))
    return result.ok, result.real_estimate


@pytest.mark.parametrize("cache", [512, 32 << 10, 256 << 10, 896 << 10])
@pytest.mark.parametrize("wraps", [True, False])
def test_a_counterfeit_behind_a_write_cache_is_found_with_its_real_size(
        cache: int, wraps: bool) -> None:
    for claimed, real in ((GiB, 256 * MiB), (GiB, 100 * MiB), (16 * GiB, 8 * GiB)):
        assert probed(claimed, CachedDrive(real, cache, wraps=wraps)) == (False, real)


def test_a_genuine_drive_behind_a_write_cache_is_still_genuine() -> None:
    assert probed(GiB, CachedDrive(GiB, 2 * FLUSH, wraps=True)) == (True, GiB)


@needs_root
@pytest.mark.parametrize("faults", [{"wrap": 16 * MiB, "cache_writes": 1},
                                    {"drop_writes_after": 16 * MiB, "cache_writes": 8}])
def test_cli_probe_fails_a_counterfeit_whose_cache_answers_reads(
        faulty_drive: Callable[..., FaultyDrive], faults: dict[str, int]) -> None:
    fake = faulty_drive(256 * MiB, **faults)
    proc = subprocess.run([*popsicle_cmd(), "probe", fake.path, "--yes", "--json"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (result,) = json.loads(proc.stdout.splitlines()[-1])["results"]
    assert (result["status"], result["cause"]) == ("failed", "counterfeit"), result
    assert result["error"] == (f"{fake.path}: counterfeit: claims 256 MiB, holds about "
                               "16 MiB"), result


@needs_root
def test_cli_probe_passes_a_genuine_drive_with_a_cache(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    drive = faulty_drive(256 * MiB, cache_writes=8)
    proc = subprocess.run([*popsicle_cmd(), "probe", drive.path, "--yes"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "genuine: holds all of 256 MiB" in proc.stdout
