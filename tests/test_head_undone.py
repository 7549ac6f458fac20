"""No failed, cancelled or hung-up drive ends looking like the image (issue 25, items 3-5).

A btrfs image keeps its superblock at 64 KiB: with a 64 KiB head that superblock went on early,
and a drive cut short was called btrfs by ``blkid`` (and could mount).  The head is now 1 MiB
(or up to the first partition), and once its write has begun, a drive that fails (a flipped
byte or an EIO in its read-back) or is stopped gets the random stamp written back over it.
Each check reads what is really on the drive: ``blkid -p``, ``mount``, and its first MiB.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import select
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, needs_root, popsicle_cmd
from faulty import FaultyDrive, clean_eio_start

from popsicle_py import BusWriter
from popsicle_py.engine import HEAD
from popsicle_py.engine.head import head_length
from popsicle_py.errors import AllDestinationsFailed, Cancelled

MiB = 1 << 20
BLOCK = 4096
FILL = 0x5A
#: A byte inside the head (the 64 KiB one of before too), in no signature blkid looks for.
INSIDE_HEAD = 40 * 1024 + 5


@pytest.fixture(scope="module")
def btrfs_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A 24 MiB btrfs (mixed mode) made with --rootdir: files of random data and a text."""
    base = tmp_path_factory.mktemp("btrfs")
    root = base / "root"
    root.mkdir()
    (root / "random.bin").write_bytes(os.urandom(6 * MiB))
    (root / "hello.txt").write_text("hello\n")
    image = base / "btrfs.img"
    with open(image, "wb") as f:
        f.truncate(24 * MiB)
    subprocess.run(["mkfs.btrfs", "-q", "-M", "--rootdir", str(root), str(image)], check=True,
                   capture_output=True)
    data = image.read_bytes()
    assert blkid_type(str(image)) == "btrfs" and data[0x10040:0x10048] == b"_BHRfS_M"
    return image, data


