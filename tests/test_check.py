"""``popsicle-py check``: a drive judged against its certificate or a published SHA-256,
without the image, on real loop devices; signatures made and checked by the real ssh-keygen."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from popsicle_py.certify.model import Certificate, Chunk
from popsicle_py.events import DriveInfo
from tests.conftest import popsicle_cmd
from tests.faulty import FaultyDrive
from tests.loopdev import Loop

MiB = 1 << 20
SIZE = 5 * MiB + 4096  # not a whole number of chunks
CHUNK = 1 * MiB


def image_bytes(size: int = SIZE) -> bytes:
    return os.urandom(size)


def certificate_for(data: bytes, device: str = "/dev/sdx") -> Certificate:
    """What a flash would certify for ``data``: the head's chunk, then 1 MiB chunks."""
    bounds = [0, 64 << 10, *range(CHUNK, len(data), CHUNK), len(data)]
    chunks = tuple(Chunk(a, b - a, xxhash.xxh3_128_hexdigest(data[a:b]))
                   for a, b in itertools.pairwise(bounds))
    return Certificate(image="disk.img", image_size=len(data),
                       device_sha256=hashlib.sha256(data).hexdigest(), chunks=chunks,
                       drive=DriveInfo(seq=1, serial="", size=0), device=device,
                       started="2026-12-06T12:00:00Z", finished="2026-12-06T12:01:00Z",
                       tool_version="test", image_sha256=hashlib.sha256(data).hexdigest())


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), "check", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def stick(loop_factory: Callable[..., Loop]) -> tuple[Loop, bytes]:
    """A drive that holds an image (and then some other bytes)."""
    data = image_bytes()
    loop = loop_factory(8 * MiB, fill=0x5A)
    with open(loop.backing, "r+b") as f:
        f.write(data)
    return loop, data


def flip(loop: Loop, offset: int) -> None:
    with open(loop.backing, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_matching_drive_exits_0(stick: tuple[Loop, bytes], tmp_path: Path) -> None:
    loop, data = stick
    cert = tmp_path / "c.json"
    cert.write_text(certificate_for(data).text())
    done = run(cert, loop.path)
    assert done.returncode == 0, done.stderr
    assert "not signed" in done.stdout + done.stderr
    done = run(cert, loop.path, "--json")
    result = next(json.loads(line) for line in done.stdout.splitlines()
                  if json.loads(line)["event"] == "result")
    assert result["status"] == "ok" and isinstance(result["elapsed"], float)  # as documented


def test_flipped_byte_exits_1_naming_the_chunk(stick: tuple[Loop, bytes],
                                               tmp_path: Path) -> None:
    loop, data = stick
    cert = tmp_path / "c.json"
    cert.write_text(certificate_for(data).text())
    flip(loop, 3 * MiB + 12345)
    done = run(cert, loop.path, "--json")
    assert done.returncode == 1, done.stderr
    result = next(json.loads(line) for line in done.stdout.splitlines()
              if json.loads(line)["event"] == "result")
    assert result["status"] == "invalid" and result["cause"] == "mismatch"
    assert result["mismatch_offset"] == 3 * MiB
    assert f"bytes {3 * MiB}-{4 * MiB - 1}" in result["error"]


def test_shorter_drive_is_invalid(loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    data = image_bytes(6 * MiB)
    loop = loop_factory(4 * MiB)
    loop.backing.write_bytes(data[: 4 * MiB])
    cert = tmp_path / "c.json"
    cert.write_text(certificate_for(data).text())
    done = run(cert, loop.path)
    assert done.returncode == 1  # it does not hold the image
    assert f"ends at byte {4 * MiB}" in done.stdout + done.stderr


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A signing key, an allowed_signers file naming it, and another key nobody allows."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    key, other = tmp_path / "key", tmp_path / "other"
    for k in (key, other):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)],
                       check=True)
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"release@example.org {key.with_suffix('.pub').read_text()}")
    return key, allowed, other


