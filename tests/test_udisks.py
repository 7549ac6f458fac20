"""Without root: drives opened through a real udisks2 and polkit (see tests/udisks_harness.py).

An unprivileged user (uid 64201, in group "popsicle") runs the real command.  /dev/sdb is a loop
device presented as a removable SanDisk USB stick, /dev/sdc one presented as a fixed SATA
disk; the rule shipped in popsicle_py/data decides.  Bytes are checked on the loop devices'
backing files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import udisks_harness as harness
from conftest import popsicle_cmd

from popsicle_py import failures, udisks

SIZE = 64 << 20
IMAGE_SIZE = 3 * (1 << 20) + 4096 + 1000  # not a multiple of a bucket nor of a block
PATTERN = 0x5A

why_not = harness.missing()

NEEDS_ROOT_LINE = ("popsicle-py: writing drives needs root: run with sudo, or install udisks2 "
                   "so popsicle-py can ask for permission")


@dataclass
class Loop:
    path: str
    backing: Path

    def read(self, length: int) -> bytes:
        with open(self.backing, "rb") as f:
            return f.read(length)

    def fill(self, byte: int = PATTERN) -> None:
        with open(self.backing, "r+b") as f:
            f.write(bytes([byte]) * SIZE)
            f.flush()
            os.fsync(f.fileno())


@dataclass
class Setup:
    stack: harness.Udisks
    stick: Loop  # /dev/sdb: removable, USB
    fixed: Loop  # /dev/sdc: fixed, SATA
    image: Path
    data: bytes


@contextlib.contextmanager
def _loops(count: int) -> Iterator[list[Loop]]:
    with harness.loop_devices(count, SIZE, "popsicle-udisks") as made:
        yield [Loop(path, backing) for path, backing in made]


def _fake(name: str, loop: Loop, usb: bool, fs: str = "") -> harness.FakeDrive:
    return harness.fake_drive(name, loop.path, SIZE, usb, fs)


@contextlib.contextmanager
def _setup(rule: Path | None = harness.RULE, extra_rule: str = "", stick_fs: str = ""
           ) -> Iterator[Setup]:
    """The stack with a USB stick (/dev/sdb) and a fixed disk (/dev/sdc); ``stick_fs`` makes
    that filesystem on the whole stick first."""
    if why_not is not None:
        pytest.skip(why_not)
    with _loops(2) as (stick, fixed):
        if stick_fs:
            subprocess.run([f"mkfs.{stick_fs}", "-q", "-F", stick.path], check=True)
        drives = [_fake("sdb", stick, True, stick_fs), _fake("sdc", fixed, False)]
        with harness.running(drives, rule=rule, extra_rule=extra_rule,
                             dev_nodes=bool(stick_fs)) as stack:
            data = os.urandom(IMAGE_SIZE)
            image = stack.work / "image.img"
            image.write_bytes(data)
            image.chmod(0o644)
            yield Setup(stack, stick, fixed, image, data)


@pytest.fixture(scope="module")
def shared() -> Iterator[Setup]:
    """One stack for the module (it takes seconds to start); drives refilled by each test."""
    with _setup() as setup:
        yield setup


@pytest.fixture
def env(shared: Setup) -> Setup:
    shared.stick.fill()
    shared.fixed.fill()
    return shared


def _popsicle(setup: Setup, *args: str, uid: int = harness.USER_UID, udisks: bool = True
              ) -> subprocess.CompletedProcess[str]:
    return setup.stack.run([*popsicle_cmd(), *args], uid=uid, udisks=udisks)


def _untouched(loop: Loop) -> bool:
    return loop.read(SIZE) == bytes([PATTERN]) * SIZE


# ----------------------------------------------------------------------------------------------
# Plain decisions, no daemon


Objects = dict[str, dict[str, dict[str, tuple[str, Any]]]]


def _block(device: str, devnum: int, drive: str = "/", system: bool = False
           ) -> dict[str, dict[str, tuple[str, Any]]]:
    return {udisks.BLOCK: {"Device": ("ay", device.encode() + b"\0"),
                           "DeviceNumber": ("t", devnum), "Drive": ("o", drive),
                           "HintSystem": ("b", system)}}


def test_the_block_object_is_chosen_by_device_number_not_by_name() -> None:
    """udisks' /dev/sda may be our /dev/sdb's number (renamed, another namespace): the number
    decides, and an unknown number matches nothing."""
    objects: Objects = {
        "/org/freedesktop/UDisks2/block_devices/sda": _block("/dev/sda", os.makedev(8, 16)),
        "/org/freedesktop/UDisks2/block_devices/sdb": _block("/dev/sdb", os.makedev(8, 0),
                                                             "/x/drives/D", True),
        "/org/freedesktop/UDisks2/Manager": {"org.freedesktop.UDisks2.Manager": {}},
    }
    found = udisks.block_for_devnum(objects, os.makedev(8, 16))
    assert found is not None
    assert (found.object_path, found.device) == ("/org/freedesktop/UDisks2/block_devices/sda",
                                                 "/dev/sda")
    other = udisks.block_for_devnum(objects, os.makedev(8, 0))
    assert other is not None and other.drive == "/x/drives/D" and other.hint_system
    assert udisks.block_for_devnum(objects, os.makedev(8, 32)) is None


@pytest.mark.parametrize(("name", "line"), [
    ("NotAuthorized", "not authorized to open /dev/sdb (polkit refused)"),
    ("NotAuthorizedDismissed", "not authorized to open /dev/sdb (authentication dismissed)"),
    ("NotAuthorizedCanObtain", "not authorized to open /dev/sdb (polkit refused: a password "
                               "is needed and no authentication agent could ask)"),
])
def test_polkit_refusals_are_one_line_naming_the_drive(name: str, line: str) -> None:
    exc = udisks.describe_refusal(udisks.ERROR + name, "Not authorized to perform operation",
                                  "open", "/dev/sdb")
    assert failures.describe_error(exc, "/dev/sdb") == line


def test_kernel_refusals_keep_their_errno_and_words() -> None:
    """udisks' "Error opening device /dev/sdb: Device or resource busy" is EBUSY, worded as for
    root; EINVAL (no O_DIRECT) stays EINVAL so that the buffered fallback is taken."""
    busy = udisks.describe_refusal(udisks.ERROR + "Failed",
                                   "Error opening device /dev/sdb: Device or resource busy",
                                   "open", "/dev/sdb")
    assert busy.errno == errno.EBUSY
    assert failures.describe_error(busy, "/dev/sdb").startswith("/dev/sdb: the drive is busy")
    invalid = udisks.describe_refusal(udisks.ERROR + "Failed",
                                      "Error opening device /dev/sdb: Invalid argument",
                                      "open", "/dev/sdb")
    assert invalid.errno == errno.EINVAL


def test_polkit_rule_command_prints_the_shipped_rule() -> None:
    result = subprocess.run([*popsicle_cmd(), "polkit-rule"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0
    assert result.stdout == harness.RULE.read_text()
    assert 'action.lookup("drive.removable.bus") === "usb"' in result.stdout


# ----------------------------------------------------------------------------------------------
# The real thing: an unprivileged user, udisksd, polkitd


def test_user_cannot_open_the_drive_without_udisks(env: Setup) -> None:
    """The premise: the kernel refuses this user, so a success below is udisks' doing."""
    probe = ("import os, sys\n"
             "try:\n    os.open('/dev/sdb', os.O_RDWR)\nexcept PermissionError:\n"
             "    sys.exit(13)\n")
    result = env.stack.run([sys.executable, "-c", probe])
    assert result.returncode == 13, result.stderr


