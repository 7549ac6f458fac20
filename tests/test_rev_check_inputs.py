"""``popsicle-py check``: what it is given to judge by (review and fix, session 19).

A certificate, its signature, a SHA256SUMS file or an allowed_signers file on a hung share
held the command for ever, Ctrl-C unheard; a drive named where the certificate goes was read
(256 MiB of it) before "too large to be a certificate"; a signature made for another
namespace, or a file that is no signature, was called a certificate "changed after signing";
a SHA256SUMS with SHA-512 lines too (``sha256sum --tag; sha512sum --tag``) had "no SHA-256".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import popsicle_cmd
from tests.faulty import FaultyFile
from tests.loopdev import Loop
from tests.test_check import certificate_for, image_bytes

MiB = 1 << 20


def check(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), "check", *map(str, args)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout)


@pytest.fixture
def stick(loop_factory: Callable[..., Loop], tmp_path: Path) -> tuple[Path, str, bytes]:
    """(an unsigned certificate, the drive it certifies, the image's bytes)."""
    data = image_bytes(3 * MiB)
    loop = loop_factory(4 * MiB, fill=0x5A)
    with open(loop.backing, "r+b") as f:
        f.write(data)
    cert = tmp_path / "c.json"
    cert.write_text(certificate_for(data).text())
    return cert, loop.path, data


@contextlib.contextmanager
def hung_file() -> Iterator[FaultyFile]:
    """A file on a FUSE share whose daemon is stopped: every look at it waits."""
    share = FaultyFile(4096, fill=0x20, attr_timeout=0)
    try:
        os.kill(share.pid, signal.SIGSTOP)
        try:
            yield share
        finally:
            os.kill(share.pid, signal.SIGCONT)
    finally:
        share.close()


def _args(where: str, share: str, cert: Path, drive: str) -> list[str | Path]:
    cases: dict[str, list[str | Path]] = {
        "certificate": [share, drive],
        "--sums": ["--sums", share, "disk.img", "--size", "4096", drive],
        "--allowed-signers": [cert, drive, "--allowed-signers", share]}
    return cases[where]


@pytest.mark.root
@pytest.mark.parametrize("where", ["certificate", "--sums", "--allowed-signers"])
def test_a_file_on_a_hung_share_is_refused_on_time(stick: tuple[Path, str, bytes],
                                                   where: str) -> None:
    """Before: no answer, ever (the test's 20 s ran out)."""
    cert, drive, _ = stick
    with hung_file() as share:
        done = check(*_args(where, share.file, cert, drive), "--stall-timeout", "1",
                     timeout=20)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (f"popsicle-py: {where} {share.file} stopped answering: no answer "
                           "for 1 s (is the disk or network share it is on hung?)\n")


def _waits_on_fuse(pid: int) -> bool:
    """Whether a thread of ``pid`` waits for a FUSE daemon's answer (its wchan says so)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/wchan") as f:
            if "fuse" in (where := f.read()) or "request_wait_answer" in where:
                return True
    return False


@pytest.mark.root
def test_ctrl_c_is_heard_while_a_certificate_on_a_hung_share_is_read(
        stick: tuple[Path, str, bytes]) -> None:
    """Before: SIGINT was not heard at all (the main thread sat in the FUSE request)."""
    _, drive, _ = stick
    with hung_file() as share:
        proc = subprocess.Popen([*popsicle_cmd(), "check", share.file, drive],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while not _waits_on_fuse(proc.pid):  # until the command waits on the share
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, err
    assert err.startswith("popsicle-py: interrupted before writing: nothing was written\n")


def test_a_drive_named_as_the_certificate_is_not_read(stick: tuple[Path, str, bytes]) -> None:
    """``check DEVICE CERT``, the two swapped.  Before: the drive was read as a certificate,
    up to 256 MiB of it, then "not JSON" (or "too large to be a certificate")."""
    cert, drive, _ = stick
    done = check(drive, cert)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (f"popsicle-py: certificate {drive}: a drive, not a certificate "
                           "(give CERT first, then DEVICE)\n")


@pytest.fixture
def key(tmp_path: Path) -> Path:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (tmp_path / "allowed_signers").write_text(
        f"release@example.org {key.with_suffix('.pub').read_text()}")
    return key


@pytest.mark.parametrize("allowed", [False, True])
def test_a_signature_for_another_namespace_is_said_so(
        stick: tuple[Path, str, bytes], key: Path, allowed: bool) -> None:
    """Made with ``ssh-keygen -Y sign -n file``: the certificate was not changed."""
    cert, drive, _ = stick
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", "file", str(cert)],
                   check=True, capture_output=True)
    extra: list[str | Path] = (["--allowed-signers", key.parent / "allowed_signers"] if allowed
                               else [])
    done = check(cert, drive, *extra)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (f"popsicle-py: {cert}.sig: a signature for namespace 'file', not "
                           "'popsicle-py': not made to sign a certificate\n")


@pytest.mark.parametrize("junk", [b"", b"not a signature\n",
                                  b"-----BEGIN SSH SIGNATURE-----\n!!\n"
                                  b"-----END SSH SIGNATURE-----\n"])
def test_a_signature_file_that_is_none_is_said_so(stick: tuple[Path, str, bytes],
                                                 junk: bytes) -> None:
    cert, drive, _ = stick
    Path(f"{cert}.sig").write_bytes(junk)
    done = check(cert, drive)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (f"popsicle-py: {cert}.sig: not an SSH signature (one of "
                           "ssh-keygen -Y sign -n popsicle-py)\n")


def test_sums_tagged_with_sha256_and_sha512_give_the_sha256(
        stick: tuple[Path, str, bytes], tmp_path: Path) -> None:
    """``sha256sum --tag disk.img; sha512sum --tag disk.img`` (CRLF line ends, too)."""
    _, drive, data = stick
    sums = tmp_path / "sums.txt"
    sums.write_text(f"SHA256 (disk.img) = {hashlib.sha256(data).hexdigest()}\r\n"
                    f"SHA512 (disk.img) = {hashlib.sha512(data).hexdigest()}\r\n")
    done = check("--sums", sums, "disk.img", "--size", str(len(data)), drive)
    assert done.returncode == 0, done.stdout + done.stderr
    sums.write_text(f"{hashlib.sha256(data).hexdigest()} *disk.img\n{'1' * 64}  disk.img\n")
    done = check("--sums", sums, "disk.img", "--size", str(len(data)), drive)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (f"popsicle-py: checksum file {sums} lists disk.img with different "
                           "checksums\n")  # the file given, not "SHA256SUMS"


def test_a_signer_whose_key_expired_is_said_so(stick: tuple[Path, str, bytes],
                                               key: Path) -> None:
    """``valid-before`` passed: ssh-keygen's last line alone read "No principal matched.", as
    if the key were not in the file at all."""
    cert, drive, _ = stick
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", "popsicle-py",
                    str(cert)], check=True, capture_output=True)
    allowed = key.parent / "allowed_signers"
    allowed.write_text(f'release@example.org valid-before="20200101" '
                       f"{key.with_suffix('.pub').read_text()}")
    done = check(cert, drive, "--allowed-signers", allowed)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"popsicle-py: {cert}: signed by a key that {allowed} does "
                                  f"not allow ({allowed}:1: key has expired: "), done.stderr
    assert done.stderr.count("\n") == 1
