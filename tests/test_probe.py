"""The capacity probe: planning, the verdict and estimate on every size of wrap, and on real
faulty drives (a loop device over tests/faultfs.py), and the ``popsicle-py probe`` command."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, needs_root, popsicle_cmd
from faulty import FaultyDrive, MiB

from popsicle_py import bmap
from popsicle_py.blockdev import OpenSpec, open_for_writing
from popsicle_py.engine import HEAD
from popsicle_py.engine.head import head_length
from popsicle_py.probe import certainly_written, probe, probe_device, run_probe
from popsicle_py.probe_plan import PROTECTED, flush_runs, grid, plan_positions, plan_reads
from popsicle_py.units import format_size
from tests.fs_images import needs_fs_tools, rpi_image, tree, usage_of

GiB = 1 << 30


class Model:
    """A drive as the probe sees it, in memory: wraps at ``wrap``, drops writes past ``drop``.

    Used to check every wrap size of a claim, which real drives (0.3 s each) cannot.
    """

    def __init__(self, block: int = 512, wrap: int | None = None, drop: int | None = None
                 ) -> None:
        self.block, self.wrap, self.drop = block, wrap, drop
        self.stored: dict[int, bytes] = {}
        self.writes = self.reads = 0

    def _physical(self, offset: int) -> int:
        return offset % self.wrap if self.wrap else offset

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        for at in range(0, len(data), self.block):
            if self.drop is None or offset + at < self.drop:
                self.stored[self._physical(offset + at)] = data[at:at + self.block]

    def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return b"".join(self.stored.get(self._physical(offset + at), b"\xa5" * self.block)
                        for at in range(0, length, self.block))

    def settle(self) -> None:
        pass


def run_model(claimed: int, **kwargs: int) -> tuple[bool, int | None]:
    model = Model(**kwargs)
    positions = plan_positions(claimed, model.block, range(0, 48 * MiB, 16 * MiB))
    result = run_probe(model, claimed, positions, plan_reads(claimed, model.block, positions))
    return result.ok, result.real_estimate


# -- planning ----------------------------------------------------------------------------------


@pytest.mark.parametrize("claimed", [1 * MiB, 16 * MiB, GiB, GiB + 3 * 512, 64 * GiB, 2**40])
def test_positions_are_aligned_past_the_protected_start_and_include_boundaries(
        claimed: int) -> None:
    boundaries = list(range(0, min(claimed, 4 * GiB), 16 * MiB))
    positions = plan_positions(claimed, 512, boundaries)
    reads = plan_reads(claimed, 512, positions)
    last = (claimed // 512 - 1) * 512
    assert positions == sorted(set(positions))
    assert all(PROTECTED <= p <= last and p % 512 == 0 for p in positions + reads)
    assert last in positions
    assert set(b for b in boundaries if b >= PROTECTED) <= set(positions)
    assert not set(positions) & set(reads)
    # Few small writes: baby steps (at most 256) plus the boundaries and the last block.
    assert len(positions) <= 256 + len(boundaries) + 1
    assert len(reads) <= 1100


def test_probe_never_plans_a_write_into_the_first_64_kib() -> None:
    assert plan_positions(PROTECTED + 512, 512, [0, 512, 4096]) == [PROTECTED]
    assert plan_positions(PROTECTED, 512, [0]) == []


# -- the verdict and the estimate, on every wrap of a claim --------------------------------------


def test_every_wrap_of_a_256_mib_claim_is_found_with_its_exact_size() -> None:
    claimed = 256 * MiB
    unit = grid(claimed, 512).unit
    missed = [real for real in range(MiB, claimed, unit)
              if run_model(claimed, wrap=real) != (False, real)]
    assert missed == []


@pytest.mark.parametrize("claimed", [GiB, 64 * GiB])
def test_wraps_of_large_claims_are_found_with_their_exact_size(claimed: int) -> None:
    unit = grid(claimed, 512).unit
    rng = random.Random(claimed)
    sizes = {MiB - MiB % unit or unit, claimed // 2, claimed // 2 + unit, claimed - unit,
             claimed - 64 * unit, *(rng.randrange(MiB, claimed, unit) for _ in range(150))}
    sizes = {s for s in sizes if s >= MiB}
    missed = [real for real in sorted(sizes) if run_model(claimed, wrap=real) != (False, real)]
    assert missed == []


def test_wraps_that_are_not_a_multiple_of_the_unit_are_found_below_a_sixteenth() -> None:
    claimed = GiB
    rng = random.Random(7)
    sizes = [rng.randrange(MiB, claimed // 16, 4096) for _ in range(100)]
    assert [s for s in sizes if run_model(claimed, wrap=s) != (False, s)] == []


def test_dropped_writes_are_found_at_any_offset_with_the_exact_size() -> None:
    claimed = GiB
    rng = random.Random(3)
    sizes = [PROTECTED + 512, MiB, claimed - 512, *(rng.randrange(MiB, claimed, 512)
                                                    for _ in range(100))]
    assert [s for s in sizes if run_model(claimed, drop=s) != (False, s)] == []


@pytest.mark.parametrize("claimed", [PROTECTED + 512, 16 * MiB, GiB + 3 * 512, 64 * GiB])
def test_a_genuine_drive_is_never_called_counterfeit(claimed: int) -> None:
    assert run_model(claimed) == (True, claimed)
    assert run_model(claimed, wrap=claimed) == (True, claimed)


def test_stamps_go_highest_first_so_the_real_region_reads_good() -> None:
    """A later write to an alias wins the physical block.  Written highest first, the lowest
    alias (the one inside the real size) is written last: positions below R read their own
    stamps, and the aliases past R read theirs; never the other way round."""
    claimed, real = GiB, 32 * MiB
    positions = plan_positions(claimed, 512, [PROTECTED + real, PROTECTED + 2 * real])
    result = run_probe(Model(wrap=real), claimed, positions,
                       plan_reads(claimed, 512, positions))
    assert result.real_estimate == real
    assert (PROTECTED + real, PROTECTED) in result.aliases
    assert (PROTECTED + 2 * real, PROTECTED) in result.aliases
    assert all(where >= real for where, _ in result.aliases)


# -- real drives -------------------------------------------------------------------------------


@needs_root
def test_genuine_faulty_drive_passes_and_the_first_64_kib_are_never_written(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    drive = faulty_drive(GiB, fill=0x5A)
    result = probe(drive.path, GiB, boundaries=range(0, 48 * MiB, 16 * MiB))
    assert result.ok, result
    assert result.real_estimate == GiB
    assert result.message == f"genuine: holds all of {format_size(GiB)}"
    assert drive.writes() and min(o for o, _ in drive.writes()) >= PROTECTED
    assert drive.read(0, PROTECTED) == b"\x5a" * PROTECTED


@needs_root
def test_healthy_loop_device_is_no_false_alarm(loop_factory: Callable[..., Loop]) -> None:
    loop = loop_factory(256 * MiB, fill=0x5A)
    for _ in range(3):
        result = probe(loop.path, 256 * MiB)
        assert result.ok and result.real_estimate == 256 * MiB, result
    assert loop.read(PROTECTED) == b"\x5a" * PROTECTED


@needs_root
@pytest.mark.parametrize("real", [16 * MiB, 24 * MiB, 32 * MiB, 64 * MiB,
                                  40 * MiB + 3 * 65536, 700 * MiB],
                         ids=["16M", "24M", "32M", "64M", "40M+192K", "700M"])
def test_counterfeit_wrap_is_found_with_its_real_size(faulty_drive: Callable[..., FaultyDrive],
                                                      real: int) -> None:
    drive = faulty_drive(GiB, wrap=real)
    result = probe(drive.path, GiB, boundaries=range(0, 48 * MiB, 16 * MiB))
    assert not result.ok
    assert result.real_estimate == real
    assert result.message == (f"counterfeit: claims {format_size(GiB)}, holds about "
                              f"{format_size(real)}")
    assert min(o for o, _ in drive.writes()) >= PROTECTED


@needs_root
def test_drive_that_drops_writes_after_32_mib(faulty_drive: Callable[..., FaultyDrive]) -> None:
    drive = faulty_drive(GiB, drop_writes_after=32 * MiB)
    result = probe(drive.path, GiB)
    assert not result.ok
    assert result.real_estimate == 32 * MiB
    assert result.message.startswith("counterfeit: claims")


@needs_root
def test_a_failing_write_is_an_error_not_a_verdict(faulty_drive: Callable[..., FaultyDrive]
                                                   ) -> None:
    last = GiB - 512
    drive = faulty_drive(GiB, bad_write=(last, GiB))
    result = probe(drive.path, GiB)
    assert not result.ok and result.real_estimate is None
    assert result.message == f"probe failed: Input/output error at offset {last}"


# -- the command -------------------------------------------------------------------------------


def probe_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), "probe", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


@needs_root
def test_cli_probe_reports_each_drive_and_exits_1_for_a_counterfeit(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    genuine = faulty_drive(GiB)
    fake = faulty_drive(GiB, wrap=32 * MiB)
    proc = probe_cli(genuine.path, fake.path, "--yes", "--json")
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    by_device = {e["device"]: e for e in lines if e["event"] == "probe"}
    assert by_device[genuine.path]["ok"] is True
    assert by_device[genuine.path]["real_estimate"] == GiB
    assert by_device[fake.path]["ok"] is False
    assert by_device[fake.path]["claimed"] == GiB
    assert by_device[fake.path]["real_estimate"] == 32 * MiB
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["ok"] is False
    # Which drive each result is, as flash's, read's and erase's results say it.
    assert [(r["drive"]["seq"], r["drive"]["size"]) for r in summary["results"]] == [
        (1, GiB), (2, GiB)]
    statuses = {r["device"]: (r["status"], r["error"]) for r in summary["results"]}
    assert statuses == {genuine.path: ("ok", None),
                        fake.path: ("failed", f"{fake.path}: counterfeit: claims "
                                              f"{format_size(GiB)}, holds about "
                                              f"{format_size(32 * MiB)}")}
    assert "Traceback" not in proc.stderr


@needs_root
def test_cli_probe_exits_0_when_all_are_genuine(faulty_drive: Callable[..., FaultyDrive],
                                                loop_factory: Callable[..., Loop]) -> None:
    drive = faulty_drive(256 * MiB)
    loop = loop_factory(64 * MiB)
    proc = probe_cli(drive.path, loop.path, "--yes")
    assert proc.returncode == 0, proc.stderr
    for path in (drive.path, loop.path):
        assert any(line.startswith(path) and "genuine: holds all of" in line
                   for line in proc.stdout.splitlines()), proc.stdout


@needs_root
def test_cli_probe_without_yes_or_terminal_refuses_and_writes_nothing(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    drive = faulty_drive(256 * MiB)
    proc = probe_cli(drive.path, "--json")
    assert proc.returncode == 2
    assert "pass --yes" in proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"event": "summary", "ok": False,
                                                        "results": []}
    assert drive.writes() == []


def test_cli_probe_refuses_a_missing_device() -> None:
    proc = probe_cli("/dev/popsicle-no-such-drive", "--yes")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "popsicle-py: /dev/popsicle-no-such-drive does not exist"]


@needs_root
def test_cli_probe_refuses_a_mounted_drive_unless_unmount(loop_factory: Callable[..., Loop]
                                                          ) -> None:
    from loopdev import mounted_ext4
    loop = loop_factory(64 * MiB)
    with mounted_ext4(loop.path):
        proc = probe_cli(loop.path, "--yes")
        assert proc.returncode == 2
        assert "is mounted at" in proc.stderr
    os.sync()


@needs_root
def test_cli_probe_of_a_hung_drive_reports_on_time(faulty_drive: Callable[..., FaultyDrive],
                                                   loop_factory: Callable[..., Loop]) -> None:
    """The probe's first write (the last block) never answers: the genuine drive beside it is
    reported, the hung one fails as stalled, and the summary comes after the stall timeout."""
    hung = faulty_drive(256 * MiB, hang=(256 * MiB - 512, 120))
    loop = loop_factory(64 * MiB)
    started = time.monotonic()
    proc = subprocess.Popen([*popsicle_cmd(), "probe", loop.path, hung.path, "--yes", "--json",
                             "--stall-timeout", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(json.loads(line))
            if lines[-1]["event"] == "summary":
                break
        summary_at = time.monotonic() - started
    finally:
        hung.clear()  # the held write returns, and the process can end
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert summary_at < 2 + 5  # the stall timeout, plus start-up on a busy machine
    statuses = {r["device"]: (r["status"], r["error"]) for r in lines[-1]["results"]}
    assert statuses == {loop.path: ("ok", None),
                        hung.path: ("failed", f"{hung.path}: stalled: no progress for 2 s")}


@needs_root
@pytest.mark.parametrize("command", ["probe", "flash", "erase"])
def test_a_drive_slow_at_small_requests_is_not_stalled_by_its_probe(
        command: str, loop_factory: Callable[..., Loop], throttle: Callable[..., Any],
        tmp_path: Path) -> None:
    """A stick that takes a flash page's time for every small write answers each of the
    probe's hundreds of one-block requests, slowly: the probe takes longer than the stall
    timeout, and that is no stall (each such drive failed as "stalled: no progress for 2 s"
    before any byte was written)."""
    drive = loop_factory(256 * MiB, fill=PATTERN)
    add = throttle((drive, 0, 60))
    image = tmp_path / "os.img"
    data = os.urandom(4 * MiB)
    image.write_bytes(data)
    image_arg = [str(image)] if command == "flash" else []
    options = {"probe": [], "flash": ["--bucket-size", "1M"], "erase": ["--fs", "none"]}
    proc = subprocess.run([*popsicle_cmd(), command, *image_arg, drive.path, *options[command],
                           "--yes", "--json", "--stall-timeout", "2"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120, preexec_fn=lambda: add(os.getpid()))
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0, (proc.stderr, events[-1])
    assert [r["status"] for r in events[-1]["results"]] == ["ok"]
    if command == "probe":
        probed = next(e for e in events if e["event"] == "probe")
        assert probed["ok"] and probed["elapsed"] > 2  # longer than the stall timeout
    if command == "flash":
        assert drive.read(len(data)) == data


# -- a flash's probe: stamps the flash overwrites are not put back (issue 30) ------------------


PATTERN = 0x5A


def filled(chunk: bytes | bytearray) -> bool:
    """Some bytes, all of them PATTERN: ``set(chunk) == {PATTERN}`` without making a set of
    tens of MiB byte by byte."""
    return len(chunk) > 0 and chunk.count(PATTERN) == len(chunk)


def stamped(loop: Loop, positions: list[int]) -> list[int]:
    """The positions whose block no longer holds the drive's old pattern."""
    return [p for p in positions if loop.read(512, p) != bytes([PATTERN]) * 512]