def test_flash_and_verify_allowed_by_the_shipped_rule(env: Setup) -> None:
    # Without the capacity probe, whose stamps past the image's end would change those bytes.
    result = _popsicle(env, "flash", str(env.image), "/dev/sdb", "--yes", "--no-probe")
    assert result.returncode == 0, result.stdout + result.stderr + env.stack.logs()
    assert "/dev/sdb: ok" in result.stdout
    assert env.stick.read(IMAGE_SIZE) == env.data
    assert env.stick.read(SIZE)[IMAGE_SIZE:] == bytes([PATTERN]) * (SIZE - IMAGE_SIZE)
    probed = _popsicle(env, "flash", str(env.image), "/dev/sdb", "--yes")  # probed via udisks
    assert probed.returncode == 0, probed.stdout + probed.stderr
    assert env.stick.read(IMAGE_SIZE) == env.data
    check = _popsicle(env, "verify", str(env.image), "/dev/sdb")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "/dev/sdb: ok (matches the image" in check.stdout


def test_verify_finds_a_difference_through_udisks(env: Setup) -> None:
    """Read back through udisks ("r") compares the real bytes: a changed byte is found."""
    with open(env.stick.backing, "r+b") as f:
        f.write(env.data)
        f.seek(123457)
        f.write(bytes([env.data[123457] ^ 0xFF]))
    result = _popsicle(env, "verify", str(env.image), "/dev/sdb")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "differs from the image at byte 123457" in result.stdout


