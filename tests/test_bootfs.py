"""Writing a drive's boot partition: on loop devices holding a Raspberry-Pi-like image, the files
read back with mtools, ``fsck.vfat -n`` is clean and nothing outside the boot partition moved."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pi_image
import pytest
from conftest import needs_root
from loopdev import Loop

from popsicle_py.settings import BootFsError, SettingsError, inspect_boot, write_boot_files
from popsicle_py.settings import bootfs as bootfs_mod
from popsicle_py.settings.fat import BootPartition
from popsicle_py.settings.plan import BootImage

pytestmark = needs_root
FILES = {"user-data": b"#cloud-config\nhostname: \"pi-07\"\n", "meta-data": b"instance-id: a\n",
         "network-config": b"network:\n  version: 2\n", "cmdline.txt": b"console=tty1 x\n"}


def reader(path: Path) -> Callable[[int, int], bytes]:
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            return os.pread(f.fileno(), length, offset)
    return read


def on_loop(tmp_path: Path, loop_factory: Callable[..., Loop], table: str,
            cloud_init: bool = False, fat: int = 32) -> tuple[Path, Loop, BootImage]:
    image = pi_image.build(tmp_path, table=table, cloud_init=cloud_init, fat=fat)
    loop = loop_factory(image.stat().st_size)
    with open(loop.path, "r+b") as dev:
        dev.write(image.read_bytes())
    return image, loop, inspect_boot(reader(image), None)


def write(loop: Loop, part: BootPartition, files: dict[str, bytes]) -> str:
    """As the engine calls it: on the drive's open descriptor (O_EXCL, O_DIRECT)."""
    fd = os.open(loop.path, os.O_RDWR | os.O_EXCL | os.O_DIRECT)
    try:
        digest = write_boot_files(fd, part, files)
        assert digest is not None  # None: stopped, which nothing here asks
        return digest
    finally:
        os.close(fd)


