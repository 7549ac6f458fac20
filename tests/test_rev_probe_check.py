"""``popsicle-py check --allowed-signers``: a refusal says what is wrong (review, session 16).

Before: a missing allowed_signers file read "signed by a key that FILE does not allow (No
principal matched.)", and a signer the file restricts (``namespaces=``, ``valid-before=``)
read "the signature does not match the certificate: it was changed after signing".
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import popsicle_cmd
from tests.loopdev import Loop
from tests.test_check import certificate_for, image_bytes

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                reason="ssh-keygen is not installed")


def signed_certificate(tmp_path: Path, loop_factory: Callable[..., Loop]
                       ) -> tuple[Path, Path, str]:
    """A drive holding an image, its certificate signed with a new key: (cert, key, drive)."""
    data = image_bytes()
    loop = loop_factory(8 * (1 << 20), fill=0x5A)
    with open(loop.backing, "r+b") as f:
        f.write(data)
    key, cert = tmp_path / "key", tmp_path / "c.json"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    cert.write_text(certificate_for(data).text())
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", "popsicle-py",
                    str(cert)], check=True, capture_output=True)
    return cert, key, loop.path


def check(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), "check", *map(str, args)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


def test_a_missing_allowed_signers_file_is_named(loop_factory: Callable[..., Loop],
                                                  tmp_path: Path) -> None:
    cert, _, drive = signed_certificate(tmp_path, loop_factory)
    missing = tmp_path / "allowed_signers"
    done = check(cert, drive, "--allowed-signers", missing)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == f"popsicle-py: --allowed-signers {missing}: No such file or directory\n"
    assert done.stdout == ""


@pytest.mark.parametrize("option", ['namespaces="file"', 'valid-before="20200101"'])
def test_a_signer_the_file_restricts_is_not_called_a_changed_certificate(
        loop_factory: Callable[..., Loop], tmp_path: Path, option: str) -> None:
    cert, key, drive = signed_certificate(tmp_path, loop_factory)
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"release@example.org {option} {key.with_suffix('.pub').read_text()}")
    done = check(cert, drive, "--allowed-signers", allowed)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "changed after signing" not in done.stderr
    assert "does not allow" in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_a_certificate_directory_that_is_a_pipe_is_refused_as_not_a_directory(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Before: "--certificate PATH: File exists" (what makedirs said), as if taken."""
    image = tmp_path / "disk.img"
    image.write_bytes(image_bytes())
    drive = loop_factory(8 * (1 << 20), fill=0x5A)
    pipe = tmp_path / "certs"
    os.mkfifo(pipe)
    done = subprocess.run([*popsicle_cmd(), "flash", str(image), drive.path, "--yes",
                           "--certificate", str(pipe)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == f"popsicle-py: --certificate {pipe}: not a directory\n"
    assert set(drive.read()) == {0x5A}


def test_a_sign_key_that_is_no_key_is_not_called_missing(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Before: "Couldn't load public key PATH: No such file or directory" (ssh-keygen's words,
    about a .pub it looked for) for a file that is there."""
    image = tmp_path / "disk.img"
    image.write_bytes(image_bytes())
    drive = loop_factory(8 * (1 << 20), fill=0x5A)
    done = subprocess.run([*popsicle_cmd(), "flash", str(image), drive.path, "--yes",
                           "--certificate", str(tmp_path / "certs"), "--sign-key", str(image)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (f"popsicle-py: --sign-key {image}: {image} is not an OpenSSH private "
                           "key, nor the .pub of one held by ssh-agent\n")
    assert set(drive.read()) == {0x5A}


@pytest.mark.parametrize("where", ["certificate", "--sums", "--allowed-signers"])
def test_a_named_pipe_nobody_writes_to_is_refused_at_once(
        loop_factory: Callable[..., Loop], tmp_path: Path, where: str) -> None:
    """Before: ``check`` waited for a writer for ever (until Ctrl-C)."""
    cert, _, drive = signed_certificate(tmp_path, loop_factory)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    cases: dict[str, list[str | Path]] = {
        "certificate": [pipe, drive],
        "--sums": ["--sums", pipe, "disk.img", "--size", "4096", drive],
        "--allowed-signers": [cert, drive, "--allowed-signers", pipe]}
    args = cases[where]
    done = subprocess.run([*popsicle_cmd(), "check", *map(str, args)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=20)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("popsicle-py: ") and done.stderr.count("\n") == 1
    assert done.stdout == ""


def test_a_certificate_nested_too_deep_is_refused_in_one_line(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Before: "popsicle-py: unexpected error: maximum recursion depth exceeded", exit 1."""
    drive = loop_factory(1 << 20)
    cert = tmp_path / "deep.json"
    cert.write_text("[" * 100_000)
    done = subprocess.run([*popsicle_cmd(), "check", str(cert), drive.path], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"popsicle-py: {cert}: not JSON (")
    assert done.stderr.count("\n") == 1 and "unexpected" not in done.stderr


@pytest.mark.parametrize("version", ["true", "1.0"])
def test_a_certificate_whose_version_is_not_the_number_one_is_refused(
        loop_factory: Callable[..., Loop], tmp_path: Path, version: str) -> None:
    """Python's True == 1 == 1.0: a certificate saying "version": true was read as one."""
    drive = loop_factory(1 << 20)
    cert = tmp_path / "odd.json"
    cert.write_text(f'{{"format": "popsicle-py certificate", "version": {version}}}')
    done = subprocess.run([*popsicle_cmd(), "check", str(cert), drive.path], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (f"popsicle-py: {cert}: certificate version {version.title()} is not "
                           "one this popsicle-py reads (1)\n")
