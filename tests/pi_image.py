"""A Raspberry-Pi-like disk image for the customisation tests, built with the real tools.

MBR or GPT; a FAT32 boot partition (``mkfs.vfat -F 32``) holding config.txt and cmdline.txt
(and, for the cloud-init variant, the NoCloud files Raspberry Pi OS Trixie ships); an ext4 root
made with ``mkfs.ext4 -d`` from a small tree; compressed with xz when asked.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

MIB = 1 << 20
CMDLINE = b"console=serial0,115200 console=tty1 root=PARTUUID=1234abcd-02 rootfstype=ext4 " \
          b"fsck.repair=yes rootwait quiet splash\n"
CONFIG = b"# config.txt\ndtparam=audio=on\ncamera_auto_detect=1\narm_64bit=1\n"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def build(directory: Path, *, table: str = "mbr", cloud_init: bool = False,
          boot_mib: int = 40, root_mib: int = 8, xz: bool = False,
          firmware_mib: int = 0, fat: int = 32) -> Path:
    """The image's path (``.img`` or ``.img.xz``); boot at 4 MiB, root after it.

    ``firmware_mib``: that much more random data in the boot partition (a kernel's worth, for
    the benchmark), in files of 8 MiB."""
    boot = directory / "boot.vfat"
    with open(boot, "wb") as f:
        f.truncate(boot_mib * MIB)
    _run("mkfs.vfat", "-F", str(fat), "-n", "bootfs", str(boot))
    files = {"config.txt": CONFIG, "cmdline.txt": CMDLINE,
             "start4.elf": bytes(range(256)) * 4096}  # 1 MiB of firmware-like bytes
    for n in range(firmware_mib // 8):
        files[f"kernel{n}.img"] = os.urandom(8 * MIB)
    if cloud_init:
        files |= {"user-data": b"#cloud-config\n", "meta-data": b"instance-id: rpios\n",
                  "network-config": b"network:\n  version: 2\n"}
    for name, data in files.items():
        src = directory / name
        src.write_bytes(data)
        _run("mcopy", "-i", str(boot), str(src), f"::/{name}")
    tree = directory / "rootfs"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("raspberrypi\n")
    root = directory / "root.ext4"
    with open(root, "wb") as f:
        f.truncate(root_mib * MIB)
    _run("mkfs.ext4", "-q", "-F", "-d", str(tree), str(root))
    start = 4 * MIB
    total = start + (boot_mib + root_mib) * MIB + (MIB if table == "gpt" else 0)
    image = directory / "pi.img"
    with open(image, "wb") as f:
        f.truncate(total)
    if table == "gpt":
        script = (f"label: gpt\nstart={start // 512}, size={boot_mib * MIB // 512}, "
                  "type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n"
                  f"size={root_mib * MIB // 512}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n")
    else:
        kind = "c" if fat == 32 else "e"
        script = (f"label: dos\nstart={start // 512}, size={boot_mib * MIB // 512}, "
                  f"type={kind}\n"
                  f"size={root_mib * MIB // 512}, type=83\n")
    subprocess.run(["sfdisk", "-q", str(image)], input=script.encode(), check=True,
                   capture_output=True)
    with open(image, "r+b") as f:
        f.seek(start)
        f.write(boot.read_bytes())
        f.write(root.read_bytes())
    if xz:
        _run("xz", "-0", "-T1", "-k", str(image))
        return image.with_name("pi.img.xz")
    return image
