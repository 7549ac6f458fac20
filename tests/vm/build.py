"""Prepare a guest for the VM tier: Debian's kernel, udev and busybox, cached by version.

Everything comes from Debian's package registry (``apt-get download``) and is unpacked under
``/var/cache/popsicle-vm/<key>``, where the key names the package versions, so a second run on
the same machine only checks versions.  Nothing here is committed: the cache is rebuilt from the
registry.  The guest's root is the host's own (shared read-only over 9p), so the only things
built are a kernel with a small module tree and a tiny initramfs that mounts that root.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("POPSICLE_VM_CACHE", "/var/cache/popsicle-vm"))
HERE = Path(__file__).resolve().parent
#: Bump when what is built from the same packages changes.
FORMAT = "5"

#: Module directories unpacked from the kernel package: enough for virtio, 9p, overlay, USB,
#: SCSI, SATA and their helpers, FAT (a file system on a stick, for the holder tests), and
#: device-mapper and md RAID (what stands between a stick and a name, tests/test_vm_dmmd.py).
#: Leaving the rest out keeps the first build quick and the guest from probing hardware it
#: does not have.
MODULE_DIRS = ("block", "drivers/usb", "drivers/scsi", "drivers/ata", "drivers/virtio",
               "drivers/block", "drivers/char", "drivers/cdrom", "fs/9p", "fs/overlayfs",
               "fs/netfs", "fs/fscache", "fs/fat", "fs/nls", "net/9p", "lib", "crypto",
               "drivers/md")

#: Loaded by the initramfs, dependencies first: what it takes to mount the host's root.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")


@dataclass(frozen=True)
class GuestFiles:
    """What booting the guest needs, all under one cache directory."""

    root: Path
    kernel: Path
    initrd: Path
    modules: Path  # the base for ``modprobe -d``: holds lib/modules/<release>
    release: str
    udev: Path  # the unpacked ``udev`` package
    udev_libs: Path | None  # a matching libsystemd-shared when the host's differs
    mdadm: Path  # Debian's mdadm program, unpacked (never installed on the host)


def _out(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def _candidate(package: str) -> str:
    for line in _out("apt-cache", "policy", package).splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    raise RuntimeError(f"apt has no candidate for {package}: run apt-get update")


def _kernel_package() -> str:
    for line in _out("apt-cache", "depends", "linux-image-amd64").splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise RuntimeError("cannot tell which kernel linux-image-amd64 depends on")


def _available(package: str, version: str) -> bool:
    text = _out("apt-cache", "madison", package)
    return any(part.strip() == version for line in text.splitlines()
               for part in line.split("|")[1:2])


def plan() -> dict[str, str]:
    """Package names and versions to use; their hash is the cache key."""
    kernel = _kernel_package()
    try:
        host_shared = _out("dpkg-query", "-W", "-f", "${Version}", "libsystemd-shared")
    except subprocess.CalledProcessError:  # a host without systemd
        host_shared = ""
    # systemd-udevd is linked against the private libsystemd-shared of exactly its version:
    # the host's when the registry still has that udev, else both are unpacked.
    udev = host_shared if host_shared and _available("udev", host_shared) else _candidate("udev")
    return {"format": FORMAT, "kernel": kernel, "kernel_version": _candidate(kernel),
            "udev": udev, "host_libsystemd_shared": host_shared,
            "busybox": _candidate("busybox-static"), "mdadm": _candidate("mdadm"),
            "modules": ",".join(MODULE_DIRS + INITRAMFS_MODULES)}


def _download(workdir: Path, *specs: str) -> list[Path]:
    subprocess.run(["apt-get", "download", "-q", *specs], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL)
    return sorted(workdir.glob("*.deb"))


def _extract(deb: Path, dest: Path, *members: str) -> None:
    """``dpkg-deb -x`` limited to ``members`` (tar wildcards), without a shell."""
    dest.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                          stdout=subprocess.PIPE) as deb_proc:
        subprocess.run(["tar", "-x", "-C", str(dest), "--wildcards", *members],
                       stdin=deb_proc.stdout, check=True)
        if deb_proc.stdout:
            deb_proc.stdout.close()
    if deb_proc.returncode:
        raise RuntimeError(f"dpkg-deb failed on {deb}")


def module_order(base: Path, release: str, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files for ``wanted`` and their dependencies, each after what it depends on."""
    moddir = base / "lib" / "modules" / release
    deps: dict[str, list[str]] = {}
    paths: dict[str, Path] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        name = Path(target).name.split(".ko")[0].replace("-", "_")
        paths[name] = moddir / target
        deps[name] = [Path(d).name.split(".ko")[0].replace("-", "_") for d in rest.split()]
    builtin = {Path(line).name.split(".ko")[0].replace("-", "_")
               for line in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        if name not in paths:
            raise RuntimeError(f"module {name} is not in {moddir}")
        for dep in reversed(deps[name]):  # modules.dep lists the deepest last
            visit(dep)
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"))
    return [paths[name] for name in order]


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed newc archive of (name, mode, data); the kernel unpacks it as is."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0))
        out.write(header.encode() + encoded)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))
    return out.getvalue()


