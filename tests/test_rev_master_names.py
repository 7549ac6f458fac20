"""``read`` of several drives into names that are one file on the disk they go to.

On FAT, exFAT and NTFS (external disks where images are kept) ``A.img`` and ``a.img`` are one
file: both pairs' temporary files were renamed to it, the second replacing the first, and
the run said "2 of 2 drives ok" with one drive's image gone.  Refused now, before anything is
read, whatever the file system (a real exFAT through exfat-fuse shows the loss).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Loop, needs_root, popsicle_cmd
from loopdev import attach, detach

MiB = 1 << 20
MOUNT_EXFAT = shutil.which("mount.exfat-fuse")
MKFS_EXFAT = shutil.which("mkfs.exfat")

pytestmark = needs_root


def popsicle(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=False)


@pytest.fixture
def exfat_dir() -> Iterator[Path]:
    """A directory on a fresh exFAT file system (exfat-fuse over a loop device)."""
    # This kernel has no exFAT nor FAT driver: the FUSE one (Debian's exfat-fuse, .ci/run).
    assert MOUNT_EXFAT is not None and MKFS_EXFAT is not None, \
        "needs exfat-fuse (mount.exfat-fuse) and exfatprogs (mkfs.exfat): see .ci/run"
    work = Path(tempfile.mkdtemp(prefix="popsicle-exfat-", dir="/dev/shm"))
    backing, mountpoint = work / "fs.img", work / "mnt"
    mountpoint.mkdir()
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run([MKFS_EXFAT, str(backing)], check=True, capture_output=True)
    loop = attach(backing)
    try:
        subprocess.run([MOUNT_EXFAT, loop, str(mountpoint)], check=True, capture_output=True)
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True)
    finally:
        detach(loop, backing)
        shutil.rmtree(work, ignore_errors=True)


def drive(loop_factory: Callable[..., Loop], fill: int) -> Loop:
    return loop_factory(4 * MiB, fill=fill)


def test_two_outputs_one_file_on_exfat_are_refused(loop_factory: Callable[..., Loop],
                                                  exfat_dir: Path) -> None:
    a, b = drive(loop_factory, 0xA1), drive(loop_factory, 0xB2)
    result = popsicle("read", a.path, exfat_dir / "A.img", b.path, exfat_dir / "a.img")
    assert result.returncode == 2, (result.stdout, sorted(p.name for p in exfat_dir.iterdir()))
    assert result.stderr == (f"popsicle-py: {exfat_dir}/a.img and {exfat_dir}/A.img differ "
                             "only in case: on a FAT, exFAT or NTFS file system they are one "
                             "file; give each pair its own OUTPUT\n")
    assert list(exfat_dir.iterdir()) == []


def test_two_block_maps_one_file_are_refused(loop_factory: Callable[..., Loop],
                                             tmp_path: Path) -> None:
    """Their sidecars too: ``a.img.zst`` and ``A.img.xz`` both write ``?.img.bmap``."""
    a, b = drive(loop_factory, 0xA1), drive(loop_factory, 0xB2)
    result = popsicle("read", a.path, tmp_path / "a.img.zst", b.path, tmp_path / "A.img.xz",
                      "--bmap")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"popsicle-py: {tmp_path}/A.img.xz (A.img.bmap) and "
                             f"{tmp_path}/a.img.bmap differ only in case: on a FAT, exFAT or "
                             "NTFS file system they are one file; give each pair its own "
                             "OUTPUT\n")
    assert list(tmp_path.iterdir()) == []
