"""The SHA-256 of what each drive read back (no extra read), and the certificates made from it:
written by a real flash to loop devices, signed by the real ssh-keygen, checked by ``check``."""

from __future__ import annotations

import errno
import hashlib
import json
import lzma
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from popsicle_py.engine import HEAD
from tests.conftest import popsicle_cmd
from tests.loopdev import Loop
from tests.test_watch import WATCHING, C, Stick, image_file, needs_testbed, result_of, watch

MiB = 1 << 20


def popsicle(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def events_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def results_of(stdout: str) -> dict[str, dict[str, Any]]:
    return {e["device"]: e for e in events_of(stdout) if e["event"] == "result"}


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "xz"])
def test_device_sha256_is_what_was_read_back(loop_factory: Callable[..., Loop], tmp_path: Path,
                                             compressed: bool) -> None:
    data = os.urandom(5 * MiB + 777)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    if compressed:
        image = tmp_path / "disk.img.xz"
        image.write_bytes(lzma.compress(data, preset=0))
    loops = [loop_factory(8 * MiB, fill=0x5A) for _ in range(2)]
    done = popsicle("flash", image, *(lp.path for lp in loops), "--yes", "--no-probe",
                    "--bucket-size", "1M", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    digest = hashlib.sha256(data).hexdigest()
    results = results_of(done.stdout)
    assert {r["device_sha256"] for r in results.values()} == {digest}
    summary = events_of(done.stdout)[-1]
    assert {r["device_sha256"] for r in summary["results"]} == {digest}


def test_no_verify_has_no_device_sha256(loop_factory: Callable[..., Loop],
                                        tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(2 * MiB))
    loop = loop_factory(4 * MiB)
    done = popsicle("flash", image, loop.path, "--yes", "--no-probe", "--no-verify", "--json")
    assert done.returncode == 0, done.stderr
    assert results_of(done.stdout)[loop.path]["device_sha256"] is None


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"factory@example.org {key.with_suffix('.pub').read_text()}")
    return key, allowed


def test_flash_certifies_each_drive_and_check_judges_it(
        loop_factory: Callable[..., Loop], tmp_path: Path, key: tuple[Path, Path]) -> None:
    data = os.urandom(6 * MiB + 4321)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    certs = tmp_path / "certs"
    loops = [loop_factory(8 * MiB, fill=0x5A) for _ in range(2)]
    done = popsicle("flash", image, *(lp.path for lp in loops), "--yes", "--no-probe",
                    "--bucket-size", "1M", "--certificate", certs, "--sign-key", key[0])
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(certs.glob("*.json"))
    assert len(files) == 2 and all(Path(f"{f}.sig").is_file() for f in files)
    for loop in loops:
        assert f"{loop.path}: certificate {certs}/" in done.stdout
    by_device = {json.loads(f.read_text())["drive"]["device"]: f for f in files}
    cert = json.loads(by_device[loops[0].path].read_text())
    assert cert["device"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert cert["image"] == {"name": "disk.img", "size": len(data), "sha256": None}
    assert cert["drive"]["seq"] == 1 and cert["tool"]["name"] == "popsicle-py"
    assert cert["device"]["chunks"][0][:2] == [0, HEAD]  # the head: its first MiB

    ok = popsicle("check", by_device[loops[0].path], loops[0].path,
                  "--allowed-signers", key[1])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "signed by factory@example.org" in ok.stdout + ok.stderr

    # A flipped byte on the drive: exit 1, naming the chunk (1 MiB buckets: bytes 2-3 MiB).
    with open(loops[1].backing, "r+b") as f:
        f.seek(2 * MiB + 99)
        byte = f.read(1)
        f.seek(2 * MiB + 99)
        f.write(bytes([byte[0] ^ 0x80]))
    bad = popsicle("check", by_device[loops[1].path], loops[1].path,
                   "--allowed-signers", key[1])
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"differs from the certificate in bytes {2 * MiB}-{3 * MiB - 1}" in bad.stdout

    # An edited certificate: exit 2.
    edited = by_device[loops[0].path]
    edited.write_text(edited.read_text().replace('"seq": 1', '"seq": 7'))
    forged = popsicle("check", edited, loops[0].path, "--allowed-signers", key[1])
    assert forged.returncode == 2 and "changed after signing" in forged.stderr


def test_certificate_refusals_write_nothing(loop_factory: Callable[..., Loop],
                                            tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 * MiB))
    loop = loop_factory(2 * MiB, fill=0x5A)
    before = loop.read(1 * MiB)
    file_in_the_way = tmp_path / "afile"
    file_in_the_way.write_text("")
    cases = [
        (("--certificate", tmp_path / "c", "--no-verify"), "contradict"),
        (("--sign-key", tmp_path / "nokey"), "--certificate DIR"),
        (("--certificate", tmp_path / "c", "--sign-key", tmp_path / "nokey"), "--sign-key"),
        (("--certificate", file_in_the_way / "sub"), "--certificate"),
    ]
    for extra, words in cases:
        done = popsicle("flash", image, loop.path, "--yes", *extra)
        assert done.returncode == 2, (extra, done.stdout + done.stderr)
        assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert loop.read(1 * MiB) == before


