"""flash --customize refuses at load (one line, exit 2, no drive written) what would otherwise
fail every drive after its whole write, or end in an "unexpected error": a dirty boot FAT, a
file system larger than its partition, a boot partition inside the head the engine writes
last, a directory named like a file the format writes, a truncated or nonsense boot sector,
odd CSV cells, a NUL in a [files] path, a device given as the settings or the values.  A
customised drive's result has no device_sha256 (its boot files are not the image's bytes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pi_image
import pytest
from conftest import Loop
from loopdev import python_env
from test_customize import FILL, KEYS, SETTINGS, inputs, one_line, popsicle, summary_of

from popsicle_py.engine.head import head_length

pytestmark = pytest.mark.root
BOOT = 4 << 20  # where pi_image puts the boot partition
MIB = 1 << 20


def _refused(tmp_path: Path, image: Path, loop_factory: Callable[..., Loop], *extra: object,
             toml: Path | None = None, values: Path | None = None, size: int | None = None
             ) -> str:
    """The one line a flash of ``image`` with the settings says; the drive untouched."""
    if toml is None or values is None:
        toml, values = inputs(tmp_path)
    loop = loop_factory(size or image.stat().st_size, fill=FILL)
    done = popsicle("flash", image, loop.path, "--yes", "--customize", toml, "--values",
                    values, *extra, timeout=60, limited=True)
    line = one_line(done)
    assert "unexpected error" not in line, line
    assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size
    return line


def _poke(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("fat", [32, 16])
def test_a_dirty_boot_fat_is_refused_at_load(tmp_path: Path, fat: int,
                                             loop_factory: Callable[..., Loop]) -> None:
    """A golden image read from a Pi with its boot partition mounted: fsck.vfat -n says
    "Dirty bit is set" (exit 1) on every drive, after its whole write."""
    image = pi_image.build(tmp_path, fat=fat)
    at = BOOT + (65 if fat == 32 else 37)
    _poke(image, at, bytes([image.read_bytes()[at] | 1]))
    line = _refused(tmp_path, image, loop_factory)
    assert "marked dirty" in line and "fsck.vfat -a" in line, line


def test_a_boot_fat_larger_than_its_partition_is_refused_at_load(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image = pi_image.build(tmp_path, table="mbr")  # 40 MiB of FAT32 in its partition
    _poke(image, 446 + 12, ((39 * MIB) // 512).to_bytes(4, "little"))
    line = _refused(tmp_path, image, loop_factory)
    assert "larger than its partition" in line, line


def test_a_boot_partition_inside_the_head_is_refused_at_load(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """A GPT of 1024 entries (128 KiB) whose FAT begins at 256 KiB: the engine's head is
    1 MiB (its table is not all in the first 64 KiB), stamped until the boot files are
    written: the flash read the stamp as the boot sector and failed every drive."""
    boot = tmp_path / "boot.vfat"
    with open(boot, "wb") as f:
        f.truncate(40 * MIB)
    subprocess.run(["mkfs.vfat", "-F", "32", str(boot)], check=True, capture_output=True)
    image = tmp_path / "early.img"
    with open(image, "wb") as f:
        f.truncate(256 * 1024 + 42 * MIB)
    script = ("label: gpt\ntable-length: 1024\nfirst-lba: 264\n"
              f"start=512, size={40 * MIB // 512}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n")
    subprocess.run(["sfdisk", "-q", str(image)], input=script.encode(), check=True,
                   capture_output=True)
    _poke(image, 256 * 1024, boot.read_bytes())
    assert head_length(image.read_bytes()[:64 << 10]) == MIB
    line = _refused(tmp_path, image, loop_factory)
    assert "is written last" in line, line


@pytest.mark.parametrize(("name", "fmt"), [("firstrun.sh", "firstrun"),
                                           ("meta-data", "cloud-init"),
                                           ("network-config", "cloud-init")])
def test_a_boot_directory_named_like_a_written_file_is_refused_at_load(
        tmp_path: Path, loop_factory: Callable[..., Loop], name: str, fmt: str) -> None:
    image = pi_image.build(tmp_path)
    subprocess.run(["mmd", "-i", f"{image}@@{BOOT}", f"::/{name}"], check=True)
    line = _refused(tmp_path, image, loop_factory, "--customize-format", fmt)
    assert f"has a directory named {name}" in line, line


@pytest.mark.parametrize(("xz", "table", "cut"), [(False, "mbr", BOOT + 20000),
                                                  (True, "mbr", BOOT + 20000),
                                                  (False, "gpt", 580)])  # in GPT's header
def test_a_truncated_image_is_refused_at_load(tmp_path: Path, xz: bool, table: str, cut: int,
                                              loop_factory: Callable[..., Loop]) -> None:
    image = pi_image.build(tmp_path, table=table)
    with open(image, "r+b") as f:
        f.truncate(cut)
    if xz:
        subprocess.run(["xz", "-0", "-T1", str(image)], check=True)
        image = image.with_name(image.name + ".xz")
    line = _refused(tmp_path, image, loop_factory, "--force", size=BOOT + 1 * MIB)
    assert "cannot customise this image" in line, line


@pytest.mark.parametrize(("offset", "value"), [(36, 1), (32, 100), (36, 0xFFFFFFFF)])
def test_a_nonsense_boot_sector_is_refused_at_load(tmp_path: Path, offset: int, value: int,
                                                   loop_factory: Callable[..., Loop]) -> None:
    """FAT32 sectors per FAT of 1 (or huge), total sectors of 100."""
    image = pi_image.build(tmp_path)
    _poke(image, BOOT + offset, value.to_bytes(4, "little"))
    line = _refused(tmp_path, image, loop_factory)
    assert "cannot customise this image" in line, line


@pytest.mark.parametrize(("rows", "said"), [
    (f"seq,hostname,ssh_key\n\u00b2,pi-01,{KEYS[0]}\n", "seq '²' is not a number"),
    # A slot is a label (A1): ² is one, of no drive here.
    (f"slot,hostname,ssh_key\n\u00b2,pi-01,{KEYS[0]}\n", "has no row for drive 1"),
    (f"seq,hostname,ssh_key\n1,{'x' * (128 << 10)}y,{KEYS[0]}\n", "line 2:"),
], ids=["superscript-seq", "superscript-slot", "huge-cell"])  # a 128 KiB id reaches the
# programs' environment (PYTEST_CURRENT_TEST), past the kernel's limit for one string
def test_odd_csv_cells_are_refused(tmp_path: Path, loop_factory: Callable[..., Loop],
                                   rows: str, said: str) -> None:
    image = pi_image.build(tmp_path)
    toml, values = inputs(tmp_path, rows=rows)
    line = _refused(tmp_path, image, loop_factory, toml=toml, values=values)
    assert "class.csv" in line and said in line, line


def test_a_nul_in_a_files_path_is_refused(tmp_path: Path,
                                          loop_factory: Callable[..., Loop]) -> None:
    image = pi_image.build(tmp_path)
    toml, values = inputs(tmp_path, SETTINGS + '[files]\n"a.txt" = "a\\u0000b"\n')
    line = _refused(tmp_path, image, loop_factory, toml=toml, values=values)
    assert "[files] 'a.txt'" in line and "NUL" in line, line


@pytest.mark.parametrize("which", ["settings", "values"])
def test_a_device_as_settings_or_values_is_refused(tmp_path: Path, which: str,
                                                   loop_factory: Callable[..., Loop]) -> None:
    """/dev/zero was read until memory ran out."""
    image = pi_image.build(tmp_path)
    toml, values = inputs(tmp_path)
    if which == "settings":
        toml = Path("/dev/zero")
    else:
        values = Path("/dev/zero")
    line = _refused(tmp_path, image, loop_factory, toml=toml, values=values)
    assert line.endswith("/dev/zero: not a regular file (a character device)"), line


def test_a_fifo_as_values_is_refused(tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image = pi_image.build(tmp_path)
    toml, _ = inputs(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    line = _refused(tmp_path, image, loop_factory, toml=toml, values=tmp_path / "fifo")
    assert "not a regular file (a FIFO)" in line, line


def test_a_customised_drive_has_no_device_sha256(tmp_path: Path,
                                                 loop_factory: Callable[..., Loop]) -> None:
    """Its boot files are written after the verify pass: the drive does not hold the image's
    bytes, and no digest may say it does; a plain flash (read back whole) still has one."""
    image = pi_image.build(tmp_path)
    toml, values = inputs(tmp_path)
    loop = loop_factory(image.stat().st_size)
    done = popsicle("flash", image, loop.path, "--yes", "--json", "--no-trim", "--customize",
                    toml, "--values", values)
    assert done.returncode == 0, done.stderr
    (result,) = summary_of(done.stdout)["results"]
    assert result["customized"] is not None and result["device_sha256"] is None, result
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["device_sha256"] for e in results if e["event"] == "result"] == [None]
    plain = popsicle("flash", image, loop.path, "--yes", "--json", "--no-trim")
    assert plain.returncode == 0, plain.stderr
    assert summary_of(plain.stdout)["results"][0]["device_sha256"]


def test_a_fat32_mtools_misreads_is_refused_at_load(tmp_path: Path,
                                                    loop_factory: Callable[..., Loop]) -> None:
    """FAT32 with fewer than 65525 clusters: mcopy takes it for FAT16 and fails every drive
    ("No directory slots") after its write; fsck.vfat only warns."""
    image = pi_image.build(tmp_path)
    boot = tmp_path / "few.vfat"
    with open(boot, "wb") as f:
        f.truncate(32 * MIB)
    subprocess.run(["mkfs.vfat", "-F", "32", "-s", "1", str(boot)], check=True,
                   capture_output=True)
    _poke(image, BOOT, boot.read_bytes())
    line = _refused(tmp_path, image, loop_factory, "--customize-format", "cloud-init")
    assert "FAT32 with" in line and "fewer than the 65525" in line, line


def test_a_fat32_without_mirroring_is_refused_at_load(tmp_path: Path,
                                                      loop_factory: Callable[..., Loop]) -> None:
    """mtools writes the active FAT only: the first, read back, would not hold the files."""
    image = pi_image.build(tmp_path)
    for sector in (0, 6):  # and its backup, as fsck.vfat compares them
        _poke(image, BOOT + sector * 512 + 40, b"\x81")
    line = _refused(tmp_path, image, loop_factory)
    assert "FAT mirroring off" in line, line



def test_a_partition_table_pointing_far_into_a_compressed_image_is_refused(
        tmp_path: Path) -> None:
    """A GPT whose entries lie 900 MiB into a 1 GiB image, as zstd: the load decoded the
    image that far into memory (a MemoryError under a 1 GiB address space, or a machine's
    memory for a larger image).  It decodes at most 256 MiB now and says why it stops.
    (The load alone, as a library calls it: a flash checks the drive's size first.)"""
    image = pi_image.build(tmp_path, table="gpt")
    data = image.read_bytes()
    far = 900 * MIB
    big = tmp_path / "far.img"
    with open(big, "wb") as f:
        f.write(data[:512 + 72])
        f.write((far // 512).to_bytes(8, "little"))  # where the entries are
        f.write(data[512 + 80 :])
        f.seek(far)
        f.write(data[1024 : 1024 + 16384])  # the entries, moved there
        f.truncate(1 << 30)
    packed = tmp_path / "far.img.zst"
    subprocess.run(["zstd", "-q", "-1", str(big), "-o", str(packed)], check=True)
    big.unlink()
    toml, values = inputs(tmp_path)
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "from popsicle_py.app.customize import load\n"
            "from popsicle_py.app.requests import CustomizeOptions\n"
            "from popsicle_py.errors import Refused\n"
            "from popsicle_py.images import open_image\n"
            "try:\n"
            f"    load(CustomizeOptions({str(toml)!r}, {str(values)!r}), "
            f"open_image({str(packed)!r}))\n"
            "except Refused as exc:\n"
            "    sys.exit('refused: ' + ' '.join(exc.lines))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=python_env())
    assert "past the first 256 MiB of the decompressed image" in done.stderr, done.stderr


def test_a_compressed_image_whose_boot_directory_lies_far_in_is_customised(
        tmp_path: Path) -> None:
    """A FAT32 boot partition of 512 MiB whose subdirectory's cluster lies past the first
    256 MiB of the image, as .zst: the fsck of the boot partition before the run reads every
    directory, and refused the image as "past the first 256 MiB", which only a directory was.
    That check is skipped there (each drive's boot partition is checked after its write)."""
    boot = tmp_path / "boot.vfat"
    with open(boot, "wb") as f:
        f.truncate(512 * MIB)
    subprocess.run(["mkfs.vfat", "-F", "32", "-s", "8", str(boot)], check=True,
                   capture_output=True)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    cmdline = tmp_path / "cmdline.txt"
    cmdline.write_text("console=serial0,115200 root=PARTUUID=abcdef-02 rootwait\n")
    subprocess.run(["mcopy", "-i", str(boot), str(cmdline), "::/cmdline.txt"], check=True,
                   env=env)
    with open(boot, "r+b") as f:  # FSInfo's next-free hint: the next cluster taken, far in
        f.seek(512 + 492)
        f.write(((300 * MIB) // (8 * 512)).to_bytes(4, "little"))
    subprocess.run(["mmd", "-i", str(boot), "::/overlays"], check=True, env=env)
    image = tmp_path / "far.img"
    with open(image, "wb") as f:
        f.truncate(4 * MIB + 512 * MIB + MIB)
    subprocess.run(["sfdisk", "-q", str(image)], input=f"label: dos\nstart=8192, size="
                   f"{512 * MIB // 512}, type=c\n", text=True, check=True)
    with open(image, "r+b") as f, open(boot, "rb") as b:
        f.seek(4 * MIB)
        while chunk := b.read(16 * MIB):
            f.write(chunk)
    packed = tmp_path / "far.img.zst"
    subprocess.run(["zstd", "-q", "-1", str(image), "-o", str(packed)], check=True)
    toml, values = inputs(tmp_path)
    code = ("from popsicle_py.app.customize import load\n"
            "from popsicle_py.app.requests import CustomizeOptions\n"
            "from popsicle_py.images import open_image\n"
            f"plan = load(CustomizeOptions({str(toml)!r}, {str(values)!r}), "
            f"open_image({str(packed)!r}))\n"
            "print(plan.boot.format)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=python_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "firstrun"
