"""Every image known (issue 24): decoded, or refused before anything is written.

Each case is built with the format's own tool or from its specification, and flashed through
the command to real loop devices.  A refused case ends with exit 2, one line, and the drive's
bytes unchanged (with ``--force`` too, for a damaged compressed file).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from conftest import Loop, needs_root, popsicle_cmd
from test_remote import keys  # noqa: F401 (the fixture: two gpg keys, one in a keyring)
from webserver import Served, serving

pytestmark = needs_root

PATTERN = 0x5A
SIZE = (1 << 20) + 4096 + 333
DRIVE = 4 << 20


def image_data(seed: int = 1) -> bytes:
    """A disk image: an MBR signature (so the sanity check is quiet), random and zero runs."""
    rnd = hashlib.sha256(str(seed).encode()).digest()
    chunks = [(rnd * 128) if i % 3 else bytes(4096) for i in range(SIZE // 4096 + 1)]
    data = bytearray(b"".join(chunks)[:SIZE])
    data[510:512] = b"\x55\xaa"
    for i in range(0, SIZE - 8, 4096):  # not one repeated block: compressors must work
        data[i:i + 8] = struct.pack("<Q", i * 2654435761 + seed)
    return bytes(data)


def run(*args: str, stdin: bytes | None = None, force: bool = False,
        json: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [*popsicle_cmd(), "flash", *args, "--yes", "--bucket-size", "1M"]
    if force:
        cmd.append("--force")
    if json:
        cmd.append("--json")
    if stdin is None:
        return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=120)
    proc = subprocess.run(cmd, capture_output=True, input=stdin, timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode())


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def tool(*cmd: str | Path, stdin: bytes | None = None) -> bytes:
    if shutil.which(str(cmd[0])) is None:
        pytest.fail(f"{cmd[0]} is not installed (see .ci/run's apt-get line)")
    return subprocess.run([str(c) for c in cmd], input=stdin, capture_output=True,
                          check=True).stdout


# ----------------------------------------------------------------------------- refused


def _lzip(d: Path, data: bytes) -> Path:
    raw = d / "disk.img"
    raw.write_bytes(data)
    tool("lzip", "-k", raw)
    return d / "disk.img.lz"


def _dmg(d: Path, data: bytes) -> Path:
    """A minimal UDIF image: data forks, then the 512-byte "koly" trailer (version 4)."""
    koly = bytearray(512)
    koly[:16] = b"koly" + struct.pack(">III", 4, 512, 1)
    koly[0x18:0x28] = struct.pack(">QQ", 0, len(data))  # the data fork's offset and length
    path = d / "disk.dmg"
    path.write_bytes(zlib.compress(data) + bytes(koly))
    return path


def _patched(name: str, offset: int, byte: int, pack: Callable[[bytes], bytes]
             ) -> Callable[[Path, bytes], Path]:
    def build(d: Path, data: bytes) -> Path:
        packed = bytearray(pack(data))
        packed[offset] = byte
        path = d / name
        path.write_bytes(packed)
        return path
    return build


def _xz_padding(d: Path, data: bytes) -> Path:
    path = d / "padded.img.xz"
    path.write_bytes(lzma.compress(data) + b"\0" * 3)  # xz -t: "Compressed data is corrupt"
    return path


def _xz_check(d: Path, data: bytes) -> Path:
    """Check ID 5: reserved, 8 bytes like CRC-64, so the blocks stay well formed."""
    b = bytearray(lzma.compress(data, check=lzma.CHECK_CRC64))
    b[7] = 5
    b[8:12] = struct.pack("<I", zlib.crc32(bytes(b[6:8])))
    b[-4:-2] = b[6:8]
    b[-12:-8] = struct.pack("<I", zlib.crc32(bytes(b[-8:-2])))
    path = d / "check5.img.xz"
    path.write_bytes(b)
    return path


def _cut(name: str, pack: Callable[[bytes], bytes], keep: float
         ) -> Callable[[Path, bytes], Path]:
    def build(d: Path, data: bytes) -> Path:
        packed = pack(data)
        path = d / name
        path.write_bytes(packed[:int(len(packed) * keep)])
        return path
    return build


def _zip(data: bytes, name: str = "disk.img") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def _raw_named_xz(d: Path, data: bytes) -> Path:
    path = d / "disk.img.xz"
    path.write_bytes(os.urandom(len(data)))  # no disk signature, no xz header: damaged
    return path


def _zip_in_gzip(d: Path, data: bytes) -> Path:
    path = d / "disk.zip.gz"
    path.write_bytes(gzip.compress(_zip(data)))
    return path


def _lzip_in_gzip(d: Path, data: bytes) -> Path:
    inner = _lzip(d, data)
    path = d / "disk.img.lz.gz"
    path.write_bytes(gzip.compress(inner.read_bytes()))
    return path


REFUSED: dict[str, tuple[Callable[[Path, bytes], Path], str]] = {
    "lzip": (_lzip, "lzip -dc"),
    "dmg": (_dmg, "dmg2img"),
    "xz magic damaged": (_patched("disk.img.xz", 4, ord("Y"), lzma.compress),
                         "damaged xz header"),
    "xz magic damaged, named .img": (_patched("disk.img", 0, 0xFC, lzma.compress),
                                     "damaged xz header"),
    "gzip method 7": (_patched("disk.img.gz", 2, 7, gzip.compress), "damaged gzip header"),
    "gzip reserved flag": (_patched("disk.img.gz", 3, 0x20, gzip.compress),
                           "damaged gzip header"),
    "bzip2 block size 0": (_patched("disk.img.bz2", 3, ord("0"), bz2.compress),
                           "damaged bzip2 header"),
    "zstd magic damaged": (_patched("disk.img.zst", 1, 0xB4,
                                    zstandard.ZstdCompressor().compress), "damaged zstd header"),
    "xz padding of 3 bytes": (_xz_padding, "xz index and footer"),
    "xz unsupported check": (_xz_check, "integrity check (ID 5)"),
    "xz cut off": (_cut("cut.img.xz", lzma.compress, 0.9), "cut off"),
    "zip cut off": (_cut("cut.zip", _zip, 0.9), "corrupt or truncated zip"),
    "zstd cut off": (_cut("cut.img.zst", zstandard.ZstdCompressor().compress, 0.9),
                     "cut-off zstd"),
    "raw bytes named .xz": (_raw_named_xz, "looks damaged"),
    "zip inside gzip": (_zip_in_gzip, "cannot be decoded inside another layer"),
    "lzip inside gzip": (_lzip_in_gzip, "lzip file"),
}


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_before_anything_is_written(case: str, force: bool, tmp_path: Path,
                                            loop_factory: Callable[..., Loop]) -> None:
    build, words = REFUSED[case]
    path = build(tmp_path, image_data())
    drive = loop_factory(DRIVE, fill=PATTERN)
    proc = run(str(path), drive.path, force=force)
    assert proc.returncode == 2, proc.stderr
    assert len(lines(proc.stderr)) == 1, proc.stderr
    assert words in proc.stderr
    assert drive.read() == bytes([PATTERN]) * DRIVE


END_ONLY = ["inside gzip", "standard input", "gzip on standard input", "URL"]


@pytest.mark.parametrize("way", END_ONLY)
def test_a_dmg_only_its_end_shows_fails_every_drive_with_its_head_unwritten(
        way: str, tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """An Apple disk image is known by its trailer alone: inside a .gz, or as a stream,
    its end comes after the drives are written.  It was written raw and ended ok; now the
    end is judged before the engine vouches, so no drive gets the head."""
    dmg = _dmg(tmp_path, image_data()).read_bytes()
    drives = [loop_factory(DRIVE, fill=PATTERN) for _ in range(2)]
    paths = [d.path for d in drives]
    if way == "inside gzip":
        packed = tmp_path / "disk.img.gz"  # named as a disk image: only its end says DMG
        packed.write_bytes(gzip.compress(dmg))
        proc = run(str(packed), *paths, json=True)
    elif way == "URL":
        with serving() as server:
            server.add("/disk.img", Served(dmg))
            proc = run(server.url("/disk.img"), *paths, json=True)
    else:
        proc = run("-", *paths, json=True,
                   stdin=gzip.compress(dmg) if way.startswith("gzip") else dmg)
    assert proc.returncode == 1, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()][-1]["results"]
    for r in results:
        assert r["status"] == "failed", r
        assert "is an Apple disk image (DMG)" in r["error"] and "dmg2img" in r["error"], r
    for d in drives:
        assert d.head_is_safe(dmg, PATTERN), d.read(32)


def _windows_iso(d: Path) -> Path:
    tree = d / "tree"
    (tree / "sources").mkdir(parents=True)
    (tree / "sources" / "install.wim").write_bytes(b"MSWIM\0\0\0" + bytes(4096))
    (tree / "setup.exe").write_bytes(b"MZ" + bytes(100))
    iso = d / "Win11_English_x64.iso"
    tool("xorriso", "-as", "mkisofs", "-quiet", "-o", iso, tree)
    return iso


def test_a_windows_installer_iso_is_refused(tmp_path: Path,
                                            loop_factory: Callable[..., Loop]) -> None:
    iso = _windows_iso(tmp_path)
    drive = loop_factory(DRIVE, fill=PATTERN)
    proc = run(str(iso), drive.path)
    assert proc.returncode == 2, proc.stderr
    assert len(lines(proc.stderr)) == 1, proc.stderr
    assert "Windows installer ISO" in proc.stderr and "Rufus" in proc.stderr
    assert drive.read() == bytes([PATTERN]) * DRIVE


def test_another_url_scheme_is_named(loop_factory: Callable[..., Loop]) -> None:
    drive = loop_factory(DRIVE, fill=PATTERN)
    proc = run("ftp://example.org/disk.img", drive.path)
    assert proc.returncode == 2, proc.stderr
    assert len(lines(proc.stderr)) == 1, proc.stderr
    assert "only http:// and https:// URLs" in proc.stderr
    assert drive.read() == bytes([PATTERN]) * DRIVE


# ----------------------------------------------------------------------------- decoded


def _lzma_tool(d: Path, data: bytes) -> Path:
    path = d / "disk.img.lzma"
    path.write_bytes(tool("xz", "--format=lzma", "-c", stdin=data))
    return path


def _lzma_sized(d: Path, data: bytes) -> Path:
    """LZMA-alone with the size in its header (what the old lzma tool and 7-Zip write)."""
    packed = bytearray(lzma.compress(data, format=lzma.FORMAT_ALONE))
    packed[5:13] = struct.pack("<Q", len(data))  # the end marker may still follow: allowed
    path = d / "sized.lzma"
    path.write_bytes(packed)
    return path


def _xz_in_zip(d: Path, data: bytes) -> Path:
    path = d / "disk.zip"
    path.write_bytes(_zip(lzma.compress(data), "disk.img.xz"))
    return path


def _xz_in_gzip(d: Path, data: bytes) -> Path:
    path = d / "disk.img.xz.gz"
    path.write_bytes(gzip.compress(lzma.compress(data)))
    return path


def _three_layers(d: Path, data: bytes) -> Path:
    path = d / "disk.img.gz.bz2.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(bz2.compress(gzip.compress(data))))
    return path


def _zip_behind_stub(d: Path, data: bytes) -> Path:
    path = d / "installer.exe"
    path.write_bytes(b"MZ" + os.urandom(8190) + _zip(data))
    return path


def _zip_tool_behind_stub(d: Path, data: bytes) -> Path:
    (d / "disk.img").write_bytes(data)
    subprocess.run(["zip", "-q", "-j", str(d / "disk.zip"), str(d / "disk.img")], check=True)
    path = d / "sfx.bin"
    path.write_bytes(b"#!/bin/sh\nexec unzip \"$0\"\n" + bytes(1000)
                     + (d / "disk.zip").read_bytes())
    subprocess.run(["zip", "-q", "-A", str(path)], check=True)  # offsets adjusted, as sfx do
    return path


def _padded(name: str, pack: Callable[[bytes], bytes], pad: int
            ) -> Callable[[Path, bytes], Path]:
    def build(d: Path, data: bytes) -> Path:
        path = d / name
        path.write_bytes(pack(data) + bytes(pad))
        return path
    return build


DECODED: dict[str, tuple[Callable[[Path, bytes], Path], str]] = {
    "lzma (xz --format=lzma)": (_lzma_tool, "lzma"),
    "lzma with its size in the header": (_lzma_sized, "lzma"),
    "xz inside zip": (_xz_in_zip, "zip"),
    "xz inside gzip": (_xz_in_gzip, "gzip"),
    "gzip inside bzip2 inside zstd": (_three_layers, "zstd"),
    "zip behind a stub": (_zip_behind_stub, "zip"),
    "zip -A behind a shell stub": (_zip_tool_behind_stub, "zip"),
    "xz with 8 bytes of stream padding": (_padded("p.img.xz", lzma.compress, 8), "xz"),
    "gzip with trailing zeros": (_padded("p.img.gz", gzip.compress, 5), "gzip"),
    "bzip2 with trailing zeros": (_padded("p.img.bz2", bz2.compress, 5), "bzip2"),
}


@pytest.mark.parametrize("case", list(DECODED))
def test_decoded_and_written(case: str, tmp_path: Path,
                             loop_factory: Callable[..., Loop]) -> None:
    build, fmt = DECODED[case]
    data = image_data()
    path = build(tmp_path, data)
    drive = loop_factory(DRIVE, fill=PATTERN)
    proc = run(str(path), drive.path, json=True)
    assert proc.returncode == 0, proc.stderr
    assert f'"format": "{fmt}"' in proc.stdout
    assert drive.read(SIZE) == data


def test_a_corrupt_xz_names_the_bytes(tmp_path: Path,
                                      loop_factory: Callable[..., Loop]) -> None:
    data = image_data(8)
    packed = bytearray(lzma.compress(data))
    flip = len(packed) // 2
    packed[flip] ^= 0x55
    path = tmp_path / "bad.img.xz"
    path.write_bytes(packed)
    drive = loop_factory(DRIVE, fill=PATTERN)
    proc = run(str(path), drive.path)
    assert proc.returncode == 1, proc.stderr
    text = proc.stdout + proc.stderr
    m = re.search(r"at byte (\d+) of the uncompressed image, byte (\d+) of the compressed file",
                  text)
    assert m, text
    # Where liblzma stopped: after the damaged byte, in the file and in the image.
    image_at, file_at = int(m[1]), int(m[2])
    assert flip < file_at <= len(packed)
    assert 0 < image_at <= SIZE


# ----------------------------------------------------------------------------- standard input


def test_xzcat_into_standard_input(tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    data = image_data(2)
    drives = [loop_factory(DRIVE, fill=PATTERN) for _ in range(2)]
    proc = run("-", *(d.path for d in drives), stdin=lzma.compress(data), json=True)
    assert proc.returncode == 0, proc.stderr
    assert '"format": "xz"' in proc.stdout
    assert '"status": "ok"' in proc.stdout and '"verified"' in proc.stdout
    for d in drives:
        assert d.read(SIZE) == data


def test_a_pipe_from_xzcat(tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """`xzcat disk.img.xz | popsicle-py flash - DEVICE --yes`, as a shell runs it."""
    data = image_data(3)
    (tmp_path / "disk.img.xz").write_bytes(lzma.compress(data))
    drive = loop_factory(DRIVE, fill=PATTERN)
    cmd = " ".join([*popsicle_cmd(), "flash", "-", drive.path, "--yes"])
    proc = subprocess.run(f"xzcat {tmp_path / 'disk.img.xz'} | {cmd}", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert drive.read(SIZE) == data


def test_standard_input_checksums(tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    data = image_data(4)
    packed = gzip.compress(data)
    drive = loop_factory(DRIVE, fill=PATTERN)
    right = hashlib.sha256(packed).hexdigest()
    assert run("-", drive.path, "--sha256", right, stdin=packed).returncode == 0
    assert drive.read(SIZE) == data
    other = loop_factory(DRIVE, fill=PATTERN)
    proc = run("-", other.path, "--sha256", "0" * 64, stdin=packed)
    assert proc.returncode == 1 and "checksum mismatch" in proc.stderr + proc.stdout
    assert other.read(64 << 10) != data[:64 << 10]  # no image head: never boots


@pytest.mark.parametrize("case", ["lzip", "damaged gzip", "zip"])
def test_standard_input_refusals(case: str, tmp_path: Path,
                                 loop_factory: Callable[..., Loop]) -> None:
    data = image_data()
    stream = {"lzip": lambda: _lzip(tmp_path, data).read_bytes(),
              "damaged gzip": lambda: b"\x1f\x8b\x07" + gzip.compress(data)[3:],
              "zip": lambda: _zip(data)}[case]()
    drive = loop_factory(DRIVE, fill=PATTERN)
    proc = run("-", drive.path, stdin=stream)
    assert proc.returncode == 2, proc.stderr
    assert len(lines(proc.stderr)) == 1, proc.stderr
    assert drive.read() == bytes([PATTERN]) * DRIVE


# ----------------------------------------------------------------------------- checksum files


def _clearsigned(body: str) -> str:
    return ("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n" + body
            + "-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n")


NAME = "Fedora-Workstation-Live-x86_64-41-1.4.iso"
LISTS: dict[str, tuple[str, Callable[[str, bytes], str]]] = {
    "arch sha256sums.txt": ("sha256sums.txt",
                            lambda n, b: f"{hashlib.sha256(b).hexdigest()}  {n}\n"),
    "arch b2sums.txt": ("b2sums.txt", lambda n, b: f"{hashlib.blake2b(b).hexdigest()}  {n}\n"),
    "fedora CHECKSUM clearsigned": (
        "Fedora-Workstation-41-1.4-x86_64-CHECKSUM",
        lambda n, b: _clearsigned(f"# {n}: {len(b)} bytes\n"
                                  f"SHA256 ({n}) = {hashlib.sha256(b).hexdigest()}\n")),
}


@pytest.mark.parametrize("case", list(LISTS))
def test_distribution_checksum_lists_beside_a_file(case: str, tmp_path: Path,
                                                   loop_factory: Callable[..., Loop]) -> None:
    list_name, text = LISTS[case]
    data = image_data(5)
    image = tmp_path / NAME
    image.write_bytes(data)
    (tmp_path / list_name).write_text(text(NAME, data))
    drive = loop_factory(DRIVE, fill=PATTERN)
    proc = run(str(image), drive.path)
    assert proc.returncode == 0, proc.stderr
    assert f"from {tmp_path / list_name}" in proc.stdout + proc.stderr
    (tmp_path / list_name).write_text(text(NAME, b"another image"))
    other = loop_factory(DRIVE, fill=PATTERN)
    proc = run(str(image), other.path)
    assert proc.returncode == 2, proc.stderr
    assert "checksum mismatch" in proc.stderr
    assert other.read() == bytes([PATTERN]) * DRIVE


@pytest.mark.parametrize("case", list(LISTS))
def test_distribution_checksum_lists_beside_a_url(case: str,
                                                  loop_factory: Callable[..., Loop]) -> None:
    list_name, text = LISTS[case]
    data = image_data(6)
    with serving() as server:
        server.add(f"/pub/{NAME}", Served(data))
        server.add(f"/pub/{list_name}", Served(text(NAME, b"another image").encode(),
                                               content_type="text/plain"))
        drive = loop_factory(DRIVE, fill=PATTERN)
        proc = run(server.url(f"/pub/{NAME}"), drive.path)
    assert proc.returncode == 1, proc.stderr
    assert "checksum" in proc.stdout + proc.stderr
    assert drive.read(64 << 10) != data[:64 << 10]  # no image head: never boots


def test_the_raw_images_checksum_given_for_its_xz(tmp_path: Path,
                                                  loop_factory: Callable[..., Loop]) -> None:
    data = image_data(7)
    path = tmp_path / "disk.img.xz"
    path.write_bytes(lzma.compress(data))
    drive = loop_factory(DRIVE, fill=PATTERN)
    proc = run(str(path), drive.path, "--sha256", hashlib.sha256(data).hexdigest())
    assert proc.returncode == 2, proc.stderr
    assert len(lines(proc.stderr)) == 1, proc.stderr
    assert "this is the sha256 of the xz file as downloaded" in proc.stderr
    assert "the one given may be the decompressed image's" in proc.stderr
    assert drive.read() == bytes([PATTERN]) * DRIVE


def test_a_clearsigned_checksum_with_keyring(tmp_path: Path, loop_factory: Callable[..., Loop],
                                             keys: dict[str, Path]) -> None:  # noqa: F811
    """Fedora's CHECKSUM carries its own signature; only its signed lines count."""
    data = image_data(9)
    image = tmp_path / NAME
    image.write_bytes(data)
    body = f"SHA256 ({NAME}) = {hashlib.sha256(data).hexdigest()}\n"
    signed = subprocess.run(["gpg", "--batch", "--clearsign", "-o", "-"], input=body.encode(),
                            check=True, capture_output=True,
                            env={**os.environ, "GNUPGHOME": str(keys["good"])}).stdout
    checksum = tmp_path / "Fedora-Workstation-41-1.4-x86_64-CHECKSUM"
    # A line after the signature is not signed: it must neither count nor contradict.
    checksum.write_bytes(signed + f"SHA256 ({NAME}) = {'0' * 64}\n".encode())
    drive = loop_factory(DRIVE, fill=PATTERN)
    proc = run(str(image), drive.path, "--keyring", str(keys["good-keyring"]))
    assert proc.returncode == 0, proc.stderr
    assert f"signature ok: {checksum}" in proc.stdout + proc.stderr
    assert drive.read(SIZE) == data
    checksum.write_bytes(signed.replace(hashlib.sha256(data).hexdigest().encode(), b"1" * 64))
    other = loop_factory(DRIVE, fill=PATTERN)
    proc = run(str(image), other.path, "--keyring", str(keys["good-keyring"]))
    assert proc.returncode == 2 and "does not verify" in proc.stderr, proc.stderr
    assert len(lines(proc.stderr)) == 1
    assert other.read() == bytes([PATTERN]) * DRIVE