def test_a_drive_the_rule_does_not_cover_is_refused(env: Setup) -> None:
    result = _popsicle(env, "flash", str(env.image), "/dev/sdc", "--yes")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "popsicle-py: not authorized to open /dev/sdc (polkit refused: a password is needed "
        "and no authentication agent could ask)"]
    assert _untouched(env.fixed)


def test_one_refused_drive_and_nothing_is_written_anywhere(env: Setup) -> None:
    result = _popsicle(env, "flash", str(env.image), "/dev/sdb", "/dev/sdc", "--yes", "--json")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not authorized to open /dev/sdc" in result.stderr
    assert '"event": "error"' in result.stdout
    assert _untouched(env.stick) and _untouched(env.fixed)


def test_a_user_outside_the_group_is_refused(env: Setup) -> None:
    result = _popsicle(env, "flash", str(env.image), "/dev/sdb", "--yes",
                       uid=harness.OTHER_UID)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not authorized to open /dev/sdb" in result.stderr
    assert _untouched(env.stick)


def test_without_udisks_one_line_says_what_to_do(env: Setup) -> None:
    result = _popsicle(env, "flash", str(env.image), "/dev/sdb", "/dev/sdc", "--yes",
                       udisks=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [NEEDS_ROOT_LINE]
    assert _untouched(env.stick) and _untouched(env.fixed)
    check = _popsicle(env, "verify", str(env.image), "/dev/sdb", udisks=False)
    assert check.returncode == 2
    assert check.stderr.splitlines() == [NEEDS_ROOT_LINE.replace("writing", "reading")]


def test_without_the_rule_the_stick_is_refused_too() -> None:
    """The shipped rule is what lets the stick be written: without it, polkit says no."""
    with _setup(rule=None) as setup:
        setup.stick.fill()
        result = _popsicle(setup, "flash", str(setup.image), "/dev/sdb", "--yes")
        assert result.returncode == 2, result.stdout + result.stderr
        assert "not authorized to open /dev/sdb" in result.stderr
        assert _untouched(setup.stick)


def test_in_a_terminal_polkit_asks_for_the_password_there() -> None:
    """No desktop agent: pkttyagent prompts on the user's terminal (ssh), then it is written;
    a wrong password is a refusal and Ctrl-C stops at once, nothing written either way."""
    import pexpect

    with _setup(extra_rule=harness.AUTH_SELF_FOR_SDC) as setup:
        setup.fixed.fill()
        argv = setup.stack.command([*popsicle_cmd(), "flash", str(setup.image), "/dev/sdc",
                                    "--yes"])
        wrong = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=60,
                              cwd=str(setup.stack.work))
        wrong.expect("Password:")
        wrong.sendline("not the password")
        wrong.expect(pexpect.EOF)
        wrong.close()
        assert wrong.exitstatus == 2, (wrong.before or "") + setup.stack.logs()
        said = re.sub(r"\x1b\[[0-9;]*m", "", wrong.before or "")  # pkttyagent's colours
        assert said.splitlines()[-1] == (
            "popsicle-py: not authorized to open /dev/sdc (polkit refused)")
        assert _untouched(setup.fixed)

        # Ctrl-C at the prompt: the shell is back at once (130), nothing written.
        stopped = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=60,
                                cwd=str(setup.stack.work))
        stopped.expect("Password:")
        stopped.sendintr()
        stopped.expect(pexpect.EOF, timeout=15)
        stopped.close()
        assert stopped.exitstatus == 130, (stopped.before or "") + setup.stack.logs()
        assert _untouched(setup.fixed)

        child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=60,
                              cwd=str(setup.stack.work))
        child.expect("AUTHENTICATING FOR org.freedesktop.udisks2.open-device-system")
        child.expect("Password:")
        child.sendline(harness.PASSWORD)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, (child.before or "") + setup.stack.logs()
        assert setup.fixed.read(IMAGE_SIZE) == setup.data


