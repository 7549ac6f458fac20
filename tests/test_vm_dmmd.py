"""The VM tier: sticks held through device-mapper and md RAID, which this machine's kernel
lacks and Debian's kernel in the guest has (modules dm-mod and raid1).

One guest for the module (tests/vm/guest.py), booted with six USB sticks, each held its own way
before anything is asked: a dm-linear mapping over the whole stick (open by nobody, its uuid
cryptsetup's kind); a mapping over a partition, its table naming the partition by major:minor,
held open by a program (its uuid LVM's kind); an assembled RAID1 array with the stick as a
member; a stale RAID superblock of an array stopped since; and a mounted stick with a loop
device over a file on it and a mapping stacked on that loop device; and one whose file system,
a loop device over a file of it still attached, was unmounted with ``umount -l``. ``list`` is
run once and ``flash``, ``erase`` and ``probe`` once each for all of them: each CLI start costs
seconds under emulation.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_vm import _skip_reason
from vm.guest import Disk, Guest, MiB, Topology, booted

#: A guest of its own: its own xdist group, so that it may run beside tests/test_vm.py.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm_dmmd")]

IMAGE_SIZE = 2 * MiB + 4096
#: Stick id -> (xHCI port, serial).
STICKS = {"whole": ("1", "DM-WHOLE-1"), "part": ("2", "DM-PART-1"),
          "member": ("3", "MD-MEMBER-1"), "stale": ("4", "MD-STALE-1"),
          "stacked": ("5", "DM-STACKED-1"), "lazy": ("6", "LAZY-1")}


def _topology(workdir: Path) -> Topology:
    return Topology(disks=[Disk(disk_id, workdir / "disks" / f"{disk_id}.img", 32 * MiB,
                                "usb-storage", serial, port)
                           for disk_id, (port, serial) in STICKS.items()])


def _nodes(vm: Guest) -> dict[str, str]:
    """Stick id -> the guest's /dev path, by the serial udev read."""
    by_serial = {serial: disk_id for disk_id, (_, serial) in STICKS.items()}
    return {by_serial[serial]: f"/dev/{name}" for name, serial in vm.block_devices().items()
            if serial in by_serial}


@pytest.fixture(scope="module")
def vm() -> Iterator[Guest]:
    reason = _skip_reason() or (None if shutil.which("dmsetup") else
                                "dmsetup is not installed (see .ci/run)")
    if reason:
        pytest.skip(reason)
    with booted(_topology) as guest:
        guest.settle()
        yield guest


@pytest.fixture(scope="module")
def held(vm: Guest) -> Iterator[dict[str, Any]]:
    """Every stick held its own way; what holds each, for the assertions."""
    where = _nodes(vm)
    assert set(where) == set(STICKS), where
    mdadm = vm.files.mdadm
    whole, part, member, stale, stacked, lazy = (where[s] for s in STICKS)
    # The holder of "part" is a program reading the mapping, started below.
    script = f"""
set -e
modprobe dm_mod; modprobe raid1; modprobe loop
dmsetup create --noudevsync whole --uuid CRYPT-LUKS2-0f1e2d3c-whole \\
    --table "0 2048 linear {whole} 0"
printf 'label: dos\\nstart=2048, size=20480, type=83\\n' | sfdisk -q {part}
udevadm settle
dmsetup create --noudevsync part --uuid LVM-K2Zq0Yp8 \\
    --table "0 2048 linear $(cat /sys/class/block/{part[5:]}1/dev) 0"
truncate -s 32M /run/md-a.img /run/md-b.img
A=$(losetup -f --show /run/md-a.img); B=$(losetup -f --show /run/md-b.img)
{mdadm} --create /dev/md0 --run --quiet --assume-clean --level=1 --raid-devices=2 \\
    --metadata=1.2 {member} $A
{mdadm} --create /dev/md1 --run --quiet --assume-clean --level=1 --raid-devices=2 \\
    --metadata=1.2 {stale} $B
{mdadm} --stop --quiet /dev/md1
mkfs.vfat -I {stacked} >/dev/null; mkdir -p /run/stacked; mount {stacked} /run/stacked
truncate -s 4M /run/stacked/disk.img
L=$(losetup -f --show /run/stacked/disk.img)
dmsetup create --noudevsync over --table "0 2048 linear $L 0"
mkfs.vfat -I {lazy} >/dev/null; mkdir -p /run/lazy; mount {lazy} /run/lazy
truncate -s 1M /run/lazy/disk.img
Z=$(losetup -f --show -r /run/lazy/disk.img); umount -l /run/lazy
echo $Z $L
"""
    lazy_loop, loop = vm.sh(script, timeout=120).strip().splitlines()[-1].split()
    reader = vm.spawn(["/bin/sh", "-c", "exec sleep 600 < /dev/mapper/part"])
    try:
        yield {"where": where, "loop": loop, "lazy_loop": lazy_loop, "reader": reader}
    finally:
        reader.stop()