def test_urls_are_judged_like_files(loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A refused format or a damaged header behind a URL is refused before any drive is
    written; layers inside a download are decoded as in a file."""
    data = image_data(10)
    with serving() as server:
        server.add("/disk.img.lz", Served(_lzip(tmp_path, data).read_bytes()))
        server.add("/disk.img.gz", Served(b"\x1f\x8b\x07" + gzip.compress(data)[3:]))
        server.add("/disk.img.xz.gz", Served(gzip.compress(lzma.compress(data))))
        for name, words in (("/disk.img.lz", "lzip -dc"), ("/disk.img.gz", "damaged gzip")):
            drive = loop_factory(DRIVE, fill=PATTERN)
            proc = run(server.url(name), drive.path)
            assert proc.returncode == 2, proc.stderr
            assert len(lines(proc.stderr)) == 1 and words in proc.stderr, proc.stderr
            assert drive.read() == bytes([PATTERN]) * DRIVE
        drive = loop_factory(DRIVE, fill=PATTERN)
        proc = run(server.url("/disk.img.xz.gz"), drive.path)
        assert proc.returncode == 0, proc.stderr
        assert drive.read(SIZE) == data


def test_a_raw_image_named_xz_is_written_with_a_note(tmp_path: Path,
                                                     loop_factory: Callable[..., Loop]) -> None:
    data = image_data(11)
    path = tmp_path / "disk.img.xz"
    path.write_bytes(data)
    drive = loop_factory(DRIVE, fill=PATTERN)
    proc = run(str(path), drive.path)
    assert proc.returncode == 0, proc.stderr
    assert "has a .xz name but holds a raw image" in proc.stdout + proc.stderr
    assert drive.read(SIZE) == data