POWER_OFF = "from popsicle_py import udisks; print(udisks.power_off('/dev/sdb'))"


def test_power_off_is_polkits_decision_too(env: Setup) -> None:
    """The shipped rule allows opening only: powering the stick off is refused (one line)."""
    result = env.stack.run([sys.executable, "-c", POWER_OFF])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("not authorized to power off /dev/sdb (polkit refused: a "
                                     "password is needed and no authentication agent could ask)")


ALLOW_POWER_OFF = """
polkit.addRule(function(action, subject) {
    if (action.id === "org.freedesktop.udisks2.power-off-drive" &&
        subject.user === "popsicle-test") {
        return polkit.Result.YES;
    }
    return polkit.Result.NOT_HANDLED;
});
"""


#: polkit answers the stick's first open as it does when it cannot apply the shipped rule
#: (seen once in CI under load: a rule that took too long, or udisksd passing the call
#: without the drive's details), then as the rule says: refused once, allowed after.
REFUSE_THE_FIRST_OPEN = """
var refused = false;
polkit.addRule(function(action, subject) {
    if (action.id.indexOf("org.freedesktop.udisks2.open-device") === 0 &&
        action.lookup("device") === "/dev/sdb" && !refused) {
        refused = true;
        return polkit.Result.AUTH_ADMIN;
    }
    return polkit.Result.NOT_HANDLED;
});
"""


def test_a_refusal_polkit_takes_back_at_once_fails_no_drive() -> None:
    """With no agent to ask, a "password needed" is asked once more before it stands: a busy
    polkit's one refusal of a stick the rule allows does not fail a station's drive."""
    with _setup(extra_rule=REFUSE_THE_FIRST_OPEN) as setup:
        result = _popsicle(setup, "flash", str(setup.image), "/dev/sdb", "--yes", "--no-probe")
        assert result.returncode == 0, result.stdout + result.stderr + setup.stack.logs()
        assert "/dev/sdb: ok" in result.stdout
        assert setup.stick.read(IMAGE_SIZE) == setup.data


def test_power_off_through_udisks_removes_the_usb_device() -> None:
    """Allowed, Drive.PowerOff makes udisksd write 1 to the stick's USB device's ``remove``."""
    with _setup(extra_rule=ALLOW_POWER_OFF) as setup:
        result = setup.stack.run([sys.executable, "-c", POWER_OFF])
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "None", result.stdout + setup.stack.logs()
        remove = Path(setup.stack.testbed, "sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/remove")
        assert remove.read_text().strip() == "1"


ALLOW_UNMOUNT = """
polkit.addRule(function(action, subject) {
    if (action.id === "org.freedesktop.udisks2.filesystem-unmount-others" &&
        subject.user === "popsicle-test") {
        return polkit.Result.YES;
    }
    return polkit.Result.NOT_HANDLED;
});
"""


