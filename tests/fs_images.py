"""Disk images with real file systems for the tests of writing only what they use.

Built with the real tools (mke2fs, mkfs.vfat, sfdisk, debugfs, mtools) on files whose free
space is random before mkfs and holds deleted files' data after: a skipped byte is never
what a drive held before by chance.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from popsicle_py.usage import Usage, image_usage

#: The tests that make file systems and read them back with an independent reader.
needs_fs_tools = pytest.mark.skipif(
    shutil.which("mke2fs") is None or shutil.which("mcopy") is None,
    reason="needs e2fsprogs, dosfstools and mtools")

MiB = 1 << 20


def run(*args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True,  # type: ignore[call-overload, no-any-return]
                          **kwargs)


def garbage(path: Path, size: int, seed: int = 1) -> None:
    """``size`` bytes of random data (fast: one random MiB repeated, shifted per MiB)."""
    block = random.Random(seed).randbytes(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(block[i % 997 :] + block[: i % 997])
        f.write(block[: size % MiB])


def tree(root: Path, files: int = 12, size: int = 300 << 10, seed: int = 7) -> dict[str, str]:
    """Random files (and a subdirectory) under ``root``; their sha256 by relative path."""
    rng = random.Random(seed)
    sums = {}
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        rel = f"sub/f{i}.bin" if i % 3 == 0 else f"f{i}.bin"
        data = rng.randbytes(rng.randrange(1, size))
        (root / rel).write_bytes(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


@dataclass(frozen=True)
class Fs:
    """A file system at ``offset`` of ``image``, ``length`` bytes, holding ``files``."""

    image: Path
    offset: int
    length: int
    kind: str  # "ext" or "fat"
    files: dict[str, str]


def make_ext(image: Path, offset: int, length: int, content: Path, *,
             options: Sequence[str] = (), deleted: Path | None = None,
             fstype: str = "ext4") -> None:
    """mke2fs at ``offset`` of ``image``, filled from ``content``; ``deleted``'s files are
    written first and removed, so that their data lies in free blocks."""
    run("mke2fs", "-q", "-F", "-t", fstype, "-E", f"nodiscard,offset={offset}", *options,
        "-d", str(deleted or content), str(image), f"{length // 1024}k")
    if deleted is None:
        return
    part = image.with_suffix(".part")
    extract(image, offset, length, part)
    script = [f"rm {p.name}" for p in deleted.iterdir() if p.is_file()]
    script.append("mkdir sub")
    script += [f"write {p} {p.relative_to(content)}" for p in sorted(content.rglob("*"))
               if p.is_file()]
    run("debugfs", "-w", "-f", "-", str(part), input="\n".join(script) + "\n")
    splice(part, image, offset)
    part.unlink()


def make_fat(image: Path, offset: int, length: int, content: Path,
             options: Sequence[str] = ()) -> None:
    """mkfs.vfat at ``offset``, then ``content`` copied in with mtools."""
    run("mkfs.vfat", "--offset", str(offset // 512), *options, str(image),
        str(length // 1024))
    at = f"{image}@@{offset}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    run("mmd", "-i", at, "::sub", env=env)
    for path in sorted(content.rglob("*")):
        if path.is_file():
            run("mcopy", "-i", at, str(path), f"::{path.relative_to(content)}", env=env)


def extract(image: Path, offset: int, length: int, out: Path) -> None:
    with open(image, "rb") as src, open(out, "wb") as dst:
        src.seek(offset)
        left = length
        while left:
            chunk = src.read(min(left, 8 * MiB))
            if not chunk:
                break
            dst.write(chunk)
            left -= len(chunk)


def splice(part: Path, image: Path, offset: int) -> None:
    with open(part, "rb") as src, open(image, "r+b") as dst:
        dst.seek(offset)
        while chunk := src.read(8 * MiB):
            dst.write(chunk)


def partition(image: Path, layout: str, label: str = "dos") -> None:
    """sfdisk ``layout`` ("start,size,type" lines, in sectors) onto ``image``."""
    run("sfdisk", "-q", str(image), input=f"label: {label}\n{layout}")


def trimmed_copy(image: Path, ranges: Sequence[tuple[int, int]], out: Path,
                 seed: int = 99) -> None:
    """What a drive prefilled with other garbage holds once only ``ranges`` were written."""
    garbage(out, image.stat().st_size, seed)
    with open(image, "rb") as src, open(out, "r+b") as dst:
        for offset, length in ranges:
            src.seek(offset)
            dst.seek(offset)
            dst.write(src.read(length))


def ext_files(image: Path, offset: int, length: int, names: Sequence[str]) -> dict[str, str]:
    """sha256 of each file read from the ext file system through debugfs."""
    part = image.with_suffix(".check")
    extract(image, offset, length, part)
    sums = {}
    try:
        for name in names:
            out = image.with_suffix(".file")
            run("debugfs", "-R", f"dump /{name} {out}", str(part))
            sums[name] = hashlib.sha256(out.read_bytes()).hexdigest()
            out.unlink()
    finally:
        part.unlink()
    return sums


def fat_files(image: Path, offset: int, names: Sequence[str]) -> dict[str, str]:
    """sha256 of each file read from the FAT volume through mtools."""
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    sums = {}
    for name in names:
        data = subprocess.run(["mtype", "-i", f"{image}@@{offset}", f"::{name}"], check=True,
                              capture_output=True, env=env).stdout
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def fsck(tool: Sequence[str], image: Path, offset: int,
         length: int) -> subprocess.CompletedProcess[str]:
    """``tool`` run on a copy of the file system at ``offset`` (its exit status says)."""
    part = image.with_suffix(".fsck")
    extract(image, offset, length, part)
    try:
        return run(*tool, str(part), check=False)
    finally:
        part.unlink()


def e2fsck(image: Path, offset: int, length: int) -> subprocess.CompletedProcess[str]:
    return fsck(("e2fsck", "-fn"), image, offset, length)


def fsck_vfat(image: Path, offset: int, length: int) -> subprocess.CompletedProcess[str]:
    return fsck(("fsck.vfat", "-n"), image, offset, length)


def usage_of(image: Path) -> Usage:
    """What popsicle_py.usage finds in an image file."""
    with open(image, "rb") as f:
        def read_at(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)
        return image_usage(read_at, image.stat().st_size)


def rpi_image(tmp_path: Path, keep: Path, gone: Path, label: str = "dos",
              root: int = 104 * MiB) -> tuple[Path, int, int]:
    """A Raspberry-Pi-like image: FAT32 boot (48 MiB) at 4 MiB, ext4 root after it (``root``
    bytes, ``gone``'s files deleted in it), 4 MiB left over; (image, boot's and root's offset)."""
    image = tmp_path / "rpi.img"
    fat_at, fat_len = 4 * MiB, 48 * MiB
    ext_at = fat_at + fat_len
    size = ext_at + root + 4 * MiB
    garbage(image, size)
    types = ("c", "83") if label == "dos" else ("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
                                                "0FC63DAF-8483-4772-8E79-3D69E4779E5A")
    partition(image, f"{fat_at // 512},{fat_len // 512},{types[0]}\n"
                     f"{ext_at // 512},{root // 512},{types[1]}\n", label)
    make_fat(image, fat_at, fat_len, keep, ["-F", "32"])
    make_ext(image, ext_at, root, keep, options=["-b", "4096"], deleted=gone)
    return image, fat_at, ext_at
