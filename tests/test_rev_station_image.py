"""The station's image before any drive: its SHA-256 (for the page, the journal and the
certificates) is read from a share that may hang; a stall or Ctrl-C there ends the station on
time, in one line, nothing written.  And the sticks are copies of the image that digest is of:
an image changed after it was read (at the confirmation) is refused."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import popsicle_cmd
from faulty import FaultyFile, faulty_files

MiB = 1 << 20


class Lines:
    """A child's stderr lines, collected on a thread; :meth:`wait` for one containing text."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.closed = False
        assert proc.stderr is not None
        threading.Thread(target=self._read, args=(proc.stderr,), daemon=True).start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, text: str, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: any(text in line for line in self.lines)
                                      or self.closed, timeout) and any(
                text in line for line in self.lines)


def waiting_on_the_share(pid: int) -> set[str]:
    """The threads of ``pid`` waiting on a FUSE request (the image's share) now."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                if f.read().startswith("request_wait_answer"):
                    found.add(tid)
        except OSError:
            pass
    return found


@contextmanager
def station_on_a_hanging_share(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str],
                                                                 FaultyFile, Lines]]:
    """A station whose image's share stops answering past its first 8 MiB."""
    data = os.urandom(32 * MiB)
    with faulty_files() as made:
        image = FaultyFile(len(data), content=data, faults={"crawl": (8 * MiB, 1, 12 * MiB)})
        made.append(image)
        proc = subprocess.Popen(
            [*popsicle_cmd(), "station", image.file, "--yes", "--force", "--stall-timeout",
             "3", "--listen", "127.0.0.1:0", "--journal", str(tmp_path / "journal.sqlite")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            yield proc, image, Lines(proc)
        finally:
            image.clear()  # the share answers again: the process can end
            if proc.poll() is None:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
            assert proc.stderr is not None
            proc.stderr.close()


def test_a_station_whose_image_share_hangs_is_refused_after_the_stall_timeout(
        tmp_path: Path) -> None:
    """The SHA-256 was read on the main thread with no stall timeout: the station waited for
    the share for good, --stall-timeout unheard.  Now it is refused in one line after it."""
    with station_on_a_hanging_share(tmp_path) as (proc, _image, err):
        said = err.wait("stopped answering while its SHA-256 was computed: no data for 3 s",
                        timeout=20)
        assert said, "".join(err.lines)
    assert proc.returncode == 2, "".join(err.lines)
    assert "Traceback" not in "".join(err.lines)


def test_ctrl_c_while_the_image_share_hangs_says_so_at_once(tmp_path: Path) -> None:
    """Ctrl-C while the SHA-256's read waits on the share: said at once (130, nothing
    written, and that the process ends once the share answers), never silence until then."""
    with station_on_a_hanging_share(tmp_path) as (proc, _image, err):
        waited = threading.Event()
        before: set[str] = set()
        while True:  # a thread that stays in the share: the hash in its crawl, not a check
            now = waiting_on_the_share(proc.pid)
            if now & before:
                break
            before = now
            assert proc.poll() is None, "".join(err.lines)
            waited.wait(0.3)
        proc.send_signal(signal.SIGINT)
        said = err.wait("nothing was written", timeout=5)
        assert said, "".join(err.lines)
        assert err.wait("a read of the image for its SHA-256 has not returned", timeout=5), \
            "".join(err.lines)
    assert proc.returncode == 130, "".join(err.lines)


def test_an_image_changed_at_the_confirmation_is_refused_not_served_under_its_old_sha256(
        tmp_path: Path) -> None:
    """The SHA-256 was read before the confirmation, the image held still only from the
    session's start: an image edited while the question waited was written to every stick,
    the page, the journal and the certificates naming the old digest.  Now it is refused."""
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(MiB))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*popsicle_cmd(), "station", str(image), "--force", "--listen", "127.0.0.1:0",
         "--journal", str(tmp_path / "journal.sqlite")],
        stdin=slave, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    said = bytearray()
    cond = threading.Condition()

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                chunk = b""
            with cond:
                said.extend(chunk)
                cond.notify_all()
            if not chunk:
                return

    threading.Thread(target=read, daemon=True).start()
    try:
        with cond:
            assert cond.wait_for(lambda: b"Continue?" in said, 30), said.decode()
        with open(image, "r+b") as f:  # edited in place while the question waits
            f.seek(100)
            f.write(b"edited")
        os.write(master, b"y\n")
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:  # serving, under the old digest
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(20)
        with cond:
            cond.wait_for(lambda: b"start again" in said, 5)
            text = bytes(said).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        assert proc.stdout is not None
        proc.stdout.close()
    assert rc == 2, text
    assert f"{image} changed since its SHA-256 was read (it was written to): start again" in (
        " ".join(text.split())), text
