"""Counterfeit drives that answer addresses past their real size with their most recent write,
and counterfeit drives the image fits in (issue 25, item 6).

A drive whose reads past its real size R return the latest write shows that stamp at every
address past R: aliases of no period, which a wrap-around estimate turned into "about 64 KiB".
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import popsicle_cmd
from faulty import FaultyDrive, MiB

from popsicle_py.probe import probe, run_probe
from popsicle_py.probe_plan import plan_positions, plan_reads
from popsicle_py.units import format_size


class RecentModel:
    """In memory: R bytes stored; writes past R dropped, reads past R give the latest write."""

    def __init__(self, real: int, block: int = 512) -> None:
        self.block, self.real = block, real
        self.stored: dict[int, bytes] = {}
        self.latest = b""
        self.writes = self.reads = 0

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        for at in range(0, len(data), self.block):
            if offset + at < self.real:
                self.stored[offset + at] = data[at:at + self.block]
        self.latest = data

    def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return b"".join(self._block(offset + at) for at in range(0, length, self.block))

    def _block(self, offset: int) -> bytes:
        if offset >= self.real and self.latest:
            return self.latest[:self.block]
        return self.stored.get(offset, b"\xa5" * self.block)

    def settle(self) -> None:
        pass


def estimate(claimed: int, real: int) -> tuple[bool, int | None]:
    model = RecentModel(real)
    positions = plan_positions(claimed, model.block, range(0, 48 * MiB, 16 * MiB))
    result = run_probe(model, claimed, positions, plan_reads(claimed, model.block, positions))
    return result.ok, result.real_estimate


def test_a_drive_answering_past_its_size_with_its_latest_write_is_sized_exactly() -> None:
    claimed = 1 << 30
    rng = random.Random(25)
    sizes = [MiB, 40 * MiB, claimed // 2, claimed - 512,
             *(rng.randrange(MiB, claimed, 512) for _ in range(60))]
    assert [s for s in sizes if estimate(claimed, s) != (False, s)] == []


@pytest.mark.root
def test_a_real_drive_answering_past_40_mib_with_its_latest_write(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    drive = faulty_drive(64 * MiB, recent_after=40 * MiB)
    result = probe(drive.path, 64 * MiB)
    assert not result.ok
    assert result.real_estimate == 40 * MiB
    assert result.message == "counterfeit: claims 64 MiB, holds about 40 MiB"


def flash(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), "flash", *map(str, args), "--yes"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120, check=False)


@pytest.mark.root
@pytest.mark.parametrize("fault", ["wrap", "recent_after"])
def test_a_counterfeit_the_image_fits_in_says_so_and_names_no_probe(
        faulty_drive: Callable[..., FaultyDrive], tmp_path: Path, fault: str) -> None:
    data = os.urandom(4 * MiB + 512)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    drive = faulty_drive(64 * MiB, **{fault: 32 * MiB})
    done = flash(path, drive.path)
    assert done.returncode == 1, done.stderr
    assert (f"{drive.path}: failed: counterfeit: claims 64 MiB, holds about 32 MiB; the image "
            f"({format_size(len(data))}) fits in what it holds: use --no-probe to write it"
            " anyway") in done.stdout + done.stderr
    assert not drive.ever_written(0, 64 << 10)
    done = flash(path, drive.path, "--no-probe")
    assert done.returncode == 0, done.stdout + done.stderr
    assert drive.read(0, len(data)) == data


@pytest.mark.root
def test_a_counterfeit_the_image_does_not_fit_in_says_only_counterfeit(
        faulty_drive: Callable[..., FaultyDrive], tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(40 * MiB))
    drive = faulty_drive(64 * MiB, wrap=32 * MiB)
    done = flash(path, drive.path)
    assert done.returncode == 1, done.stderr
    out = done.stdout + done.stderr
    assert f"{drive.path}: failed: counterfeit: claims 64 MiB, holds about 32 MiB" in out
    assert "--no-probe" not in out