def mtype(loop: Loop, offset: int, name: str) -> bytes:
    return subprocess.run(["mtype", "-i", f"{loop.path}@@{offset}", f"::/{name}"],
                          check=True, capture_output=True,
                          env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout


@pytest.mark.parametrize("table,fat", [("mbr", 32), ("gpt", 32), ("mbr", 16)])
def test_files_read_back_and_nothing_else_moved(tmp_path: Path, loop_factory: Callable[..., Loop],
                                                table: str, fat: int) -> None:
    image, loop, boot = on_loop(tmp_path, loop_factory, table, fat=fat)
    assert boot.partition.table == table and boot.format == "firstrun"
    part = boot.partition
    digest = write(loop, part, FILES)
    assert len(digest) == 64
    for name, data in FILES.items():
        assert mtype(loop, part.offset, name) == data
    assert mtype(loop, part.offset, "config.txt") == pi_image.CONFIG
    assert mtype(loop, part.offset, "start4.elf") == bytes(range(256)) * 4096
    window = subprocess.run(["losetup", "-r", "-f", "--show", "-o", str(part.offset),
                             "--sizelimit", str(part.size), loop.path],
                            check=True, capture_output=True, text=True).stdout.strip()
    try:
        fsck = subprocess.run(["fsck.vfat", "-n", window], capture_output=True, text=True)
    finally:
        subprocess.run(["losetup", "-d", window], check=True)
    assert fsck.returncode == 0, fsck.stdout
    original, written = image.read_bytes(), Path(loop.backing).read_bytes()
    end = part.offset + part.size
    assert written[:part.offset] == original[:part.offset]
    assert written[end:len(original)] == original[end:]


def test_cloud_init_image_is_detected(tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    _, _, boot = on_loop(tmp_path, loop_factory, "gpt", cloud_init=True)
    assert boot.format == "cloud-init"


def test_image_without_fat_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "plain.img"
    image.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(SettingsError, match="no partition table"):
        inspect_boot(reader(image), None)


def test_a_write_outside_the_files_fails_the_drive(tmp_path: Path,
                                                   loop_factory: Callable[..., Loop],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that also touched another file's cluster is caught by the block comparison."""
    _, loop, boot = on_loop(tmp_path, loop_factory, "mbr")
    part = boot.partition
    real = bootfs_mod._mcopy
    firmware_at = Path(loop.backing).read_bytes().find(bytes(range(256)) * 16, part.offset)

    def stray(fd: int, where: object, files: object, *stopped: object) -> None:
        real(fd, part, FILES)
        with open(loop.path, "r+b") as dev:
            dev.seek(firmware_at + 8192)
            dev.write(b"X")

    monkeypatch.setattr(bootfs_mod, "_mcopy", stray)
    with pytest.raises(BootFsError, match="changed outside the files written"):
        write(loop, part, FILES)


def test_a_stopped_lane_runs_nothing_and_changes_nothing(tmp_path: Path,
                                                         loop_factory: Callable[..., Loop]
                                                         ) -> None:
    """Stopped once the partition was read: no mcopy runs, the drive is the image still, and
    the step says so with None (no digest: nothing was written)."""
    image, loop, boot = on_loop(tmp_path, loop_factory, "mbr")
    reads = 0

    def stopped() -> bool:
        nonlocal reads
        reads += 1
        return reads > 3
    fd = os.open(loop.path, os.O_RDWR | os.O_EXCL | os.O_DIRECT)
    try:
        assert write_boot_files(fd, boot.partition, FILES, stopped=stopped) is None
    finally:
        os.close(fd)
    assert reads > 3
    assert Path(loop.backing).read_bytes()[:image.stat().st_size] == image.read_bytes()


def mdir_free_bytes(image: Path, offset: int) -> int:
    """mtools' own count of the free space (an independent reader of the FAT)."""
    out = subprocess.run(["mdir", "-i", f"{image}@@{offset}", "::/"], capture_output=True,
                         text=True, check=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}
                         ).stdout
    (line,) = [line for line in out.splitlines() if line.endswith("bytes free")]
    return int(line.removesuffix("bytes free").replace(" ", ""))


@pytest.mark.parametrize("table,fat", [("mbr", 32), ("gpt", 32), ("mbr", 16)])
def test_files_that_fit_by_the_count_are_written_and_one_cluster_more_is_refused(
        tmp_path: Path, loop_factory: Callable[..., Loop], table: str, fat: int) -> None:
    """The free space counted from the image's FAT is mtools' (mdir); files that fill it
    exactly by the count are written (mcopy says no "Disk full", fsck.vfat is clean), and a
    byte more is refused before any write."""
    image, loop, boot = on_loop(tmp_path, loop_factory, table, fat=fat)
    space = boot.space
    assert space.free * space.cluster == mdir_free_bytes(image, boot.partition.offset)
    sizes = {**{n: len(d) for n, d in FILES.items()}, "big.bin": 0}
    base = space.clusters_for(sizes)
    assert base is not None
    files = {**FILES, "big.bin": os.urandom((space.free - base) * space.cluster)}
    assert space.refusal({n: len(d) for n, d in files.items()}) is None
    assert space.refusal({**{n: len(d) for n, d in files.items()},
                          "big.bin": len(files["big.bin"]) + 1}) is not None
    write(loop, boot.partition, files)
    assert mtype(loop, boot.partition.offset, "big.bin") == files["big.bin"]


def test_mcopys_messages_are_shown_each_on_its_own(tmp_path: Path,
                                                   loop_factory: Callable[..., Loop]) -> None:
    """mtools ends its geometry warning without a newline: "...for device)Disk full" was one
    run-together message; the step's line shows each."""
    _, loop, boot = on_loop(tmp_path, loop_factory, "mbr")
    with pytest.raises(BootFsError) as caught:
        write(loop, boot.partition, {"big.bin": b"x" * (45 << 20)})
    message = str(caught.value)
    assert message.startswith("mcopy failed: "), message
    assert message.endswith("; Disk full") and ")Disk" not in message, message


def test_a_fat16_root_directory_that_would_overflow_is_refused(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """FAT12/16's root directory has a fixed number of entries: files that take every free
    one by the count (a long name takes more than one) are written; one more is refused."""
    _, loop, boot = on_loop(tmp_path, loop_factory, "mbr", fat=16)
    space = boot.space
    assert not space.root_grows
    free = space.root_slots - sum(
        -(-len(n) // 13) + 1 for n in FILES)
    files = {**FILES, **{f"welcome-{n:05}": b"hi\n" for n in range(free // 2)}}  # 2 slots each
    sizes = {n: len(d) for n, d in files.items()}
    assert space.refusal(sizes) is None
    why = space.refusal({**sizes, "one-more.txt": 3})
    # The slots needed and the slots free, in the same unit (it said "2 entries", "3 slots").
    need = sum(-(-len(n) // 13) + 1 for n in sizes) + 2
    assert why is not None and f"need {need} slots in the root directory" in why, why
    assert f"which has room for {space.root_slots} (each name" in why, why
    write(loop, boot.partition, files)
    assert mtype(loop, boot.partition.offset, f"welcome-{free // 2 - 1:05}") == b"hi\n"
