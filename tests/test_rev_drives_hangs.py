"""A mount whose source names a file on a hung share never hangs ``list`` or a plan.

A FUSE image driver's mount names its image file as its source; the drive layer stat()s it
(a mount straight from a file, a chroot's node).  With that file on a share whose daemon is
stopped (tests/faultfs.py, SIGSTOP), the stat never returns and Ctrl-C is not heard.  Here
the mount is a tmpfs given that source: the name is all that matters.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd
from loopdev import DROP_OTHER_TESTS_MOUNTS, new_mount_namespace

MiB = 1 << 20
PATTERN = 0xA5


@contextlib.contextmanager
def hung_source(tmp_path: Path, where: str) -> Iterator[None]:
    """A tmpfs mounted with a file of a stopped FUSE daemon as its source: in our mount
    namespace (``here``), or only in another one a sleeping process keeps (``elsewhere``)."""
    from faulty import FaultyFile

    share = FaultyFile(MiB, attr_timeout=0)  # every stat asks the daemon
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    keeper: subprocess.Popen[bytes] | None = None
    try:
        if where == "here":
            subprocess.run(["mount", "-t", "tmpfs", share.file, str(mountpoint)], check=True)
        else:
            keeper = subprocess.Popen(
                [*new_mount_namespace(), "sh", "-c",
                 DROP_OTHER_TESTS_MOUNTS
                 + f"mount -t tmpfs {share.file} {mountpoint} && echo ready && exec sleep 60"],
                stdout=subprocess.PIPE)
            assert keeper.stdout is not None and keeper.stdout.readline() == b"ready\n"
        os.kill(share.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(share.pid, signal.SIGCONT)
    finally:
        if keeper is not None:
            keeper.kill()
            keeper.wait()
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
        share.close()


def popsicle(*args: object) -> subprocess.CompletedProcess[str]:
    """The command, given 20 s (before: it waited for the stopped daemon, for ever)."""
    return subprocess.run([*popsicle_cmd(), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=20, check=False)


@pytest.mark.root
@pytest.mark.parametrize("where", ["here", "elsewhere"])
def test_list_and_flash_with_a_mount_sourced_on_a_hung_share(
        loop_factory: Callable[..., Loop], tmp_path: Path, where: str) -> None:
    target = loop_factory(4 * MiB, fill=PATTERN)
    image = tmp_path / "disk.img"
    data = os.urandom(MiB)
    image.write_bytes(data)
    with hung_source(tmp_path, where):
        listed = popsicle("list", "--all", "--json")
        assert listed.returncode == 0, listed.stderr
        assert target.path in {d["path"] for d in json.loads(listed.stdout)}
        done = popsicle("flash", "--yes", "--no-probe", image, target.path)
        assert done.returncode == 0, done.stderr
    assert target.read(MiB) == data


@pytest.mark.root
@pytest.mark.parametrize("command", ["flash", "verify", "erase", "read"])
def test_a_target_named_on_a_hung_share_is_refused_in_time(tmp_path: Path,
                                                           command: str) -> None:
    """The name itself is on a share whose daemon is stopped.  Before: click's stat() of it,
    then the drive layer's, waited for ever, Ctrl-C unheard."""
    from faulty import FaultyFile

    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    share = FaultyFile(MiB, attr_timeout=0)
    try:
        os.kill(share.pid, signal.SIGSTOP)
        try:
            args = {"flash": ("flash", "--yes", "--no-probe", image, share.file),
                    "verify": ("verify", image, share.file),
                    "erase": ("erase", "--yes", share.file),
                    "read": ("read", share.file, tmp_path / "out.img")}[command]
            done = popsicle(*args)
        finally:
            os.kill(share.pid, signal.SIGCONT)
    finally:
        share.close()
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"popsicle-py: {share.file} does not answer (a name on a hung network or FUSE "
        "mount?); name the drive as /dev/sdX")


@pytest.mark.root
def test_an_overlay_with_a_layer_on_a_hung_share_never_hangs_list_or_flash(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """An overlay whose lower layer is a FUSE share whose daemon is then stopped: its layers
    are followed to find the drives it rests on.  Before: ``list`` waited for ever."""
    from faulty import FaultyFile

    target = loop_factory(4 * MiB, fill=PATTERN)
    image = tmp_path / "disk.img"
    data = os.urandom(MiB)
    image.write_bytes(data)
    share = FaultyFile(MiB, attr_timeout=0)
    merged = tmp_path / "merged"
    for name in ("upper", "work", "merged"):
        (tmp_path / name).mkdir()
    try:
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={share.mount},upperdir={tmp_path}/upper,"
                        f"workdir={tmp_path}/work", str(merged)], check=True)
        os.kill(share.pid, signal.SIGSTOP)
        try:
            listed = popsicle("list", "--all", "--json")
            done = popsicle("flash", "--yes", "--no-probe", image, target.path)
        finally:
            os.kill(share.pid, signal.SIGCONT)
    finally:
        subprocess.run(["umount", str(merged)], capture_output=True, check=False)
        share.close()
    assert listed.returncode == 0, listed.stderr
    assert target.path in {d["path"] for d in json.loads(listed.stdout)}
    assert done.returncode == 0, done.stderr
    assert target.read(MiB) == data


def test_a_question_that_fails_is_unanswered_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A look that raises on its thread (a layer that vanished mid-walk) is as unanswered:
    it went to the thread's excepthook, a traceback on the user's terminal."""
    import threading

    from popsicle_py.drives.asking import in_time

    raised: list[object] = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    assert in_time(lambda: str(1 // 0), "unanswered") == "unanswered"
    for thread in threading.enumerate():
        if thread.name == "popsicle-in-time":
            thread.join(10)
    assert raised == []