def test_unmount_goes_through_udisks_and_polkit() -> None:
    """--unmount without root: Filesystem.Unmount, refused for one user (one line, still
    mounted, nothing written), allowed for the other, who then flashes the stick."""
    with _setup(extra_rule=ALLOW_UNMOUNT, stick_fs="ext4") as setup:
        mnt = "/run/popsicle-udisks-mnt"
        setup.stack.as_root(["mkdir", "-p", mnt])
        setup.stack.as_root(["mount", "/dev/sdb", mnt])  # as a desktop would: by its name
        deadline = time.monotonic() + 20
        while setup.stack.mount_points("sdb") != [mnt]:
            assert time.monotonic() < deadline, "udisksd never saw the mount"
            time.sleep(0.1)
        before = setup.stick.read(SIZE)
        args = ("flash", str(setup.image), "/dev/sdb", "--yes", "--unmount")

        refused = _popsicle(setup, *args, uid=harness.OTHER_UID)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.splitlines() == [
            f"popsicle-py: could not unmount {mnt} (/dev/sdb): not authorized to unmount "
            "/dev/sdb (polkit refused: a password is needed and no authentication agent "
            "could ask)"]
        assert setup.stack.mount_points("sdb") == [mnt]
        assert setup.stick.read(SIZE) == before

        result = _popsicle(setup, *args)
        assert result.returncode == 0, result.stdout + result.stderr + setup.stack.logs()
        assert mnt not in setup.stack.as_root(["cat", "/proc/self/mounts"]).stdout
        assert setup.stick.read(IMAGE_SIZE) == setup.data


#: Threads opening drives through the one shared client at once, as lanes do (read, watch,
#: station): every call must get its own reply, none lost to another thread.
CONCURRENT_OPENS = """
import os, sys, threading
from popsicle_py import udisks
said = []
def open_sdb():
    # udisksd's object for sdb can be missing for a moment (it re-reads the device): that
    # is its reply, to this thread; what is tested is that each thread gets its own.
    for attempt in range(3):
        try:
            return udisks.open_device("/dev/sdb", "r", 0)
        except udisks.UdisksError as exc:
            if "does not know this drive" not in str(exc) or attempt == 2:
                raise
def lane(number):
    for _ in range(4):
        try:
            fd = open_sdb()
        except Exception as exc:
            said.append(f"sdb: {type(exc).__name__}: {exc}")
            continue
        said.append("sdb" if os.fstat(fd).st_rdev == os.stat("/dev/sdb").st_rdev else "wrong")
        os.close(fd)
        try:
            udisks.open_device("/dev/sdc", "r", 0)
        except udisks.UdisksError as exc:
            said.append("sdc refused" if "not authorized" in str(exc) else str(exc))
        else:
            said.append("sdc opened")
threads = [threading.Thread(target=lane, args=(n,)) for n in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(sorted(set(said)), len(said))
"""


def test_threads_share_the_client_each_gets_its_own_reply(env: Setup) -> None:
    """One connection, six threads: replies are filed by serial for the thread that asked
    (before, a thread dropped another's reply, which then waited forever or read garbage)."""
    try:
        result = env.stack.run([sys.executable, "-c", CONCURRENT_OPENS], timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("a thread never got its reply")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[0] == "['sdb', 'sdc refused'] 48", result.stdout


@pytest.fixture(scope="module")
def prompting() -> Iterator[Setup]:
    """A stack where opening /dev/sdc asks this user's password (pkttyagent on the tty)."""
    with _setup(extra_rule=harness.AUTH_SELF_FOR_SDC) as setup:
        yield setup


def _at_the_prompt(setup: Setup, *args: str) -> Any:
    """The command started on a terminal, waiting at polkit's password prompt."""
    import pexpect

    argv = setup.stack.command([*popsicle_cmd(), *args])
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=60,
                          cwd=str(setup.stack.work))
    child.expect("Password:")
    return child


def _stopped_at_the_prompt(setup: Setup, how: str, *args: str) -> tuple[int, str]:
    """Ctrl-C (``int``) or SIGTERM (``term``) at the prompt: the exit status, what was said."""
    import signal

    import pexpect

    child = _at_the_prompt(setup, *args)
    if how == "int":
        child.sendintr()
    else:  # nsenter, setpriv and env exec: the child is the python process itself
        os.kill(child.pid, signal.SIGTERM)
    try:
        child.expect(pexpect.EOF, timeout=15)
    except pexpect.TIMEOUT:
        child.close(force=True)
        pytest.fail(f"still running 15 s after SIG{how.upper()} at the prompt")
    child.close()
    said = re.sub(r"\x1b\[[0-9;]*m", "", child.before or "")
    return child.exitstatus, said