def build_initramfs(busybox: Path, modules: list[Path], init: Path) -> bytes:
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o040755, b""), ("modules", 0o040755, b""),
        ("bin/busybox", 0o100755, busybox.read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),
        ("init", 0o100755, init.read_bytes()),
        ("modules/order", 0o100644, "".join(f"{m.name}\n" for m in modules).encode()),
    ]
    entries += [(f"modules/{m.name}", 0o100644, m.read_bytes()) for m in modules]
    return _cpio_newc(entries)


def _files(root: Path, info: dict[str, str]) -> GuestFiles:
    release = info["kernel"].removeprefix("linux-image-")
    libs = root / "udev-libs"
    return GuestFiles(root=root, kernel=root / "kernel" / "boot" / f"vmlinuz-{release}",
                      initrd=root / "initrd.cpio", modules=root / "kernel", release=release,
                      udev=root / "udev", udev_libs=libs if libs.is_dir() else None,
                      mdadm=root / "mdadm" / "sbin" / "mdadm")


def prepare(log: bool = True) -> GuestFiles:
    """The guest's files, built once per set of package versions (cached)."""
    info = plan()
    key = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    root = CACHE / key
    if (root / "ready.json").exists():
        return _files(root, info)
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest workers build once
        if not (root / "ready.json").exists():
            _build(root, key, info, log)
    return _files(root, info)


def _build(root: Path, key: str, info: dict[str, str], log: bool) -> None:
    if log:
        print(f"popsicle-vm: building the guest in {root} ({info['kernel']} "
              f"{info['kernel_version']}, udev {info['udev']})", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=CACHE))
    try:
        debs = tmp / "debs"
        debs.mkdir()
        for path in (tmp, debs):  # apt-get download works as user _apt
            path.chmod(0o755 if path == tmp else 0o777)
        specs = [f"{info['kernel']}={info['kernel_version']}", f"udev={info['udev']}",
                 f"busybox-static={info['busybox']}", f"mdadm={info['mdadm']}"]
        if info["udev"] != info["host_libsystemd_shared"]:
            specs.append(f"libsystemd-shared={info['udev']}")
        downloaded = _download(debs, *specs)
        for deb in downloaded:
            name = deb.name.split("_")[0]
            if name.startswith("linux-image-"):
                _extract(deb, tmp / "kernel", "./boot/vmlinuz-*", "./lib/modules/*/modules.*",
                         *(f"./lib/modules/*/kernel/{d}/*" for d in MODULE_DIRS))
            elif name == "udev":
                _extract(deb, tmp / "udev", "*")
            elif name == "libsystemd-shared":
                _extract(deb, tmp / "udev-libs-root", "*")
                found = next((tmp / "udev-libs-root").rglob("libsystemd-shared-*.so"))
                (tmp / "udev-libs").mkdir()
                shutil.copy2(found, tmp / "udev-libs" / found.name)
            elif name == "busybox-static":
                _extract(deb, tmp / "busybox", "./bin/busybox")
            elif name == "mdadm":
                _extract(deb, tmp / "mdadm", "./sbin/mdadm")
        release = info["kernel"].removeprefix("linux-image-")
        subprocess.run(["depmod", "-b", str(tmp / "kernel"), release], check=True)
        modules = module_order(tmp / "kernel", release, INITRAMFS_MODULES)
        (tmp / "initrd.cpio").write_bytes(build_initramfs(
            tmp / "busybox" / "bin" / "busybox", modules, HERE / "initramfs-init"))
        shutil.rmtree(debs)
        (tmp / "ready.json").write_text(json.dumps(info, indent=1) + "\n")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    files = prepare()
    print(files)