def sign(key: Path, cert: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", "popsicle-py",
                    str(cert)], check=True, capture_output=True)


def test_signed_certificate_verifies(stick: tuple[Loop, bytes], tmp_path: Path,
                                     keys: tuple[Path, Path, Path]) -> None:
    loop, data = stick
    key, allowed, _ = keys
    cert = tmp_path / "c.json"
    cert.write_text(certificate_for(data).text())
    sign(key, cert)
    done = run(cert, loop.path, "--allowed-signers", allowed)
    assert done.returncode == 0, done.stderr
    assert "signed by release@example.org" in done.stdout + done.stderr


def test_edited_certificate_exits_2(stick: tuple[Loop, bytes], tmp_path: Path,
                                    keys: tuple[Path, Path, Path]) -> None:
    loop, data = stick
    key, allowed, _ = keys
    cert = tmp_path / "c.json"
    cert.write_text(certificate_for(data).text())
    sign(key, cert)
    cert.write_text(cert.read_text().replace('"operator": null', '"operator": "mallory"'))
    for extra in ((), ("--allowed-signers", allowed)):
        done = run(cert, loop.path, *extra)
        assert done.returncode == 2, done.stderr
        assert "changed after signing" in done.stderr


def test_signer_not_allowed_exits_2(stick: tuple[Loop, bytes], tmp_path: Path,
                                    keys: tuple[Path, Path, Path]) -> None:
    loop, data = stick
    _, allowed, other = keys
    cert = tmp_path / "c.json"
    cert.write_text(certificate_for(data).text())
    sign(other, cert)
    done = run(cert, loop.path, "--allowed-signers", allowed)
    assert done.returncode == 2
    assert "does not allow" in done.stderr


def test_unsigned_certificate_with_allowed_signers_exits_2(
        stick: tuple[Loop, bytes], tmp_path: Path, keys: tuple[Path, Path, Path]) -> None:
    loop, data = stick
    cert = tmp_path / "c.json"
    cert.write_text(certificate_for(data).text())
    done = run(cert, loop.path, "--allowed-signers", keys[1])
    assert done.returncode == 2
    assert "not signed" in done.stderr


@pytest.mark.parametrize("text", ["not json", '{"format": "something else"}',
                                  '{"format": "popsicle-py certificate", "version": 1}'])
def test_not_a_certificate_exits_2(stick: tuple[Loop, bytes], tmp_path: Path,
                                   text: str) -> None:
    cert = tmp_path / "c.json"
    cert.write_text(text)
    done = run(cert, stick[0].path)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_chunks_that_do_not_cover_the_image_exit_2(stick: tuple[Loop, bytes],
                                                   tmp_path: Path) -> None:
    loop, data = stick
    cert = tmp_path / "c.json"
    body = certificate_for(data).to_json()
    del body["device"]["chunks"][2]
    cert.write_text(json.dumps(body))
    done = run(cert, loop.path)
    assert done.returncode == 2
    assert "do not cover" in done.stderr


def test_published_sha256(loop_factory: Callable[..., Loop]) -> None:
    data = image_bytes()
    loops = [loop_factory(8 * MiB) for _ in range(2)]
    for loop in loops:
        with open(loop.backing, "r+b") as f:
            f.write(data)
    digest = hashlib.sha256(data).hexdigest()
    done = run("--sha256", digest, "--size", str(len(data)), *(lp.path for lp in loops))
    assert done.returncode == 0, done.stderr
    flip(loops[1], 100)
    done = run("--sha256", digest, "--size", str(len(data)), *(lp.path for lp in loops),
               "--json")
    assert done.returncode == 1
    results = {r["device"]: r for r in map(json.loads, done.stdout.splitlines())
               if r["event"] == "result"}
    assert results[loops[0].path]["status"] == "ok"
    assert results[loops[0].path]["device_sha256"] == digest
    assert results[loops[1].path]["status"] == "invalid"


