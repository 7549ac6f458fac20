"""Standard input is named as the user gave it, never by the private copy made of it.

``watch -`` keeps what comes through the pipe in a private file (every drive is written from
it) and removes it at the end: a refusal naming that file names something the user never
gave, and that no longer exists.  Through the command; these refusals come before any drive.
"""

from __future__ import annotations

import gzip
import lzma
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import popsicle_cmd, waits_in_kernel


def image() -> bytes:
    data = bytearray(os.urandom(1 << 20))
    data[510:512] = b"\x55\xaa"
    return bytes(data)


def dmg() -> bytes:
    """Bytes ending with an Apple disk image's "koly" trailer (version 4, 512 bytes)."""
    koly = b"koly" + struct.pack(">II", 4, 512)
    return image() + koly.ljust(512, b"\0")


def watch(stdin: bytes) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*popsicle_cmd(), "watch", "-", "--yes"], capture_output=True,
                          input=stdin, timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode())


CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "cut xz": (lambda: lzma.compress(image(), preset=0)[:300_000],
               "standard input does not end with a complete xz index and footer"),
    "cut gzip": (lambda: gzip.compress(image(), 1)[:300_000],
                 "standard input is corrupt or truncated"),
    "dmg": (dmg, "standard input is an Apple disk image (DMG)"),
    "dmg in gzip": (lambda: gzip.compress(dmg(), 1),
                    "standard input (inside its gzip layer) is an Apple disk image (DMG)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_watch_names_standard_input_not_its_copy(case: str) -> None:
    make, said = CASES[case]
    result = watch(make())
    refusal = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr
    assert said in refusal, refusal
    assert "popsicle-py-stdin-" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["flash", "verify"])
def test_a_silent_pipe_is_named_as_one(command: str, tmp_path: Path) -> None:
    """A pipe whose writer sends nothing (stuck, or asking for a password) is refused after
    --stall-timeout as standard input, not as a hung disk or network share."""
    target = tmp_path / "target"  # refused before any drive is looked at
    target.write_bytes(b"")
    args = [*popsicle_cmd(), command, "-", str(target), "--stall-timeout", "1"]
    if command == "flash":
        args.append("--yes")
    with subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            proc.wait(timeout=60)  # the pipe stays open, silent, meanwhile
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
        assert proc.stderr is not None
        err = proc.stderr.read()
    assert proc.returncode == 2, err
    assert "standard input gave nothing for 1 s" in err, err
    assert "disk or network share" not in err


def test_a_named_pipe_is_pointed_to_standard_input(tmp_path: Path) -> None:
    """A FIFO as IMAGE is refused (every pass opens the image again) saying how it is read."""
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    target = tmp_path / "target"
    target.write_bytes(b"")
    result = subprocess.run([*popsicle_cmd(), "flash", str(fifo), str(target), "--yes"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines == [f"popsicle-py: {fifo} is a named pipe (FIFO), which can be read only "
                     f"once: give it as standard input (`popsicle-py flash - DEVICE < {fifo}`)"]


@pytest.mark.parametrize("command", ["flash", "verify"])
def test_ctrl_c_on_a_silent_pipe_says_nothing_of_a_hung_disk(command: str,
                                                              tmp_path: Path) -> None:
    """Ctrl-C while the start of standard input is awaited: one line, exit 130; not the
    note for a hung disk ("... has not returned; popsicle-py exits once it does"), which a
    pipe never is: its read ends with the process."""
    target = tmp_path / "target"
    target.write_bytes(b"")
    args = [*popsicle_cmd(), command, "-", str(target)] + (["--yes"] if command == "flash"
                                                            else [])
    with subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            deadline = time.monotonic() + 30
            while not any(waits_in_kernel(proc.pid, wchan)  # as kernels name it
                          for wchan in ("anon_pipe_read", "pipe_read")):
                assert time.monotonic() < deadline, "never read standard input"
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=10)
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
        assert proc.stderr is not None
        err = proc.stderr.read()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["popsicle-py: interrupted before writing: nothing "
                                        "was written"]


def test_watch_says_standard_input_was_decompressed(tmp_path: Path) -> None:
    """``watch -`` with a compressed image decompresses it once to a raw copy, and says so
    of standard input, not of the private file it kept the pipe's bytes in."""
    source = tmp_path / "disk.img.gz"
    source.write_bytes(gzip.compress(image(), 1))
    with source.open("rb") as stdin, subprocess.Popen(
            [*popsicle_cmd(), "watch", "-", "--yes", "--json"], stdin=stdin,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # until the image is ready: it watches for drives then
            seen.append(line)
            if '"decompressed ' in line:
                break
        proc.send_signal(signal.SIGINT)
        seen += proc.stdout.readlines()
        proc.wait(timeout=30)
    out = "".join(seen)
    assert '"detail": "standard input"' in out, out
    assert "decompressed standard input once (1 MiB)" in out, out
    assert "popsicle-py-stdin-" not in out