def blkid_type(path: str) -> str | None:
    out = subprocess.run(["blkid", "-p", "-o", "export", path], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("TYPE="):
            return line.split("=", 1)[1]
    return None


def mounts(device: str, tmp_path: Path) -> bool:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-o", "ro", device, str(mnt)], capture_output=True)
    if proc.returncode == 0:
        subprocess.run(["umount", str(mnt)], check=True)
    return proc.returncode == 0


def assert_not_the_image(device: str, head: bytes, data: bytes, tmp_path: Path) -> None:
    """No block of the image's head is on the drive, blkid sees no btrfs, and it does not mount."""
    assert blkid_type(device) is None
    assert not mounts(device, tmp_path)
    assert len(head) == HEAD
    same = [i for i in range(0, HEAD, BLOCK) if head[i : i + BLOCK] == data[i : i + BLOCK]]
    assert not same, f"blocks of the image's head on the drive at {same[:8]}"


def flash(*args: str, timeout: float = 300) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run([*popsicle_cmd(), "flash", *args, "--yes", "--json"],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, [json.loads(x) for x in proc.stdout.splitlines()], proc.stderr


def result_of(events: list[dict[str, Any]], device: str) -> dict[str, Any]:
    assert events[-1]["event"] == "summary"
    return next(r for r in events[-1]["results"] if r["device"] == device)


def test_the_head_reaches_the_first_partition_or_1_mib() -> None:
    mbr = bytearray(512)
    mbr[510:512] = b"\x55\xaa"
    assert head_length(bytes(512)) == HEAD == 1 << 20  # no table: 1 MiB
    mbr[446 + 4], mbr[446 + 8 : 446 + 16] = 0x83, (2048).to_bytes(4, "little") + bytes([1, 0, 0, 0])
    assert head_length(mbr) == 1 << 20  # a partition at 1 MiB
    mbr[446 + 8 : 446 + 12] = (512).to_bytes(4, "little")
    assert head_length(mbr) == 256 << 10  # at 256 KiB: the bytes before it
    mbr[446 + 8 : 446 + 12] = (63).to_bytes(4, "little")
    assert head_length(mbr) == 64 << 10  # never less than 64 KiB
    mbr[446 + 8 : 446 + 12] = (0).to_bytes(4, "little")
    assert head_length(mbr) == HEAD  # an isohybrid's partition at 0 holds the table: 1 MiB


def test_a_gpt_image_holds_up_to_its_first_partition(tmp_path: Path) -> None:
    image = tmp_path / "gpt.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    table = "label: gpt\nfirst-lba: 34\nstart=1024, size=2048\nstart=4096, size=2048\n"
    subprocess.run(["sfdisk", "-q", str(image)], input=table, text=True, check=True,
                   capture_output=True)
    assert head_length(image.read_bytes()[: 64 << 10]) == 512 << 10


# -- on loop devices: cut short by a dying drive, an EIO, Ctrl-C ---------------------------------


@needs_root
def test_a_btrfs_image_cut_short_by_a_dying_drive_is_not_btrfs(
        btrfs_image: tuple[Path, bytes], loop_factory: Callable[..., Loop],
        dying_loop: Callable[..., Loop], tmp_path: Path) -> None:
    path, data = btrfs_image
    good = loop_factory(32 * MiB, fill=FILL)
    dying = dying_loop(32 * MiB, good=12 * MiB)
    rc, events, stderr = flash(str(path), good.path, dying.path, "--no-probe")
    assert rc == 1, stderr
    assert result_of(events, good.path)["status"] == "ok"
    assert result_of(events, dying.path)["status"] == "failed"
    assert good.read(len(data)) == data
    assert_not_the_image(dying.path, dying.read(HEAD), data, tmp_path)


@needs_root
def test_a_btrfs_image_cut_short_by_an_eio_is_not_btrfs(
        btrfs_image: tuple[Path, bytes], faulty_drive: Callable[..., FaultyDrive],
        tmp_path: Path) -> None:
    path, data = btrfs_image
    bad = clean_eio_start(16 * MiB)
    drive = faulty_drive(32 * MiB, fill=FILL, bad_write=(bad, bad + MiB))
    rc, events, stderr = flash(str(path), drive.path, "--no-probe")
    assert rc == 1, stderr
    assert result_of(events, drive.path)["status"] == "failed"
    drive.clear()
    assert_not_the_image(drive.path, drive.read(0, HEAD), data, tmp_path)


@needs_root
def test_a_btrfs_image_cut_short_by_ctrl_c_is_not_btrfs(
        btrfs_image: tuple[Path, bytes], loop_factory: Callable[..., Loop],
        throttle: Callable[..., Callable[[int], None]], tmp_path: Path) -> None:
    path, data = btrfs_image
    drive = loop_factory(32 * MiB, fill=FILL)
    add = throttle((drive, 4 * MiB))
    proc = subprocess.Popen([*popsicle_cmd(), "flash", str(path), drive.path, "--yes", "--json",
                             "--no-probe", "--bucket-size", "1M"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["bytes"] >= 16 * MiB:
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert_not_the_image(drive.path, drive.read(HEAD), data, tmp_path)


# -- failures at the head's read-back ------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("fault", ["flipped byte", "read EIO"])
def test_a_head_that_does_not_read_back_is_overwritten_again(
        btrfs_image: tuple[Path, bytes], faulty_drive: Callable[..., FaultyDrive],
        tmp_path: Path, fault: str) -> None:
    """The head's byte reads right once (the stamp's read-back), then wrong or not at all (the
    head's own read-back): the drive fails, and its first MiB are the stamp again."""
    path, data = btrfs_image
    faults = ({"flip_bit": (INSIDE_HEAD, 2)} if fault == "flipped byte" else
              {"bad_read_from": (INSIDE_HEAD, INSIDE_HEAD + 1, 2)})
    drive = faulty_drive(32 * MiB, fill=FILL, **faults)
    rc, events, stderr = flash(str(path), drive.path, "--no-probe")
    assert rc == 1, stderr
    result = result_of(events, drive.path)
    assert result["status"] == ("invalid" if fault == "flipped byte" else "failed")
    assert drive.read(HEAD, len(data) - HEAD) == data[HEAD:]  # all but the head was written
    drive.clear()
    assert_not_the_image(drive.path, drive.read(0, HEAD), data, tmp_path)
    assert result["error"].endswith("; the image's first 1 MiB were overwritten again"), result


@needs_root
def test_a_head_write_that_hangs_then_lands_gets_the_stamp_back(
        btrfs_image: tuple[Path, bytes], faulty_drive: Callable[..., FaultyDrive],
        loop_factory: Callable[..., Loop], throttle: Callable[..., Callable[[int], None]],
        tmp_path: Path) -> None:
    """Once the drive verifies, its next write into the head hangs for 8 s: it is given up as
    stalled after 2 s, and the write lands while a slower drive still runs (16 s).  The stamp
    follows it: the failed drive does not end holding the image's head."""
    path, data = btrfs_image
    drive = faulty_drive(32 * MiB, fill=FILL, crawl=(0, 30 * MiB))
    slow = loop_factory(32 * MiB, fill=FILL)
    add = throttle((slow, 3 * MiB))
    proc = subprocess.Popen([*popsicle_cmd(), "flash", str(path), drive.path, slow.path, "--yes",
                             "--json", "--no-probe", "--stall-timeout", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if (event["event"], event.get("device"), event.get("phase")) == (
                "phase", drive.path, "verifying"):
            drive.set(hang=(100, 8))  # in the head's last call (and in a 64 KiB head)
            break
    out, err = proc.communicate(timeout=120)
    events = [json.loads(x) for x in out.splitlines()]
    assert proc.returncode == 1, err
    assert result_of(events, slow.path)["status"] == "ok", result_of(events, slow.path)
    assert result_of(events, drive.path)["cause"] == "stalled"
    assert [o for o, _, what in drive.write_outcomes() if what == "hang"] == [0]
    drive.clear()
    assert_not_the_image(drive.path, drive.read(0, HEAD), data, tmp_path)


# -- a terminal hang-up ---------------------------------------------------------------------------


@needs_root
def test_a_terminal_hang_up_exits_129_with_no_image_head(
        btrfs_image: tuple[Path, bytes], loop_factory: Callable[..., Loop],
        throttle: Callable[..., Callable[[int], None]], tmp_path: Path) -> None:
    """The flash runs in a real terminal (a pty, its controlling terminal); the terminal goes
    away mid-run (an ssh connection dropped): exit 129, the drive let go and not the image."""
    path, data = btrfs_image
    drive = loop_factory(32 * MiB, fill=FILL)
    add = throttle((drive, 4 * MiB))
    master, slave = os.openpty()

    def child() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        add(os.getpid())

    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    proc = subprocess.Popen([*popsicle_cmd(), "flash", str(path), drive.path, "--yes",
                             "--no-probe", "--bucket-size", "1M"], stdin=slave, stdout=slave,
                            stderr=slave, preexec_fn=child, env=env)
    os.close(slave)
    try:
        seen = bytearray()
        before = drive.write_stat_sectors()
        deadline = time.monotonic() + 60
        # Until 8 MiB reached the drive (its own counter), reading what the terminal shows.
        while drive.write_stat_sectors() - before < 8 * MiB // 512:
            assert time.monotonic() < deadline and proc.poll() is None, bytes(seen)
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                seen += os.read(master, 65536)
    finally:
        os.close(master)  # the terminal hangs up
    assert proc.wait(timeout=60) == 129
    os.close(os.open(drive.path, os.O_RDONLY | os.O_EXCL))  # let go: O_EXCL works again
    assert_not_the_image(drive.path, drive.read(HEAD), data, tmp_path)


# -- the engine: a head write that hangs and then lands, a cancel during a slow head -------------


class SlowHead(io.BytesIO):
    """A destination whose writes into the head's place, once the rest is written, are slow
    (``seconds_per_mib``) or wait for ``release``; every write is recorded."""

    def __init__(self, *, seconds_per_mib: float = 0.0) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.seconds_per_mib = seconds_per_mib
        self.body_written = False
        self.calls: list[tuple[int, int]] = []

    def write(self, data: Any) -> int:
        offset, length = self.tell(), len(memoryview(data))
        self.calls.append((offset, length))
        if offset >= HEAD:
            self.body_written = True
        elif self.body_written and not self.entered.is_set():
            self.entered.set()  # the head's first call
            if self.seconds_per_mib:
                time.sleep(length / MiB * self.seconds_per_mib)
            else:
                self.release.wait(30)
        return super().write(data)


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("popsicle-")]


@pytest.fixture
def payload() -> Iterator[bytes]:
    yield os.urandom(3 * MiB)
    deadline = time.monotonic() + 10
    while engine_threads() and time.monotonic() < deadline:
        time.sleep(0.05)


def no_image_head(dest: io.BytesIO, payload: bytes) -> bool:
    got = dest.getvalue()[:HEAD]
    return all(got[i : i + BLOCK] != payload[i : i + BLOCK] for i in range(0, HEAD, BLOCK))


def test_a_head_write_that_hangs_then_lands_is_overwritten_again(payload: bytes) -> None:
    """Given up as stalled inside its head's write; the write lands later: the stamp follows."""
    dest = SlowHead()
    writer = BusWriter(io.BytesIO(payload), [dest], lambda msg: None, lambda: False)
    writer.bucket_size(256 << 10).stall_timeout(0.5).finish_each(verify=True)
    with pytest.raises(AllDestinationsFailed):
        writer.write()
    assert dest.entered.is_set()
    dest.release.set()  # the hung write lands now
    deadline = time.monotonic() + 10
    while engine_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine_threads()
    assert no_image_head(dest, payload)
    assert dest.getvalue()[HEAD:] == payload[HEAD:]


def test_a_stamp_that_does_not_go_back_in_time_is_said(
        payload: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given up inside its head's write, and that write does not return within the grace the
    run gives it: the run ends, and says the drive may still hold the image's head (before: a
    plain "stalled", as if the stamp were back)."""
    from popsicle_py import BusWriterMessage
    from popsicle_py.engine import supervisor

    monkeypatch.setattr(supervisor, "UNDO_GRACE", 0.5)
    dest = SlowHead()
    said: list[Any] = []
    writer = BusWriter(io.BytesIO(payload), [dest], said.append, lambda: False)
    writer.bucket_size(256 << 10).stall_timeout(0.5).finish_each(verify=True)
    try:
        with pytest.raises(AllDestinationsFailed):
            writer.write()
        assert dest.entered.is_set() and not dest.release.is_set()
    finally:
        dest.release.set()
    undone = [m for m in said if isinstance(m, BusWriterMessage.HeadUndone)]
    assert undone == [BusWriterMessage.HeadUndone(0, head_length(payload), False)], said


def test_a_cancel_stops_a_slow_head_write_within_one_call(payload: bytes) -> None:
    """A drive that takes 20 s per MiB in the head's place: cancelled during the head's first
    call, no other call of the head starts, and the stamp goes back over what it wrote."""
    dest = SlowHead(seconds_per_mib=20.0)
    messages: list[Any] = []
    writer = BusWriter(io.BytesIO(payload), [dest], messages.append, dest.entered.is_set)
    writer.bucket_size(256 << 10).finish_each(verify=True)
    with pytest.raises(Cancelled):
        writer.write()
    assert not engine_threads()  # it finished within the grace: nothing left writing
    first = next(i for i, (o, _) in enumerate(dest.calls) if o < HEAD and i > 0
                 and any(p >= HEAD for p, _ in dest.calls[:i]))
    head_calls = dest.calls[first:]
    # The head's one call, then the stamp back over what it wrote (below it, the drive
    # still holds the stamp), from there up; no second call of the head.
    assert head_calls[0][0] > 0 and head_calls[0][1] < HEAD
    stamp = head_calls[1:]
    assert stamp[0][0] == head_calls[0][0] and stamp[-1][0] + stamp[-1][1] == HEAD
    assert sum(n for _, n in stamp) == HEAD - head_calls[0][0]
    assert no_image_head(dest, payload)
    undone = [m for m in messages if type(m).__name__ == "HeadUndone"]
    assert [(m.length, m.done) for m in undone] == [(HEAD, True)]


class FsyncFailsAfterHead(io.BytesIO):
    """Its first flush (the fsync) once the head's place is written after the rest fails."""

    def __init__(self) -> None:
        super().__init__()
        self.body_written = False
        self.head_begun = False
        self.failed = False

    def write(self, data: Any) -> int:
        if self.tell() >= HEAD:
            self.body_written = True
        elif self.body_written:
            self.head_begun = True
        return super().write(data)

    def flush(self) -> None:
        if self.head_begun and not self.failed:
            self.failed = True
            raise OSError(errno.EIO, "Input/output error")
        super().flush()


def test_an_fsync_eio_after_the_head_write_gets_the_stamp_back(payload: bytes) -> None:
    dest, healthy = FsyncFailsAfterHead(), io.BytesIO()
    messages: list[Any] = []
    result = BusWriter(io.BytesIO(payload), [dest, healthy], messages.append,
                       lambda: False).bucket_size(256 << 10).finish_each(verify=True).write()
    assert dest.failed and result[0].error is not None and result[0].error.errno == errno.EIO
    assert result[1].ok and healthy.getvalue() == payload
    assert no_image_head(dest, payload)
    assert dest.getvalue()[HEAD:] == payload[HEAD:]
    undone = [(m.id, m.length, m.done) for m in messages if type(m).__name__ == "HeadUndone"]
    assert undone == [(0, HEAD, True)]