def test_sums_file(stick: tuple[Loop, bytes], tmp_path: Path) -> None:
    loop, data = stick
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'0' * 64}  other.img\n{hashlib.sha256(data).hexdigest()}  disk.img\n")
    done = run("--sums", sums, "disk.img", "--size", str(len(data)), loop.path)
    assert done.returncode == 0, done.stderr
    done = run("--sums", sums, "missing.img", "--size", str(len(data)), loop.path)
    assert done.returncode == 2 and "no SHA-256 for missing.img" in done.stderr
    done = run("--sums", sums, "disk.img.xz", "--size", str(len(data)), loop.path)
    assert done.returncode == 2 and "compressed" in done.stderr
    done = run("--sums", "/dev/zero", "disk.img", "--size", str(len(data)), loop.path)
    assert (done.returncode, done.stderr) == (
        2, "popsicle-py: /dev/zero: too large to be a SHA256SUMS file\n")  # not "a certificate"


def test_bad_published_input_exits_2(stick: tuple[Loop, bytes]) -> None:
    loop, _ = stick
    for args, words in ((("--sha256", "00" * 32, loop.path), "--size"),
                        (("--sha256", "xyz", "--size", "1M", loop.path), "64 hex"),
                        ((loop.path,), "CERT")):
        done = run(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert words in done.stderr, done.stderr


def test_a_hung_drive_that_keeps_the_process_alive_is_said(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    """A drive whose read hangs fails as stalled and the summary comes, but the process can
    only exit once the call returns: check said nothing of it (flash and verify do)."""
    drive = faulty_drive(16 * MiB, fill=0x5A, crawl=(2 * MiB, 1, 16 * MiB))
    proc = subprocess.Popen([*popsicle_cmd(), "check", "--sha256", "0" * 64, "--size",
                             str(8 * MiB), drive.path, "--stall-timeout", "2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        events: list[dict[str, object]] = []
        while not events or events[-1]["event"] != "summary":
            line = proc.stdout.readline()
            assert line, events
            events.append(json.loads(line))
        alive = proc.poll() is None
    finally:
        drive.clear()
        proc.communicate(timeout=60)
    assert alive  # the hung read holds the exit: what the note is for
    [result] = [e for e in events if e["event"] == "result"]
    assert (result["status"], result["cause"]) == ("failed", "stalled"), result
    notes = [e["text"] for e in events if e["event"] == "note"]
    assert (f"{drive.path}: a read or write to this drive has not returned; popsicle-py exits "
            "once it does: when the drive completes it at its present speed, or the kernel "
            "gives up on it (about 30 s per try for a USB stick)") in notes, notes


@pytest.mark.parametrize("command", ["verify", "check"])
def test_a_read_error_names_the_bytes_read_back(
        command: str, faulty_drive: Callable[..., FaultyDrive], tmp_path: Path) -> None:
    """An unreadable block said only "I/O error (the drive may be failing)" in verify and
    check, where flash's read-back names the bytes: now each does."""
    import re

    bad = 20 * MiB
    data = b"\x22" * (32 * MiB)
    drive = faulty_drive(32 * MiB, fill=0x22, bad_read=(bad, bad + 4096))
    image = tmp_path / "image.img"
    image.write_bytes(data)
    args = ((str(image), drive.path) if command == "verify" else
            ("--sha256", hashlib.sha256(data).hexdigest(), "--size", str(len(data)), drive.path))
    result = subprocess.run([*popsicle_cmd(), command, *args, "--json"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    r = json.loads(result.stdout.splitlines()[-1])["results"][0]
    assert r["status"] == "failed" and r["cause"] == "io-error", r
    m = re.search(r"\(reading back bytes (\d+)-(\d+)\)", r["error"])
    assert m is not None, r["error"]
    assert int(m[1]) <= bad < bad + 4096 <= int(m[2]) + 1, r["error"]
