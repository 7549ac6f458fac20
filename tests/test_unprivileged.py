"""An ordinary user is told, in one line, what writing drives needs; nothing is written.

The command runs as uid ``nobody`` against a real loop device (mode 0600, root's, as a disk node
is without udev).  The interpreter running the tests may sit under a directory ``nobody`` cannot
enter (pyenv under /root): a private mount namespace then shows that one directory again, and
nothing outside the test changes.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, Loop
from loopdev import DROP_OTHER_TESTS_MOUNTS, new_mount_namespace

from popsicle_py.app.access import NEEDS_ROOT_TO_READ, NEEDS_ROOT_TO_WRITE, access_refusal

MiB = 1 << 20
PATTERN = 0xA5
NOBODY = 65534

#: Run as root in a private mount namespace: make the given paths reachable, become nobody,
#: and exec the command.  argv: keep-dir, then "--" separated: paths, command.
_RUNNER = r"""
import os, subprocess, sys
keep, rest = sys.argv[1], sys.argv[2:]
cut = rest.index("--")
paths, command = rest[:cut - 1], rest[cut + 1:]
subprocess.run(["sh", "-c", rest[cut - 1]], check=True)  # loopdev.DROP_OTHER_TESTS_MOUNTS
hidden = {}  # a directory closed to others -> where its real contents stay reachable
def mount(*args):
    subprocess.run(["mount", *args], check=True)