@needs_root
def test_a_passing_probe_puts_back_only_what_the_flash_will_not_overwrite(
        loop_factory: Callable[..., Loop]) -> None:
    size, image = 16 * MiB, 8 * MiB + 777
    loop = loop_factory(size, fill=PATTERN)
    bounds = [4 * MiB, image]
    positions = plan_positions(size, 512, bounds)
    past = [p for p in positions if p + 512 > image]
    assert past and len(past) < len(positions)
    device = open_for_writing(OpenSpec(loop.path, size))
    try:
        result = probe_device(device, bounds, overwritten=((0, image),))
        assert result.ok, result
        assert result.restored == len(past)
        assert stamped(loop, positions) == [p for p in positions if p not in past]
        rest = bytearray(loop.read())
        flushed = flush_runs(size, 512, positions)  # inside the image too: left stamped
        for p, length in [*((p, 512) for p in positions), *flushed]:
            rest[p:p + length] = bytes([PATTERN]) * length
        assert filled(rest)  # nothing else was touched
        # The probe command's way (nothing to be written next): everything is put back.
        result = probe_device(device, bounds)
        assert result.ok
        assert result.restored == len(positions) + sum(n for _, n in flushed) // 512
    finally:
        device.close()
    assert stamped(loop, positions) == [p for p in positions if p not in past]


