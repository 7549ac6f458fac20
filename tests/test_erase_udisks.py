"""``erase`` without root: an unprivileged user, a real udisks2 and polkit (issue 28).

The user (uid 64201, in group "popsicle") runs the real command inside the private stack of
tests/udisks_harness.py: /dev/sdb is a loop device presented as a removable USB stick, which the
shipped polkit rule lets the group open; /dev/sdc one presented as a fixed SATA disk, which it
does not.  The drive is opened through udisks2's ``Block.OpenDevice`` and everything else goes
through that descriptor, as for root.  The results are looked at as root, with the real tools,
on the loop devices themselves.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import udisks_harness as harness
from conftest import popsicle_cmd
from loopdev import write_mbr
from test_erase import blkid, partition_of, table

MiB = 1 << 20
SIZE = 80 * MiB  # a FAT32 partition needs 64 MiB; small enough to stay fast
PATTERN = 0x5A

why_not = harness.missing()

NOT_AUTHORIZED_SDC = ("popsicle-py: not authorized to open /dev/sdc (polkit refused: a password "
                      "is needed and no authentication agent could ask)")


@dataclass
class Loop:
    path: str
    backing: Path

    def read(self) -> bytes:
        return self.backing.read_bytes()

    def flush(self) -> None:
        """Forget the loop device's cached pages: root's tools then read what the user wrote."""
        subprocess.run(["blockdev", "--flushbufs", self.path], check=True)

    def dirty(self) -> None:
        """As people bring a stick back: old bytes everywhere, an MBR with an ext4 partition
        at 8 MiB (beyond the new partition's first MiB)."""
        with open(self.backing, "r+b") as f:
            f.write(bytes([PATTERN]) * SIZE)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={8 * MiB}", str(self.backing),
                        f"{(SIZE - 16 * MiB) // 1024}k"], check=True, capture_output=True)
        write_mbr(str(self.backing), [(16384, (SIZE - 16 * MiB) // 512)])
        self.flush()
        assert blkid(self.path).get("PTTYPE") == "dos"
        assert blkid(self.path, "-O", str(8 * MiB)).get("TYPE") == "ext4"


@dataclass
class Setup:
    stack: harness.Udisks
    stick: Loop  # /dev/sdb: removable, USB
    fixed: Loop  # /dev/sdc: fixed, SATA


@contextlib.contextmanager
def _loops(count: int) -> Iterator[list[Loop]]:
    with harness.loop_devices(count, SIZE, "popsicle-erase-udisks") as made:
        yield [Loop(path, backing) for path, backing in made]


def _fake(name: str, loop: Loop, usb: bool) -> harness.FakeDrive:
    return harness.fake_drive(name, loop.path, SIZE, usb)


@pytest.fixture(scope="module")
def shared() -> Iterator[Setup]:
    """One stack for the module (it takes seconds to start); drives dirtied by each test."""
    if why_not is not None:
        pytest.skip(why_not)
    with _loops(2) as (stick, fixed):
        drives = [_fake("sdb", stick, True), _fake("sdc", fixed, False)]
        with harness.running(drives, dev_nodes=True) as stack:
            yield Setup(stack, stick, fixed)


@pytest.fixture
def env(shared: Setup) -> Setup:
    shared.stick.dirty()
    shared.fixed.dirty()
    return shared


def erase(setup: Setup, *args: str, uid: int = harness.USER_UID, udisks: bool = True
          ) -> subprocess.CompletedProcess[str]:
    return setup.stack.run([*popsicle_cmd(), "erase", *args], uid=uid, udisks=udisks)


def _one_partition(drive: Loop, type_byte: str, fs: str, label: str) -> str:
    """The drive has one partition of ``type_byte`` from 1 MiB, ``fs`` labelled ``label``,
    which fsck finds clean; the old ext4 is gone.  Returns blkid's VERSION."""
    drive.flush()
    assert table(drive) == [(2048, SIZE // 512 - 2048, type_byte)]
    assert blkid(drive.path, "-O", str(8 * MiB)) == {}
    with partition_of(drive) as part:
        found = blkid(part)
        assert (found.get("TYPE"), found.get("LABEL")) == (fs, label), found
        fsck = subprocess.run([f"fsck.{fs if fs == 'exfat' else 'vfat'}", "-n", part],
                              capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        return found.get("VERSION", "")


def test_fat32_without_root(env: Setup, tmp_path: Path) -> None:
    result = erase(env, "/dev/sdb", "--yes", "--fs", "fat32", "--label", "Stick", "--json")
    assert result.returncode == 0, result.stdout + result.stderr + env.stack.logs()
    events = [json.loads(line) for line in result.stdout.splitlines()]
    summary = events[-1]
    assert summary["ok"] and summary["results"][0]["status"] == "ok"
    assert summary["results"][0]["verified"]
    assert any(e["event"] == "note" and e["text"] == "/dev/sdb: wiping dos" for e in events)
    assert _one_partition(env.stick, "c", "vfat", "STICK") == "FAT32"
    file = tmp_path / "hello.txt"
    file.write_text("hello\n")
    copy = subprocess.run(["mcopy", "-i", f"{env.stick.path}@@1M", str(file), "::HELLO.TXT"],
                          capture_output=True, text=True)
    assert copy.returncode == 0, copy.stderr
    back = subprocess.run(["mtype", "-i", f"{env.stick.path}@@1M", "::HELLO.TXT"],
                          capture_output=True, text=True)
    assert back.stdout == "hello\n"
    assert env.fixed.read()[: MiB] != bytes(MiB)  # the other drive is not touched


def test_exfat_with_zeros_everywhere_without_root(env: Setup) -> None:
    result = erase(env, "/dev/sdb", "--yes", "--fs", "exfat", "--label", "Big Stick", "--zero")
    assert result.returncode == 0, result.stdout + result.stderr + env.stack.logs()
    assert "/dev/sdb: ok" in result.stdout
    _one_partition(env.stick, "7", "exfat", "Big Stick")
    assert PATTERN not in env.stick.read()[4 * MiB:]  # zeros past the file system's head


def test_fs_none_only_wipes_without_root(env: Setup) -> None:
    result = erase(env, "/dev/sdb", "--yes", "--fs", "none")
    assert result.returncode == 0, result.stdout + result.stderr + env.stack.logs()
    env.stick.flush()
    assert table(env.stick) == [] and blkid(env.stick.path) == {}
    assert blkid(env.stick.path, "-O", str(8 * MiB)) == {}
    wipefs = subprocess.run(["wipefs", "--no-act", env.stick.path], capture_output=True,
                            text=True)
    assert wipefs.stdout == ""


def test_discard_without_root(env: Setup) -> None:
    """BLKDISCARD through udisks2's descriptor, zeros read back, then the default FAT32."""
    result = erase(env, "/dev/sdb", "--yes", "--discard", "--label", "Clean")
    assert result.returncode == 0, result.stdout + result.stderr + env.stack.logs()
    assert _one_partition(env.stick, "c", "vfat", "CLEAN") == "FAT32"
    assert PATTERN not in env.stick.read()[4 * MiB:]


def test_polkit_refusal_is_one_line_and_nothing_is_written(env: Setup) -> None:
    """The fixed disk is not covered by the rule: polkit says no, as for a flash; with the
    stick named too, neither drive is touched."""
    before = env.fixed.read(), env.stick.read()
    result = erase(env, "/dev/sdc", "--yes")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [NOT_AUTHORIZED_SDC]
    both = erase(env, "/dev/sdb", "/dev/sdc", "--yes", "--zero")
    assert both.returncode == 2, both.stdout + both.stderr
    assert NOT_AUTHORIZED_SDC in both.stderr.splitlines()
    assert (env.fixed.read(), env.stick.read()) == before


def test_a_user_outside_the_group_is_refused(env: Setup) -> None:
    before = env.stick.read()
    result = erase(env, "/dev/sdb", "--yes", uid=harness.OTHER_UID)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "popsicle-py: not authorized to open /dev/sdb (polkit refused: a password is needed "
        "and no authentication agent could ask)"]
    assert env.stick.read() == before


def test_without_udisks_one_line_says_what_to_do(env: Setup) -> None:
    before = env.stick.read()
    result = erase(env, "/dev/sdb", "--yes", udisks=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "popsicle-py: writing drives needs root: run with sudo, or install udisks2 so "
        "popsicle-py can ask for permission"]
    assert env.stick.read() == before


#: The user's own program holding the stick open (read-only, not exclusively) through udisks2.
HOLD = ("import sys; from popsicle_py import udisks; fd = udisks.open_device('/dev/sdb', 'r', 0); "
        "print('ready', flush=True); sys.stdin.read()")


def test_a_mounted_or_held_drive_is_refused_without_root(env: Setup) -> None:
    """A file system mounted from the stick, or a program of the user holding it open, is
    refused as for root, nothing written."""
    subprocess.run(["mkfs.ext4", "-q", "-F", env.stick.path], check=True)
    env.stick.flush()
    before = env.stick.read()
    mnt = "/run/popsicle-erase-mnt"
    env.stack.as_root(["mkdir", "-p", mnt])
    env.stack.as_root(["mount", "-o", "ro", "/dev/sdb", mnt])
    try:
        mounted = erase(env, "/dev/sdb", "--yes")
    finally:
        env.stack.as_root(["umount", mnt])
    assert mounted.returncode == 2, mounted.stdout + mounted.stderr
    assert mounted.stderr.splitlines() == [
        f"popsicle-py: /dev/sdb is mounted at {mnt}; use --unmount to unmount it"]
    holder = subprocess.Popen(env.stack.command([sys.executable, "-c", HOLD]),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        held = erase(env, "/dev/sdb", "--yes")
    finally:
        holder.communicate("", timeout=30)
    assert held.returncode == 2, held.stdout + held.stderr
    assert "/dev/sdb" in held.stderr and f"pid {holder.pid}" in held.stderr, held.stderr
    assert env.stick.read() == before


def test_in_a_terminal_polkit_asks_for_the_password_there() -> None:
    """As for flash: a wrong password is the one-line refusal, Ctrl-C at the prompt stops at
    once (130), nothing written either way; the right password erases the drive."""
    import pexpect

    if why_not is not None:
        pytest.skip(why_not)
    with _loops(2) as (stick, fixed):
        drives = [_fake("sdb", stick, True), _fake("sdc", fixed, False)]
        with harness.running(drives, extra_rule=harness.AUTH_SELF_FOR_SDC) as stack:
            setup = Setup(stack, stick, fixed)
            fixed.dirty()
            before = fixed.read()
            argv = stack.command([*popsicle_cmd(), "erase", "/dev/sdc", "--yes", "--label",
                                  "Mine"])

            def spawn() -> pexpect.spawn:
                child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=60,
                                      cwd=str(stack.work))
                child.expect("Password:")
                return child

            wrong = spawn()
            wrong.sendline("not the password")
            wrong.expect(pexpect.EOF)
            wrong.close()
            assert wrong.exitstatus == 2, (wrong.before or "") + stack.logs()
            said = re.sub(r"\x1b\[[0-9;]*m", "", wrong.before or "")  # pkttyagent's colours
            assert said.splitlines()[-1] == (
                "popsicle-py: not authorized to open /dev/sdc (polkit refused)")
            assert fixed.read() == before

            stopped = spawn()
            stopped.sendintr()
            stopped.expect(pexpect.EOF, timeout=15)
            stopped.close()
            assert stopped.exitstatus == 130, (stopped.before or "") + stack.logs()
            assert fixed.read() == before

            child = spawn()
            child.sendline(harness.PASSWORD)
            child.expect(pexpect.EOF)
            child.close()
            assert child.exitstatus == 0, (child.before or "") + stack.logs()
            assert _one_partition(setup.fixed, "c", "vfat", "MINE") == "FAT32"