@pytest.fixture(scope="module")
def listed(vm: Guest, held: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = vm.popsicle("list", "--json")
    assert result.rc == 0, result.stderr
    return {d["path"]: d for d in json.loads(result.stdout)}


def _reasons(held: dict[str, Any]) -> dict[str, str]:
    """What ``list`` and ``flash`` must say of each held stick."""
    return {"whole": "in use by /dev/mapper/whole (dm-crypt encryption)",
            "part": "in use by /dev/mapper/part (LVM)",
            "member": "in use by /dev/md0 (md RAID)",
            "stacked": f"in use by {held['loop']} (itself in use by /dev/mapper/over), a loop"
                       " device over /run/stacked/disk.img, a file on it (its file system"
                       " cannot be unmounted while it is used)",
            "lazy": f"in use by {held['lazy_loop']}, a loop device over a file on it (its file"
                    " system is mounted nowhere: unmounted with `umount -l` while in use?)"}


def test_list_says_no_for_every_stick_a_mapping_or_an_array_holds(
        held: dict[str, Any], listed: dict[str, dict[str, Any]]) -> None:
    where = held["where"]
    for disk_id, reason in _reasons(held).items():
        drive = listed[where[disk_id]]
        assert (drive["eligible"], drive["reason"]) == (False, reason), disk_id
    assert listed[where["stacked"]]["mountpoints"] == ["/run/stacked"]


def test_flash_erase_and_probe_refuse_them_naming_the_holder(
        vm: Guest, held: dict[str, Any]) -> None:
    """Refused before anything is written, even with ``--unmount``: the stacked stick's file
    system cannot be unmounted (``list`` said "yes" for it, and ``flash --unmount`` failed
    "target is busy" after the confirmation)."""
    where = held["where"]
    targets = [where[disk_id] for disk_id in _reasons(held)]
    image = vm.put("dmmd.img", os.urandom(IMAGE_SIZE))
    vm.sh("sync")  # the stacked stick's file system is mounted: its writes are done
    before = {disk_id: vm.disks[disk_id].read(4 * MiB) for disk_id in _reasons(held)}
    for command in (["flash", "--yes", "--unmount", image], ["erase", "--yes"],
                    ["probe", "--yes"]):
        result = vm.popsicle(*command, *targets)
        assert result.rc == 2, (command, result.stdout, result.stderr)
        for disk_id, reason in _reasons(held).items():
            said = f"popsicle-py: {where[disk_id]} is {reason}"
            assert any(line.startswith(said) for line in result.stderr.splitlines()), \
                (command, result.stderr)
    for disk_id, data in before.items():
        assert vm.disks[disk_id].read(4 * MiB) == data, f"{disk_id} was written"
    assert vm.sh("grep -c ' /run/stacked ' /proc/mounts").strip() == "1", "unmounted"


def test_a_stale_raid_superblock_of_a_stopped_array_is_no_holder(
        vm: Guest, held: dict[str, Any], listed: dict[str, dict[str, Any]]) -> None:
    """A stick that was a RAID member, its array stopped (not assembled): nothing holds it,
    and writing it is what the user asked (as for any old signature on a stick)."""
    node = held["where"]["stale"]
    assert (listed[node]["eligible"], listed[node]["reason"]) == (True, None)
    data = os.urandom(IMAGE_SIZE)
    image = vm.put("stale.img", data)
    result = vm.popsicle("flash", "--yes", image, node)
    assert result.rc == 0, result.stderr
    assert vm.disks["stale"].read(len(data)) == data


#: Plans a flash of argv[2], then a mapping is made over argv[3], then the job runs.
RACE = """
import subprocess, sys
from popsicle_py import app
from popsicle_py.errors import Refused
from popsicle_py.signals import Cancellation
from popsicle_py.view import PlainView
image, target, under = sys.argv[1:4]
job = app.prepare_flash(app.FlashRequest(app.SourceOptions(image),
                                         app.TargetOptions(devices=(target,))))
subprocess.run(["dmsetup", "create", "--noudevsync", "late", "--table",
                "0 1024 linear " + under + " 0"], check=True)
subprocess.run(["udevadm", "settle"], check=True)  # its /dev/mapper link, named below
try:
    with job:
        job.run(PlainView(), Cancellation())
    print("written")
except Refused as refused:
    print("\\n".join(refused.lines))
finally:
    subprocess.run(["dmsetup", "remove", "--retry", "late"], check=True)
"""


def test_a_mapping_made_after_the_plan_is_named_when_the_drive_is_opened(
        vm: Guest, held: dict[str, Any]) -> None:
    """Between the checks and the first write a mapping is made over the stick's partition:
    refused naming it (the kernel's refusal of the exclusive open said "a program or a file
    system unmounted with `umount -l`", and named no mapping)."""
    node = held["where"]["stale"]  # written by the test above: a plain stick now
    vm.sh(f"printf 'label: dos\\nstart=2048, size=20480, type=83\\n' | sfdisk -q {node}"
          " && udevadm settle")
    before = vm.disks["stale"].read(4 * MiB)
    image = vm.put("late.img", os.urandom(IMAGE_SIZE))
    result = vm.run([sys.executable, "-c", RACE, image, node, f"{node}1"], env=vm._env())
    assert result.rc == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{node} is in use by /dev/mapper/late (a device-mapper mapping)"], result.stdout
    assert vm.disks["stale"].read(4 * MiB) == before


def test_watch_leaves_the_held_sticks_alone_saying_why(vm: Guest, held: dict[str, Any]) -> None:
    """``watch --include-present`` takes the free stick only; each held one is announced
    with the reason ``list`` gives (``watch`` unmounts nothing: the stacked stick is
    mounted, first).  The one the kernel holds unseen (``umount -l``) was announced
    eligible, then failed "the drive is busy" (exit 1)."""
    where = held["where"]
    image = vm.put("watch.img", os.urandom(IMAGE_SIZE))
    result = vm.popsicle("watch", "--include-present", "--no-power-off", "--yes", "--json",
                         "--count", "1", image)
    assert result.rc == 0, result.stderr
    added = {e["device"]: e for e in result.json_lines() if e["event"] == "drive_added"}
    reasons = {**_reasons(held), "stacked": "mounted at /run/stacked"}
    for disk_id, reason in reasons.items():
        assert (added[where[disk_id]]["eligible"], added[where[disk_id]]["reason"]) == (
            False, reason), disk_id
    assert added[where["stale"]]["eligible"] is True
