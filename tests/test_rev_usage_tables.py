"""Partition tables that name more metadata than an image could hold are refused before it is
read: the image is written whole, with a note, and nothing like its size is read into memory."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

from tests.fs_images import needs_fs_tools, partition, run

pytestmark = needs_fs_tools

ROOT = Path(__file__).resolve().parent.parent


def test_gpt_entries_of_two_gib_each_are_not_read(tmp_path: Path) -> None:
    image = tmp_path / "gpt.img"
    with open(image, "wb") as f:
        f.truncate(6 << 30)  # sparse
    partition(image, "2048,100000,L\n", label="gpt")
    with open(image, "r+b") as f:
        f.seek(512)
        header = bytearray(f.read(92))
        struct.pack_into("<II", header, 80, 4096, 1 << 31)  # 4096 entries of 2 GiB
        struct.pack_into("<I", header, 16, 0)
        struct.pack_into("<I", header, 16, zlib.crc32(bytes(header)))  # a header that holds
        f.seek(512)
        f.write(header)
    # 1 GiB of address space: reading the "entries" (the image, 6 GiB) ended in MemoryError.
    code = ("import sys; from pathlib import Path; from tests.fs_images import usage_of; "
            "u = usage_of(Path(sys.argv[1])); print(u.ranges); print(u.notes[0])")
    proc = subprocess.run(["sh", "-c", 'ulimit -v 1000000; exec "$@"', "sh", sys.executable,
                           "-c", code, str(image)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"(({0}, {6 << 30}),)",
        "the partition table is not consistent (the GPT's partition entries are of an unusual "
        "size): written whole"]


def test_ext_descriptors_of_32_kib_each_are_not_read(tmp_path: Path) -> None:
    image = tmp_path / "ext.img"
    with open(image, "wb") as f:
        f.truncate(8 << 30)  # sparse
    run("mke2fs", "-q", "-F", "-t", "ext2", "-b", "1024", "-g", "256", "-O", "^resize_inode",
        "-N", "32768", "-E", "nodiscard", str(image))
    with open(image, "r+b") as f:  # 64bit, 32 KiB descriptors: 32768 groups' are 1 GiB
        f.seek(1024 + 0x60)
        incompat, = struct.unpack("<I", f.read(4))
        f.seek(1024 + 0x60)
        f.write(struct.pack("<I", (incompat | 0x80) & ~0x10))
        f.seek(1024 + 0xFE)
        f.write(struct.pack("<H", 32768))
    code = ("import sys; from pathlib import Path; from tests.fs_images import usage_of; "
            "u = usage_of(Path(sys.argv[1])); print(u.ranges); print(u.notes[0])")
    proc = subprocess.run(["sh", "-c", 'ulimit -v 1000000; exec "$@"', "sh", sys.executable,
                           "-c", code, str(image)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"(({0}, {8 << 30}),)",
        "the image: its group descriptor size is not possible: written whole"]