#: Every use case that opens drives, each asked for /dev/sdc (the password prompt).
OPENERS = {
    "verify": ("verify", "{image}", "/dev/sdc"),
    "check": ("check", "--sha256", "0" * 64, "--size", "4096", "/dev/sdc"),
    "probe": ("probe", "--yes", "/dev/sdc"),
    "read": ("read", "/dev/sdc", "{home}/c.img"),
    "read-many": ("read", "/dev/sdb", "{home}/b.img", "/dev/sdc", "{home}/c.img"),
}


@pytest.mark.parametrize("how", ["int", "term"])
@pytest.mark.parametrize("command", list(OPENERS))
def test_a_signal_at_the_polkit_prompt_cancels_every_use_case(prompting: Setup, command: str,
                                                              how: str) -> None:
    """As flash and erase: Ctrl-C is 130, SIGTERM 143, at once; nothing read or written.
    (Before, verify, check, read and probe went on waiting, or called it a refusal.)"""
    setup = prompting
    setup.fixed.fill()
    home = setup.stack.work / "home"
    for made in home.glob("*.img*"):
        made.unlink()
    args = [a.format(image=setup.image, home=home) for a in OPENERS[command]]
    status, said = _stopped_at_the_prompt(setup, how, *args)
    assert status == (130 if how == "int" else 143), said + setup.stack.logs()
    assert "not authorized" not in said, said
    assert _untouched(setup.fixed)
    assert not list(home.iterdir()), "an OUTPUT was made"


@pytest.fixture(scope="module")
def prompting_stick() -> Iterator[Setup]:
    """A stack where opening the USB stick /dev/sdb asks this user's password."""
    with _setup(extra_rule=harness.AUTH_SELF_FOR_SDB) as setup:
        os.chmod(setup.stack.testbed, 0o777)  # watch's udev monitor binds a socket there
        yield setup


@pytest.mark.parametrize("how", ["int", "term"])
def test_a_signal_at_the_polkit_prompt_ends_watch(prompting_stick: Setup, how: str) -> None:
    """watch (and the station on it): a stick's password prompt ends at the signal, as the
    other use cases' do.  (Before, the stick's thread waited at the prompt, and the session
    with it, until a second signal.)"""
    setup = prompting_stick
    setup.stick.fill()
    status, said = _stopped_at_the_prompt(setup, how, "watch", "--yes", "--include-present",
                                          "--no-probe", "--count", "1", str(setup.image))
    assert status == (130 if how == "int" else 143), said + setup.stack.logs()
    assert _untouched(setup.stick)


def test_two_sticks_that_ask_a_password_are_each_asked_in_turn() -> None:
    """watch without root, two sticks plugged in together, each needing the password: the
    one text agent asks for one, then the other, and both are written.  (Before, the second
    call came while the agent asked for the first, polkit refused it, and that stick failed
    though every prompt shown was answered.)"""
    import pexpect

    if why_not is not None:
        pytest.skip(why_not)
    with _loops(2) as (b, d):
        drives = [_fake("sdb", b, True), _fake("sdd", d, True)]
        with harness.running(drives, extra_rule=harness.AUTH_SELF_FOR_STICKS) as stack:
            os.chmod(stack.testbed, 0o777)  # watch's udev monitor binds a socket there
            image = stack.work / "image.img"
            data = os.urandom(IMAGE_SIZE)
            image.write_bytes(data)
            image.chmod(0o644)
            argv = stack.command([*popsicle_cmd(), "watch", "--yes", "--include-present",
                                  "--no-probe", "--no-power-off", "--count", "2", str(image)])
            child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=60,
                                  cwd=str(stack.work))
            try:
                for _ in range(2):
                    child.expect("Password:")
                    child.sendline(harness.PASSWORD)
                child.expect(pexpect.EOF)
            finally:
                child.close(force=True)
            said = re.sub(r"\x1b\[[0-9;]*m", "", child.before or "")
            assert child.exitstatus == 0, said + stack.logs()
            for loop in (b, d):
                assert loop.read(IMAGE_SIZE) == data