@needs_root
def test_a_counterfeit_is_put_back_whole_whatever_the_flash_would_have_written(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    drive = faulty_drive(64 * MiB, wrap=32 * MiB, fill=PATTERN)
    bounds = [16 * MiB, 32 * MiB, 48 * MiB, 60 * MiB]
    positions = plan_positions(64 * MiB, 512, bounds)
    device = open_for_writing(OpenSpec(drive.path, 64 * MiB))
    try:
        result = probe_device(device, bounds, overwritten=((0, 60 * MiB),))
    finally:
        device.close()
    assert not result.ok and result.real_estimate == 32 * MiB
    assert result.restored >= len(positions)
    assert drive.read(0, 32 * MiB) == bytes([PATTERN]) * (32 * MiB)


def flash_bounds(size: int) -> list[int]:
    """The boundaries a flash of ``size`` bytes in 4 MiB buckets probes: each bucket's, the end."""
    return [*range(4 * MiB, size, 4 * MiB), size]


def flash_counted(image: Path, loop: Loop, *args: str) -> tuple[dict[str, Any], int]:
    """Flash ``image`` (4 MiB buckets): the drive's result and the bytes the kernel saw
    written to it."""
    before = loop.write_stat_sectors()
    proc = subprocess.run([*popsicle_cmd(), "flash", str(image), loop.path, "--yes", "--json",
                           "--bucket-size", "4M", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    return summary["results"][0], (loop.write_stat_sectors() - before) * 512


def image_then_old_pattern(drive: Loop, data: bytes | bytearray) -> bool:
    """The drive holds the image, and past it only what it held before (no stamp left)."""
    on_drive = drive.read()
    return on_drive[: len(data)] == data and filled(on_drive[len(data):])


def probe_cost(image: Path, size: int, drive_size: int, *args: str,
               loops: Callable[..., Loop]) -> tuple[int, Loop, dict[str, Any]]:
    """Bytes written to a prefilled drive by a flash, beyond what a flash without the probe
    writes to another."""
    with_probe, without = loops(drive_size, fill=PATTERN), loops(drive_size, fill=PATTERN)
    result, written = flash_counted(image, with_probe, *args)
    bare, baseline = flash_counted(image, without, "--no-probe", *args)
    assert result["bytes_written"] == bare["bytes_written"], (result, bare)
    assert with_probe.read() == without.read()
    return written - baseline, with_probe, result


def flush_cost(size: int, positions: list[int], kept: Callable[[int], bool] = lambda p: True
               ) -> int:
    """Bytes the probe's flush stamps (its first MiB) cost a flash: each written once, and
    those not ``kept`` (not overwritten by the flash) written back."""
    blocks = [p for start, n in flush_runs(size, 512, positions)
              for p in range(start, start + n, 512)]
    return 512 * (len(blocks) + sum(not kept(p) for p in blocks))


@needs_root
def test_a_flash_writes_its_stamps_once_and_puts_back_only_those_past_the_image(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Those in the head are overwritten by the head's stamp, the flash's first write: putting
    them back would be writes for nothing (they are when the flash stops before: test_remote)."""
    data = os.urandom(8 * MiB + 777)
    image = tmp_path / "os.img"
    image.write_bytes(data)
    cost, drive, _ = probe_cost(image, len(data), 16 * MiB, loops=loop_factory)
    positions = plan_positions(16 * MiB, 512, flash_bounds(len(data)))
    past = [p for p in positions if p + 512 > len(data)]
    assert past == [len(data) // 512 * 512, 16 * MiB - 512]  # the image's last block, partly
    head = [p for p in positions if p < HEAD]  # under the head's stamp
    assert head and len(head) + len(past) < len(positions)
    assert cost == 512 * (len(positions) + len(past)) + flush_cost(16 * MiB, positions)
    assert image_then_old_pattern(drive, data)


@needs_root
def test_an_image_shorter_than_the_head_gets_the_stamps_past_it_put_back(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """The head's stamp covers the image's head only: stamps beyond it are written back."""
    data = os.urandom(300 * 1024)
    image = tmp_path / "tiny.img"
    image.write_bytes(data)
    head = [p for p in plan_positions(16 * MiB, 512, flash_bounds(len(data))) if p < HEAD]
    assert any(p >= len(data) for p in head) and any(p < len(data) for p in head)
    cost, drive, _ = probe_cost(image, len(data), 16 * MiB, loops=loop_factory)
    assert cost > 0
    assert image_then_old_pattern(drive, data)


@needs_root
@pytest.mark.parametrize("size", [1_000_001, 70_000, HEAD - 1])
def test_a_short_image_ending_inside_a_block_is_not_repaired_on_a_sound_drive(
        loop_factory: Callable[..., Loop], tmp_path: Path, size: int) -> None:
    """The stamp over the head covers its last block whole; putting back the probe's block
    there wrote over the stamp's tail, and verification then 'repaired 1 bucket'."""
    data = os.urandom(size)
    image = tmp_path / "tiny.img"
    image.write_bytes(data)
    drive = loop_factory(16 * MiB, fill=PATTERN)
    result, _ = flash_counted(image, drive)
    assert (result["status"], result["repaired"]) == ("ok", 0), result
    on_drive = drive.read()
    assert on_drive[:size] == data
    assert filled(on_drive[-(-size // 512) * 512:])  # past its last block: as it was


@needs_root
def test_a_flash_that_stops_before_its_first_bucket_puts_every_stamp_back(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """The head's stamps wait for the head's stamp, which a source failing first never brings:
    they are put back then, and the drive is as it was."""
    image = tmp_path / "os.img.gz"
    image.write_bytes(gzip.compress(os.urandom(8 * MiB), compresslevel=1)[: 2 * MiB])
    drive = loop_factory(16 * MiB, fill=PATTERN)
    before = drive.write_stat_sectors()
    proc = subprocess.run([*popsicle_cmd(), "flash", str(image), drive.path, "--yes", "--json"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])["results"][0]
    assert result["status"] == "failed" and result["bytes_written"] == 0, result
    assert drive.write_stat_sectors() > before  # the probe ran: its stamps were written
    assert filled(drive.read())


@needs_root
def test_a_probe_flushes_the_drives_cache_once_per_pass_not_once_per_stamp(
        loop_factory: Callable[..., Loop]) -> None:
    """Each O_SYNC write is a cache flush (two, on a loop device): hundreds per probe on a
    stick.  The stamps go through a second descriptor without O_SYNC, flushed per pass."""
    loop = loop_factory(16 * MiB, fill=PATTERN)
    device = open_for_writing(OpenSpec(loop.path, 16 * MiB))
    try:
        before = loop.flushes()
        result = probe_device(device, [4 * MiB, 8 * MiB, 12 * MiB])
        flushes = loop.flushes() - before
    finally:
        device.close()
    assert result.ok and result.writes >= 10 and result.restored == result.writes
    assert flushes <= 2, flushes  # before the stamps are read back; after they are put back
    assert filled(loop.read())


@needs_root
def test_skip_identical_gets_every_stamp_put_back(loop_factory: Callable[..., Loop],
                                                  tmp_path: Path) -> None:
    """A stamp left in an identical bucket would have it rewritten (not in the head: the
    head's stamp overwrites it whatever the drive holds)."""
    data = bytearray(os.urandom(8 * MiB))
    image = tmp_path / "os.img"
    image.write_bytes(data)
    drives = [loop_factory(16 * MiB, fill=PATTERN) for _ in range(2)]
    for drive in drives:
        with open(drive.backing, "r+b") as f:
            f.write(data)  # last week's image: its second bucket differs
    # All of that bucket, from its start: the comparison's pieces follow the drive's
    # measured speed, so a single changed byte cost a piece of any size (flaky under load).
    data[4 * MiB :] = os.urandom(4 * MiB)
    image.write_bytes(data)
    result, written = flash_counted(image, drives[0], "--skip-identical")
    bare, baseline = flash_counted(image, drives[1], "--skip-identical", "--no-probe")
    positions = plan_positions(16 * MiB, 512, flash_bounds(len(data)))
    head = [p for p in positions if p < HEAD]
    assert written - baseline == 512 * (2 * len(positions) - len(head)) + flush_cost(
        16 * MiB, positions)
    assert (result["bytes_written"], result["bytes_skipped"]) == (
        bare["bytes_written"], bare["bytes_skipped"])
    assert result["bytes_skipped"] >= 3 * MiB
    assert image_then_old_pattern(drives[0], data)


@needs_root
@pytest.mark.skipif(shutil.which("bmaptool") is None, reason="needs bmap-tools")
def test_a_block_maps_holes_get_their_stamps_put_back(
        loop_factory: Callable[..., Loop], sparse_image: tuple[Path, bytes]) -> None:
    path, data = sparse_image
    extents = bmap.load(f"{path}.bmap", len(data)).extents
    cost, drive, _ = probe_cost(path, len(data), 24 * MiB, loops=loop_factory)
    positions = plan_positions(24 * MiB, 512, flash_bounds(len(data)))
    mapped = [p for p in positions if p >= HEAD
              and any(e.offset <= p and p + 512 <= e.end for e in extents)]
    assert mapped == [8 * MiB]
    # The head (its first MiB: no partition table) is stamped, then written whole, its holes
    # as the image's zeros: the probe's stamps there need no putting back.
    stamped_over = [p for p in positions if p + 512 <= HEAD]
    assert stamped_over
    assert cost == 512 * (2 * len(positions) - len(mapped) - len(stamped_over)) + flush_cost(
        24 * MiB, positions)
    on_drive = drive.read()
    for start in range(0, 24 * MiB, 4096):
        if start < HEAD or any(e.offset <= start < e.end for e in extents):
            assert on_drive[start:start + 4096] == data[start:start + 4096]
        else:
            assert set(on_drive[start:start + 4096]) == {PATTERN}, start


@needs_root
@needs_fs_tools
def test_a_trimmed_flash_gets_the_stamps_in_free_space_put_back(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    keep, gone = tmp_path / "keep", tmp_path / "gone"
    tree(keep, files=4)
    tree(gone, files=4, size=2 * MiB, seed=3)
    image, _, _ = rpi_image(tmp_path, keep, gone, root=32 * MiB)
    usage = usage_of(image)
    data = image.read_bytes()
    cost, drive, result = probe_cost(image, len(data), len(data) + 8 * MiB, loops=loop_factory)
    assert result["bytes_unused"] == usage.skipped > 0
    positions = plan_positions(len(data) + 8 * MiB, 512, flash_bounds(len(data)))
    written = [p for p in positions
               if p >= HEAD and any(o <= p and p + 512 <= o + n for o, n in usage.ranges)]
    assert 0 < len(written) < len(positions) - 1
    assert any(p < len(data) and p not in written for p in positions)  # in free space
    stamped_over = [p for p in positions if p + 512 <= head_length(data[:HEAD])]
    assert stamped_over  # by the head's stamp: left
    head = head_length(data[:HEAD])
    assert cost == 512 * (2 * len(positions) - len(written) - len(stamped_over)) + flush_cost(
        len(data) + 8 * MiB, positions, lambda p: p + 512 <= head or any(
            o <= p and p + 512 <= o + n for o, n in usage.ranges))
    on_drive = drive.read()
    position = 0
    for offset, length in usage.ranges:
        assert on_drive[offset:offset + length] == data[offset:offset + length]
        assert on_drive.count(PATTERN, position, offset) == offset - position  # skipped: old
        position = offset + length
    assert filled(on_drive[position:])


def test_what_a_flash_certainly_writes_leaves_out_its_head() -> None:
    """The head is written last, only when the rest read back right: not certain."""
    assert certainly_written(8 * MiB, None, head=MiB) == ((MiB, 7 * MiB),)
    assert certainly_written(MiB // 2, None, head=MiB) == ()
    block_map = bmap.Bmap("x.bmap", "2.0", 8 * MiB, 4096, "sha256", (
        bmap.Extent(0, 64 << 10), bmap.Extent(512 << 10, MiB), bmap.Extent(4 * MiB, MiB)))
    assert certainly_written(8 * MiB, block_map, head=MiB) == ((MiB, 512 << 10), (4 * MiB, MiB))
    for unknown in ({"skip_identical": True}, {"streamed": True}):
        assert certainly_written(8 * MiB, None, head=MiB, **unknown) == ()  # type: ignore[arg-type]


@needs_root
@pytest.mark.parametrize("command", ["probe", "flash"])
def test_a_block_that_refuses_writes_leaves_no_other_stamp_and_is_named(
        faulty_drive: Callable[..., FaultyDrive], tmp_path: Path, command: str) -> None:
    """The lowest stamp, written last, fails; putting back (last written first) fails there
    again, and every other block is still put back.  The user reads the probe's own error and
    the block not put back (before: the put-back stopped at its first failure, leaving the
    other stamps on the drive, and its error replaced the probe's)."""
    bad = PROTECTED
    drive = faulty_drive(64 * MiB, fill=PATTERN, bad_write=(bad, bad + 512))
    if command == "probe":
        proc = probe_cli(drive.path, "--yes", "--json")
    else:
        image = tmp_path / "disk.img"
        image.write_bytes(os.urandom(8 * MiB))
        proc = subprocess.run([*popsicle_cmd(), "flash", str(image), drive.path, "--yes",
                               "--json"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (result,) = json.loads(proc.stdout.splitlines()[-1])["results"]
    assert drive.read(0, 64 * MiB) == bytes([PATTERN]) * (64 * MiB)
    assert (result["status"], result["cause"]) == ("failed", "io-error"), result
    said = (f"probe failed: Input/output error at offset {bad}; 1 block the probe wrote not "
            f"put back: Input/output error at offset {bad}")
    assert result["error"] == (f"{drive.path}: {said}" if command == "probe" else
                               f"{drive.path}: I/O error: {said} (the drive may be failing)")


@needs_root
def test_a_block_gone_bad_after_its_stamp_fails_a_passing_probe_alone(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    """A genuine drive whose block at 64 KiB takes the probe's stamp, then refuses its
    put-back, the first one tried (that block is stamped last): every other block is still
    put back, and the drive fails naming that block (before: nothing after it was put back,
    and the error named no block)."""
    bad = PROTECTED
    drive = faulty_drive(64 * MiB, fill=PATTERN, bad_write_from=(bad, bad + 512, 2))
    proc = probe_cli(drive.path, "--yes", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    on_drive = drive.read(0, 64 * MiB)
    assert on_drive[bad:bad + 512] != bytes([PATTERN]) * 512  # its stamp, not put back
    assert filled(on_drive[:bad] + on_drive[bad + 512:])
    (result,) = json.loads(proc.stdout.splitlines()[-1])["results"]
    assert (result["status"], result["cause"]) == ("failed", "io-error"), result
    assert result["error"] == (f"{drive.path}: probe failed: 1 block the probe wrote not put "
                               f"back: Input/output error at offset {bad}"), result


@needs_root
def test_a_flash_whose_probe_passes_but_cannot_put_back_leaves_no_stamp(
        faulty_drive: Callable[..., FaultyDrive], tmp_path: Path) -> None:
    """A passing probe leaves its stamps inside the image's range (the flash overwrites them)
    and its head (put back after the flash's own stamp).  A block that refuses its put-back
    fails the drive, so nothing is written: those stamps go back too, and only the bad block
    keeps one (before: the put-back's error, naming no block, and every stamp inside the
    image left on the drive)."""
    last = 64 * MiB - 512
    drive = faulty_drive(64 * MiB, fill=PATTERN, bad_write_from=(last, last + 512, 2))
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(8 * MiB))
    proc = subprocess.run([*popsicle_cmd(), "flash", str(image), drive.path, "--yes", "--json"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    on_drive = drive.read(0, 64 * MiB)
    assert filled(on_drive[:last])
    assert on_drive[last:] != bytes([PATTERN]) * 512  # its stamp, not put back
    (result,) = json.loads(proc.stdout.splitlines()[-1])["results"]
    assert (result["status"], result["cause"], result["bytes_written"]) == (
        "failed", "io-error", 0), result
    assert result["error"] == (
        f"{drive.path}: I/O error: probe failed: 1 block the probe wrote not put back: "
        f"Input/output error at offset {last} (the drive may be failing)"), result