def test_a_planted_symlink_is_not_followed(tmp_path: Path) -> None:
    from popsicle_py.certify import files

    target = tmp_path / "victim"
    target.write_text("precious")
    fd = files.open_directory(str(tmp_path / "certs"))
    try:
        os.symlink(target, tmp_path / "certs" / "x.json")
        name = files.write_new(fd, "x.json", b"{}")
    finally:
        os.close(fd)
    assert name == "x-2.json"
    assert target.read_text() == "precious"
    assert (tmp_path / "certs" / "x-2.json").read_bytes() == b"{}"
    assert [p.name for p in (tmp_path / "certs").iterdir() if p.name.endswith(".tmp")] == []


def test_a_signature_goes_beside_its_own_certificate_only(tmp_path: Path) -> None:
    """An old x.json.sig whose x.json is gone: a new x.json beside it would pass for signed
    by it (before: x.json, with its signature as x.json-2.sig)."""
    from popsicle_py.certify import files

    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "x.json.sig").write_bytes(b"old")
    fd = files.open_directory(str(certs))
    try:
        name = files.write_new(fd, "x.json", b"{}", (".sig", b"new"))
    finally:
        os.close(fd)
    assert name == "x-2.json"
    assert sorted(p.name for p in certs.iterdir()) == ["x-2.json", "x-2.json.sig", "x.json.sig"]
    assert (certs / "x-2.json.sig").read_bytes() == b"new"
    assert (certs / "x.json.sig").read_bytes() == b"old"


def test_a_certificate_that_cannot_be_signed_is_not_left_behind(
        tmp_path: Path, key: tuple[Path, Path]) -> None:
    """The key gone by the time a drive is done: no certificate at all, never an unsigned one
    that `check` would take without --allowed-signers."""
    from popsicle_py import events
    from popsicle_py.certify.sshsig import SignError
    from popsicle_py.certify.writer import CertificateWriter

    writer = CertificateWriter(str(tmp_path / "certs"), str(key[0]), "disk.img", None)
    key[0].unlink()
    done = events.DriveResult("/dev/sdb", events.Status.OK, 1 * MiB, verified=True,
                              device_sha256="ab" * 32)
    try:
        with pytest.raises(SignError):
            writer.certify(done, [((0, 1 * MiB), bytes(16))], 0.0)
    finally:
        writer.close()
    assert list((tmp_path / "certs").iterdir()) == []