def test_read_without_root(env: Setup) -> None:
    """read through udisks: the image file holds the drive's bytes (click no longer refuses
    a device node this user cannot read)."""
    with open(env.stick.backing, "r+b") as f:
        f.write(env.data)
    home = env.stack.work / "home"
    output = home / "stick.img"
    try:
        result = _popsicle(env, "read", "/dev/sdb", str(output))
        assert result.returncode == 0, result.stdout + result.stderr
        assert output.read_bytes()[:IMAGE_SIZE] == env.data
        assert output.stat().st_size == SIZE
    finally:
        for made in home.glob("stick.img*"):
            made.unlink()


def test_a_polkit_refusal_in_a_multi_pair_read_reads_nothing(env: Setup) -> None:
    """/dev/sdc is refused: exit 2 with the one line, and /dev/sdb was not read either (every
    drive is opened before any is read, as flash opens all before writing)."""
    home = env.stack.work / "home"
    result = _popsicle(env, "read", "/dev/sdb", str(home / "b.img"), "/dev/sdc",
                       str(home / "c.img"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "popsicle-py: not authorized to open /dev/sdc (polkit refused: a password is needed "
        "and no authentication agent could ask)"]
    assert not list(home.iterdir())


@pytest.mark.parametrize("command", ["flash", "erase", "verify", "check"])
def test_a_hung_udisksd_is_named_not_told_to_be_installed(env: Setup, command: str) -> None:
    """udisksd stopped (SIGSTOP): after udisks2's time limit, one line says it did not answer
    (before: "install udisks2", which is installed); exit 2, nothing written.  The limit is
    the command's --stall-timeout when shorter than D-Bus' 25 s (before: 25 s whatever it
    said)."""
    import signal

    args = {"flash": ["flash", str(env.image), "/dev/sdb", "--yes", "--no-probe"],
            "erase": ["erase", "/dev/sdb", "--yes"],
            "verify": ["verify", str(env.image), "/dev/sdb"],
            "check": ["check", "--sha256", "0" * 64, "--size", "4096", "/dev/sdb"]}[command]

    found = subprocess.run(["pgrep", "-g", str(env.stack.process.pid), "-x", "udisksd"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert len(found) == 1, found
    pid = int(found[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        result = _popsicle(env, *args, "--stall-timeout", "3")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [  # --stall-timeout's 3 s, not D-Bus' 25 s
        "popsicle-py: udisks2 did not answer within 3 s, so this user's "
        "drives cannot be opened through it: run with sudo, or restart udisks2"]
    assert _untouched(env.stick)


#: One thread waits at polkit's password prompt for /dev/sdc; on SIGUSR1 the main thread
#: opens /dev/sdb meanwhile, through the same client.
WHILE_ONE_WAITS = """
import os, signal, threading
from popsicle_py import udisks
go = threading.Event()
signal.signal(signal.SIGUSR1, lambda *_: go.set())
def at_the_prompt():
    try:
        os.close(udisks.open_device("/dev/sdc", "r", 0))
        print("sdc opened", flush=True)
    except Exception as exc:
        print("sdc:", exc, flush=True)
waiting = threading.Thread(target=at_the_prompt)
waiting.start()
go.wait()
os.close(udisks.open_device("/dev/sdb", "r", 0))
print("sdb opened while sdc waits", flush=True)
waiting.join()
"""


def test_a_password_prompt_holds_no_other_call(prompting: Setup) -> None:
    """While one call waits for a password, another thread's call is answered (no lock is
    held across a call); then the password opens the first."""
    import signal

    import pexpect

    argv = prompting.stack.command([sys.executable, "-c", WHILE_ONE_WAITS])
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=30,
                          cwd=str(prompting.stack.work))
    try:
        child.expect("Password:")
        os.kill(child.pid, signal.SIGUSR1)
        child.expect("sdb opened while sdc waits")
        child.sendline(harness.PASSWORD)
        child.expect("sdc opened")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