for path in paths:
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts)):
        above = "/" + "/".join(parts[:depth])
        if above not in hidden and os.stat(above).st_mode & 0o001:
            continue
        if above not in hidden:
            hidden[above] = os.path.join(keep, str(len(hidden)))
            os.makedirs(hidden[above])
            mount("--bind", above, hidden[above])
            mount("-t", "tmpfs", "-o", "mode=755", "unprivileged-test", above)
        target = os.path.join(above, parts[depth])
        if not os.path.exists(target):
            source = os.path.join(hidden[above], parts[depth])
            if os.path.isdir(source):
                os.makedirs(target)
            else:
                open(target, "w").close()
            mount("--bind", source, target)
        break
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
os.execv(command[0], command)
"""


def _as_nobody(*args: object, keep: Path) -> subprocess.CompletedProcess[str]:
    needed = [os.path.realpath(p) for p in (sys.executable, sys.prefix, sys.base_prefix)]
    command = [sys.executable, "-m", "popsicle_py", *map(str, args)]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _RUNNER,
         str(keep), *needed, DROP_OTHER_TESTS_MOUNTS, "--", *command],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=env,
        check=False)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory nobody may read (pytest's tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="install-unprivileged-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_access_refusal_is_one_line_for_ordinary_users_only() -> None:
    assert access_refusal(1000, ["/dev/sdb", "/dev/sdc"], writing=True) == (
        "writing drives needs root: run with sudo, or install udisks2 so popsicle-py can ask "
        "for permission")
    assert access_refusal(1000, ["/dev/sdb"], writing=False) == NEEDS_ROOT_TO_READ
    assert access_refusal(1000, [], writing=True) is None  # e.g. in the "disk" group
    assert access_refusal(0, ["/dev/sdb"], writing=True) is None


@pytest.mark.root
@pytest.mark.parametrize("command", ["flash", "verify", "watch"])
def test_ordinary_user_is_told_what_is_needed(loop_factory: Callable[..., Loop],
                                              public_dir: Path, command: str) -> None:
    loop = loop_factory(4 * MiB, fill=PATTERN)
    assert stat.S_IMODE(os.stat(loop.path).st_mode) & 0o006 == 0  # not ours to open as nobody
    image = public_dir / "image.img"
    image.write_bytes(os.urandom(1 * MiB))
    image.chmod(0o644)
    keep = public_dir / "keep"
    keep.mkdir()
    args: list[object] = {"flash": ["flash", "--yes", image, loop.path],
                          "verify": ["verify", image, loop.path],
                          "watch": ["watch", "--yes", "--count", "1", image]}[command]

    result = _as_nobody(*args, keep=keep)

    expected = NEEDS_ROOT_TO_READ if command == "verify" else NEEDS_ROOT_TO_WRITE
    assert result.stderr.splitlines() == [f"popsicle-py: {expected}"], result.stderr
    assert result.returncode == 2
    assert loop.read() == bytes([PATTERN]) * loop.size


@pytest.mark.root
def test_ordinary_user_still_hears_of_a_missing_drive_first(public_dir: Path) -> None:
    image = public_dir / "image.img"
    image.write_bytes(os.urandom(1 * MiB))
    image.chmod(0o644)
    keep = public_dir / "keep"
    keep.mkdir()
    result = _as_nobody("flash", "--yes", image, "/dev/no-such-drive", keep=keep)
    assert result.stderr.splitlines() == ["popsicle-py: /dev/no-such-drive does not exist"]
    assert result.returncode == 2


@pytest.mark.root
@pytest.mark.parametrize("command", ["flash", "verify", "read"])
def test_a_drive_named_through_a_closed_folder_is_not_said_missing(
        loop_factory: Callable[..., Loop], public_dir: Path, command: str) -> None:
    """A name this user cannot look up (a folder on the way is closed to them) says so, not
    "does not exist" (the drive is there: the user is sent looking for the wrong fault)."""
    loop = loop_factory(4 * MiB, fill=PATTERN)
    closed = public_dir / "closed"
    closed.mkdir(mode=0o700)
    (closed / "stick").symlink_to(loop.path)
    image = public_dir / "image.img"
    image.write_bytes(os.urandom(1 * MiB))
    image.chmod(0o644)
    keep = public_dir / "keep"
    keep.mkdir()
    args: list[object] = {"flash": ["flash", "--yes", image, closed / "stick"],
                          "verify": ["verify", image, closed / "stick"],
                          "read": ["read", closed / "stick", public_dir / "out.img"]}[command]
    result = _as_nobody(*args, keep=keep)
    assert result.stderr.splitlines() == [
        f"popsicle-py: {closed / 'stick'} cannot be examined: Permission denied"]
    assert result.returncode == 2
    assert loop.read() == bytes([PATTERN]) * loop.size


@pytest.mark.root
def test_a_loop_device_whose_file_nobody_can_find_is_busy_for_an_ordinary_user(
        public_dir: Path) -> None:
    """Without root the kernel cannot be asked what a loop device stands on, and the name
    sysfs shows for a deleted file finds nothing: what writing it overwrites is unknown, so it
    is refused (udisks would let this user write it).  Root asks the kernel and knows."""
    import json

    from loopdev import attach

    backing = Path(tempfile.mkdtemp(prefix="popsicle-test-", dir="/dev/shm")) / "gone.img"
    with open(backing, "wb") as f:
        f.truncate(4 * MiB)
    path = attach(backing)
    try:
        backing.unlink()
        keep = public_dir / "keep"
        keep.mkdir()
        listed = _as_nobody("list", "--all", "--json", keep=keep)
        assert listed.returncode == 0, listed.stderr
        ours = next(d for d in json.loads(listed.stdout) if d["path"] == path)
        assert ours["busy"] == [
            f"backed by {backing} (deleted), which cannot be found by that name (deleted, "
            "renamed, or attached in another mount namespace), so what writing it overwrites "
            "is unknown"]
        as_root = subprocess.run([sys.executable, "-m", "popsicle_py", "list", "--all",
                                  "--json"], capture_output=True, text=True, check=True,
                                 timeout=60)
        assert next(d for d in json.loads(as_root.stdout) if d["path"] == path)["busy"] == []
    finally:
        subprocess.run(["losetup", "-d", path], capture_output=True, check=False)
        backing.parent.rmdir()


@pytest.mark.root
@pytest.mark.parametrize("through", ["itself", "a loop device over its file"])
def test_a_drive_mounted_in_another_namespace_is_seen_by_an_ordinary_user(
        loop_factory: Callable[..., Loop], public_dir: Path, through: str) -> None:
    """A service's private mount (``unshare -m``) of the drive, or of a loop device over the
    drive's file: without root the process's ns/mnt link cannot be read, but its mountinfo
    can, and the drive is refused as root refuses it (before, every other user's namespace
    was skipped and the drive was offered, and written through udisks2)."""
    import json

    from loopdev import attach

    loop = loop_factory(16 * MiB)
    mounted = loop.path if through == "itself" else attach(loop.backing)
    subprocess.run(["mkfs.ext4", "-q", "-F", mounted], check=True)
    mnt = tempfile.mkdtemp(prefix="popsicle-mnt-", dir="/tmp")
    keep = public_dir / "keep"
    keep.mkdir()
    holder = subprocess.Popen(
        [*new_mount_namespace(), "sh", "-c",
         f"{DROP_OTHER_TESTS_MOUNTS}mount {mounted} {mnt} && echo ready && exec sleep 600"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        listed = _as_nobody("list", "--all", "--json", keep=keep)
        assert listed.returncode == 0, listed.stderr
        ours = next(d for d in json.loads(listed.stdout) if d["path"] == loop.path)
        as_root = subprocess.run([sys.executable, "-m", "popsicle_py", "list", "--all",
                                  "--json"], capture_output=True, text=True, check=True,
                                 timeout=60)
        assert ours["busy"] == next(d for d in json.loads(as_root.stdout)
                                    if d["path"] == loop.path)["busy"]
        assert ours["busy"][0].startswith(f"mounted at {mnt} ")
        assert f"in the mount namespace of pid {holder.pid} (sleep)" in ours["busy"][0]
    finally:
        holder.kill()
        holder.wait()
        os.rmdir(mnt)
        if mounted != loop.path:
            subprocess.run(["losetup", "-d", mounted], capture_output=True, check=False)