@pytest.mark.root
def test_a_certificate_that_does_not_fit_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A full directory fails the write itself: the error is raised, nothing is left."""
    from popsicle_py.certify import files
    from tests.loopdev import tiny_tmpfs

    with tiny_tmpfs(tmp_path, "64k") as full:
        fd = files.open_directory(str(full))
        try:
            with pytest.raises(OSError) as failed:
                files.write_new(fd, "x.json", os.urandom(1 << 20))
        finally:
            os.close(fd)
        assert failed.value.errno == errno.ENOSPC
        assert list(full.iterdir()) == []


def test_the_final_table_shows_what_each_drive_read_back() -> None:
    from rich.console import Console

    from popsicle_py import events
    from popsicle_py.view import summary_table

    digest = hashlib.sha256(b"image").hexdigest()
    summary = events.Summary((
        events.DriveResult("/dev/sdb", events.Status.OK, 10, verified=True,
                           device_sha256=digest),
        events.DriveResult("/dev/sdc", events.Status.FAILED, 3, "/dev/sdc: I/O error",
                           cause=events.Cause.IO_ERROR)))
    console = Console(width=160, record=True, highlight=False)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "SHA-256 (read back)" in text and digest in text
    plain = Console(width=160, record=True)
    plain.print(summary_table(events.Summary(summary.results[1:])))
    assert "SHA-256" not in plain.export_text()


def test_the_journal_and_report_keep_device_sha256_and_link_speed(tmp_path: Path) -> None:
    from popsicle_py import events
    from popsicle_py.report import record
    from popsicle_py.station import journal as journal_mod

    result = events.DriveResult("/dev/sdb", events.Status.OK, 10, verified=True,
                                device_sha256="ab" * 32,
                                drive=events.DriveInfo(seq=1, link_speed=480))
    fields = record(result, None, image="disk.img", sha256="", started=0.0, ended=1.0)
    assert (fields["device_sha256"], fields["link_speed"]) == ("ab" * 32, 480)
    path = str(tmp_path / "journal.sqlite")
    # A journal made before these columns existed gets them.
    import sqlite3

    old = sqlite3.connect(path)
    old.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, session TEXT, station TEXT, "
                "batch TEXT, operator TEXT, slot TEXT, result TEXT)")
    old.close()
    journal = journal_mod.Journal(path, station="s", session="x")
    row = journal.start("1", fields)
    journal.finish(row, {**fields, "result": "ok"})
    journal.close()
    (found,) = journal_mod.read_records(path)
    assert (found["device_sha256"], found["link_speed"], found["result"]) == (
        "ab" * 32, 480, "ok")


@needs_testbed
@pytest.mark.umockdev
def test_watch_certifies_and_grades_sticks_as_they_come(tmp_path: Path) -> None:
    """umockdev sticks plugged in during ``watch``: the one of the right size is written and
    certified (its port and link in the certificate); the other is rejected before writing."""
    small = Stick("e", 6, size=32 * MiB)
    image, data = image_file(tmp_path, 3 * MiB + 1)
    certs = tmp_path / "certs"
    run = watch(tmp_path, [str(image), "--yes", "--count", "2", "--no-power-off",
                           "--capacity", "64MiB", "--certificate", str(certs)],
                [WATCHING, {"add": C.description}, result_of(C),
                 {"add": small.description}, result_of(small)],
                read=(small.dev,))
    assert run.rc == 1, run.stderr
    results = run.results()
    assert results[C.dev]["status"] == "ok"
    assert results[C.dev]["device_sha256"] == hashlib.sha256(data).hexdigest()
    assert (results[small.dev]["status"], results[small.dev]["cause"]) == (
        "rejected", "capacity")
    assert run.files[small.dev] == b""  # nothing written to it
    (cert,) = [json.loads(p.read_text()) for p in certs.glob("*.json")]
    assert cert["drive"]["device"] == C.dev and cert["drive"]["port_path"] == "1-3"
    assert cert["drive"]["link_speed"] == 480 and cert["drive"]["seq"] == 1
    assert cert["device"]["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "xz"])
def test_the_image_sha256_of_a_certificate_is_the_image_s(
        loop_factory: Callable[..., Loop], tmp_path: Path, compressed: bool) -> None:
    """A published SHA-256 is of the file: a certificate gives it as the image's only when the
    file is the image (not of an .xz, whose bytes no drive holds)."""
    data = os.urandom(2 * MiB + 1)
    image = tmp_path / "disk.img"
    image.write_bytes(lzma.compress(data, preset=0) if compressed else data)
    if compressed:
        image = image.rename(tmp_path / "disk.img.xz")
    published = hashlib.sha256(image.read_bytes()).hexdigest()
    loop = loop_factory(4 * MiB, fill=0x5A)
    certs = tmp_path / "certs"
    done = popsicle("flash", image, loop.path, "--yes", "--no-probe", "--sha256", published,
                    "--certificate", certs)
    assert done.returncode == 0, done.stdout + done.stderr
    (cert,) = [json.loads(p.read_text()) for p in certs.glob("*.json")]
    assert cert["image"]["sha256"] == (None if compressed else published)
    assert cert["device"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert cert["image"]["size"] == len(data)


@pytest.mark.root
@pytest.mark.parametrize("real", [60 * MiB + 512, 60 * MiB], ids=["unaligned", "aligned"])
def test_a_surface_test_that_lands_on_the_image_is_no_success(
        faulty_drive: Callable[..., Any], tmp_path: Path, key: tuple[Path, Path],
        real: int) -> None:
    """A drive holding ``real`` bytes of its 64 MiB, the addresses past them wrapping onto the
    first ones: --surface-test's writes past the 8 MiB image (and its zeros) land on the image
    after it was verified.  The image is read back whole after the surface test: the drive is
    rejected, never gets the head, and has no certificate (before: ok, certified with the
    SHA-256 of the pass before the surface test, while the drive held other bytes).  The
    image's first bytes are never zero: the surface test's last writes, its zeros, land there,
    and a random zero at byte 0 would move the first difference to byte 1."""
    data = b"\xa5" * 4096 + os.urandom(8 * MiB - 4096)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    drive = faulty_drive(64 * MiB, fill=0x5A, wrap=real)
    certs = tmp_path / "certs"
    done = popsicle("flash", image, drive.path, "--yes", "--no-probe", "--json",
                    "--bucket-size", "1M", "--surface-test", "--certificate", certs,
                    "--sign-key", key[0])
    assert done.returncode == 1, done.stdout + done.stderr
    result = results_of(done.stdout)[drive.path]
    assert (result["status"], result["cause"]) == ("rejected", "surface"), result
    assert "surface test: bad region at byte 0: the image read back changed" in \
        result["error"], result
    assert result["device_sha256"] is None
    assert list(certs.glob("*.json")) == []
    assert drive.read(0, HEAD) != data[:HEAD]  # never the image's head
