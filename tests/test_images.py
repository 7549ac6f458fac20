"""Source images: every format round-trips, and no damaged download ever reads as a clean image."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import random
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popsicle_py import images
from popsicle_py.images import (
    Checksum,
    ChecksumCancelled,
    Image,
    ImageError,
    find_sidecar,
    open_image,
    parse_checksum_option,
    verify_checksum,
)
from popsicle_py.images import files as image_files

MiB = 1 << 20
COMPRESSED = ["gzip", "xz", "bzip2", "zstd", "zip"]
EXT = {"gzip": ".gz", "xz": ".xz", "bzip2": ".bz2", "zstd": ".zst", "zip": ".zip"}
TOOL = {"gzip": "gzip", "xz": "xz", "bzip2": "bzip2", "zstd": "zstd"}


def image_bytes(size: int, seed: int = 0) -> bytes:
    """Random blocks mixed with zero blocks, like a real disk image (and quick to compress)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        block = min(64 * 1024, size - len(out))
        out += rng.randbytes(block) if rng.random() < 0.5 else bytes(block)
    return bytes(out)


def compress(fmt: str, data: bytes, dest: Path) -> Path:
    """The command-line tool people use when it is installed, else the stdlib/zstandard."""
    if fmt == "zip":
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("disk.img", data)
        return dest
    tool = shutil.which(TOOL[fmt])
    if tool:
        level = ["-1"] if len(data) > MiB else []
        out = subprocess.run([tool, "-c", *level], input=data, capture_output=True, check=True)
        # zstd only records the content size when it knows the input size, as with a file.
        if fmt == "zstd":
            src = dest.with_suffix(".src")
            src.write_bytes(data)
            out = subprocess.run([tool, "-qc", *level, str(src)], capture_output=True, check=True)
            src.unlink()
        dest.write_bytes(out.stdout)
        return dest
    packed = {
        "gzip": lambda d: gzip.compress(d, compresslevel=1),
        "xz": lambda d: lzma.compress(d, preset=0),
        "bzip2": lambda d: bz2.compress(d, 1),
        "zstd": lambda d: zstandard.ZstdCompressor(write_checksum=True).compress(d),
    }[fmt](data)
    dest.write_bytes(packed)
    return dest


def read_all(image: Image, bufsize: int = 65537) -> bytes:
    """Read with readinto() the way the writer does, checking buffers come back full."""
    out = bytearray()
    buf = bytearray(bufsize)
    with image.open() as stream:
        while n := stream.readinto(buf):
            out += buf[:n]
            if image.compressed:
                assert n == bufsize or stream.readinto(bytearray(1)) == 0
    return bytes(out)


def expected_size(fmt: str, data: bytes) -> int | None:
    return None if fmt in ("gzip", "bzip2") else len(data)


# ----------------------------------------------------------------------------- round trips

SIZES = [1, 511, MiB + 3, 3 * MiB + 17]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("fmt", ["raw", *COMPRESSED])
def test_round_trip(tmp_path: Path, fmt: str, size: int) -> None:
    data = image_bytes(size, seed=size)
    if fmt == "raw":
        path = tmp_path / "disk.img"
        path.write_bytes(data)
    else:
        path = compress(fmt, data, tmp_path / f"disk.img{EXT[fmt]}")
    image = open_image(str(path))
    assert image.format == fmt
    assert image.size == (len(data) if fmt == "raw" else expected_size(fmt, data))
    assert image.file_size == path.stat().st_size
    assert image.member == ("disk.img" if fmt == "zip" else None)
    assert read_all(image) == data
    with image.open() as stream:  # read() works too, and each open() starts again at 0
        assert stream.read() == data


@pytest.mark.parametrize("fmt", COMPRESSED)
def test_tiny_reads(tmp_path: Path, fmt: str) -> None:
    data = image_bytes(3001, seed=9)
    image = open_image(str(compress(fmt, data, tmp_path / f"tiny{EXT[fmt]}")))
    assert read_all(image, 1) == data
    assert read_all(image, 7) == data


def test_raw_stream_is_a_plain_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"abc" * 1000)
    image = open_image(str(path))
    assert image.seekable_raw and not image.compressed
    with image.open() as stream:
        assert isinstance(stream, io.FileIO)
        assert os.pread(stream.fileno(), 3, 3) == b"abc"


def test_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "disk.img").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert open_image("disk.img").path == str(tmp_path / "disk.img")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(1, 300_000),
    members=st.integers(1, 4),
    bufsize=st.integers(512, 300_000),
    seed=st.integers(0, 2**16),
)
def test_gzip_round_trip_any_size(
    tmp_path: Path, size: int, members: int, bufsize: int, seed: int
) -> None:
    data = image_bytes(size, seed)
    rng = random.Random(seed)
    cuts = sorted(rng.randrange(size + 1) for _ in range(members - 1))  # empty members too
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, size], strict=True)]
    path = tmp_path / "any.img.gz"
    path.write_bytes(b"".join(gzip.compress(p, compresslevel=1) for p in parts))
    image = open_image(str(path))
    assert read_all(image, bufsize) == data


# ----------------------------------------------------------------------------- damage


@pytest.fixture(scope="module")
def damaged_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """One compressed file per format, 1.5 MiB uncompressed, to cut and flip."""
    folder = tmp_path_factory.mktemp("sources")
    data = image_bytes(MiB + MiB // 2, seed=7)
    return {fmt: compress(fmt, data, folder / f"s{EXT[fmt]}").read_bytes() for fmt in COMPRESSED}


def read_damaged(path: Path) -> bytes:
    return read_all(open_image(str(path)), 1 << 24)


@pytest.mark.parametrize("fmt", COMPRESSED)
@pytest.mark.parametrize("keep", [0.5, 0.97, -1, -4])
def test_truncated_raises(
    tmp_path: Path, damaged_sources: dict[str, bytes], fmt: str, keep: float
) -> None:
    whole = damaged_sources[fmt]
    cut = int(len(whole) * keep) if keep > 0 else len(whole) + int(keep)
    path = tmp_path / f"cut.img{EXT[fmt]}"
    path.write_bytes(whole[:cut])
    with pytest.raises(ImageError, match=r"cut\.img") as info:
        read_damaged(path)
    # xz (its index and footer), zstd (its frame headers) and zip (its directory) are known cut
    # off before decoding; gzip and bzip2 when decoding reaches their end.
    assert ("corrupt or truncated" if fmt in ("gzip", "bzip2") else "cut") in str(info.value)


@pytest.mark.parametrize("fmt", ["gzip", "bzip2"])
def test_truncation_reports_the_offset_reached(
    tmp_path: Path, damaged_sources: dict[str, bytes], fmt: str
) -> None:
    whole = damaged_sources[fmt]
    path = tmp_path / f"half.img{EXT[fmt]}"
    path.write_bytes(whole[: len(whole) * 3 // 4])
    with pytest.raises(ImageError, match=r"at byte \d+ of the uncompressed image") as info:
        read_damaged(path)
    if fmt != "bzip2":  # bzip2 decodes 900 KB blocks whole, so it may stop at 0
        assert "at byte 0 " not in str(info.value)


@pytest.mark.parametrize("fmt", COMPRESSED)
def test_bit_flip_in_the_data_raises(
    tmp_path: Path, damaged_sources: dict[str, bytes], fmt: str
) -> None:
    flipped = bytearray(damaged_sources[fmt])
    flipped[len(flipped) // 2] ^= 0x10
    path = tmp_path / f"flip.img{EXT[fmt]}"
    path.write_bytes(flipped)
    with pytest.raises(ImageError, match=r"flip\.img"):
        read_damaged(path)


@pytest.mark.parametrize("fmt", COMPRESSED)
def test_damage_is_never_silent(tmp_path: Path, fmt: str) -> None:
    """Flip bits all over a small file: the result is an error or the original bytes, never
    other bytes (the magic is left alone: a different magic is a different format)."""
    data = image_bytes(100_000, seed=3)
    whole = compress(fmt, data, tmp_path / f"small{EXT[fmt]}").read_bytes()
    rng = random.Random(fmt)
    path = tmp_path / f"bad{EXT[fmt]}"
    for pos in [*rng.sample(range(6, len(whole)), 20), *range(len(whole) - 10, len(whole))]:
        flipped = bytearray(whole)
        flipped[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(flipped)
        try:
            assert read_damaged(path) == data, f"silent corruption at {pos}"
        except ImageError as e:
            assert "bad" in str(e)


def test_multi_member_gzip_reads_completely(tmp_path: Path) -> None:
    parts = [image_bytes(n, seed=n) for n in (70_000, 1, 300_000)]
    path = tmp_path / "multi.img.gz"
    path.write_bytes(b"".join(gzip.compress(p) for p in parts) + b"\0" * 1000)  # zero padding ok
    image = open_image(str(path))
    assert image.size is None
    assert read_all(image) == b"".join(parts)


def test_damaged_second_stream_is_not_trailing_garbage(tmp_path: Path) -> None:
    """The stdlib readers stop quietly at a bad second stream (pbzip2 writes many)."""
    first, second = image_bytes(300_000, 1), image_bytes(300_000, 2)
    for fmt, pack in (("bzip2", bz2.compress), ("gzip", gzip.compress), ("xz", lzma.compress)):
        damaged = bytearray(pack(second))
        damaged[0] ^= 0xFF
        path = tmp_path / f"two{EXT[fmt]}"
        path.write_bytes(pack(first) + damaged)
        # xz: its index, read from the end before decoding, already shows the damage.
        where = "xz index" if fmt == "xz" else "after the end of compressed stream 1"
        with pytest.raises(ImageError, match=where):
            read_all(open_image(str(path)))
        path.write_bytes(pack(first) + b"garbage")
        with pytest.raises(ImageError, match="two"):
            read_all(open_image(str(path)))


def test_multi_stream_xz_and_bzip2(tmp_path: Path) -> None:
    a, b = image_bytes(100_000, 4), image_bytes(250_003, 5)
    xz = tmp_path / "multi.img.xz"
    xz.write_bytes(lzma.compress(a) + b"\0" * 8 + lzma.compress(b) + b"\0" * 4)  # stream padding
    image = open_image(str(xz))
    assert image.size == len(a) + len(b)
    assert read_all(image) == a + b
    bz = tmp_path / "multi.img.bz2"
    bz.write_bytes(bz2.compress(a) + bz2.compress(b))
    assert read_all(open_image(str(bz))) == a + b


def test_zstd_frames_skippable_frames_and_unknown_size(tmp_path: Path) -> None:
    a, b = image_bytes(100_000, 6), image_bytes(333_333, 7)
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"pzs"
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    path = tmp_path / "frames.img.zst"
    path.write_bytes(skippable + cctx.compress(a) + cctx.compress(b))
    image = open_image(str(path))
    assert (image.format, image.size) == ("zstd", len(a) + len(b))
    assert read_all(image) == a + b

    # Compressed from a pipe: no content size in the header, so no size, but still checked.
    unsized = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False)
    stream = io.BytesIO()
    with unsized.stream_writer(stream, closefd=False) as writer:
        writer.write(a)
    path.write_bytes(stream.getvalue())
    image = open_image(str(path))
    assert image.size is None
    assert read_all(image) == a
    path.write_bytes(stream.getvalue()[:-5])
    with pytest.raises(ImageError, match=r"cut-off zstd file \(a frame at byte 9 announces"):
        read_all(open_image(str(path)))


def test_zstd_of_nothing_is_a_complete_stream(tmp_path: Path) -> None:
    """Complete, not truncated: refused for what it holds (nothing), as an empty file is."""
    path = tmp_path / "nothing.img.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b""))
    with pytest.raises(ImageError, match=r"^\S+nothing\.img\.zst \(inside its zstd layer\) is "
                                         r"empty$"):
        open_image(str(path))


# ----------------------------------------------------------------------------- zip


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            if name.endswith("/"):
                zf.mkdir(name.rstrip("/"))
            else:
                zf.writestr(name, data)
    return path


def test_zip_with_two_files_is_ambiguous(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "two.zip", {"a.img": b"a", "README.txt": b"b"})
    with pytest.raises(ImageError, match=r"two\.zip is a zip file with 2 files \(a\.img, README"):
        open_image(str(path))


def test_zip_ignores_folders_and_finder_litter(tmp_path: Path) -> None:
    data = image_bytes(5000)
    entries = {"images/": b"", "images/disk.img": data, "__MACOSX/images/._disk.img": b"xattr"}
    image = open_image(str(make_zip(tmp_path / "one.zip", entries)))
    assert (image.member, image.size) == ("images/disk.img", 5000)
    assert read_all(image) == data


def test_zip_without_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no files"):
        open_image(str(make_zip(tmp_path / "empty.zip", {"folder/": b""})))


def test_zip_with_unreadable_method_is_refused(tmp_path: Path) -> None:
    """Windows Explorer writes Deflate64 for big files; zipfile cannot decode it."""
    path = make_zip(tmp_path / "d64.zip", {"disk.img": b"x" * 100})
    raw = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = raw.index(signature)
        raw[at + offset : at + offset + 2] = (9).to_bytes(2, "little")
    path.write_bytes(raw)
    with pytest.raises(ImageError, match="Deflate64 compression"):
        open_image(str(path))


@pytest.mark.skipif(not shutil.which("zip"), reason="zip tool not installed")
def test_encrypted_zip_is_refused(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"secret" * 100)
    subprocess.run(["zip", "-q", "-P", "pw", "enc.zip", "disk.img"], cwd=tmp_path, check=True)
    with pytest.raises(ImageError, match="encrypted"):
        open_image(str(tmp_path / "enc.zip"))


# ----------------------------------------------------------------------------- detection


def test_format_comes_from_magic_not_name(tmp_path: Path) -> None:
    data = image_bytes(10_000)
    gz = tmp_path / "foo.img"
    gz.write_bytes(gzip.compress(data))
    image = open_image(str(gz))
    assert image.format == "gzip" and image.warning is None
    assert read_all(image) == data

    fake = tmp_path / "foo.xz"
    fake.write_bytes(data)
    image = open_image(str(fake))
    assert (image.format, image.size) == ("raw", len(data))
    assert image.warning == f"{fake} has a .xz name but holds a raw image; using it as a raw image"


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\x1f\x8b\x08\x00", "gzip"),
        (b"\xfd7zXZ\x00\x00\x04\xe6\xd6\xb4\x46", "xz"),
        (b"\xfd7zXZ\x00\x00", "raw"),  # too short to be a stream header: judged as damaged
        (b"BZh91AY&SY", "bzip2"),
        (b"BZh9", "raw"),
        (b"BZh0", "raw"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"\x5e\x2a\x4d\x18", "zstd"),
        (b"PK\x03\x04", "zip"),
        (b"\xebc\x90", "raw"),
        (b"\x1f", "raw"),
        (b"", "raw"),
    ],
)
def test_detect_format(head: bytes, fmt: str) -> None:
    assert images.detect_format(head) == fmt


@pytest.mark.parametrize("fmt", ["raw", *COMPRESSED])
def test_the_registry_answers_for_each_format(tmp_path: Path, fmt: str) -> None:
    """What callers ask of image.kind: decoded, streamed (tappable), size known before decoding."""
    data = image_bytes(5000, seed=3)
    path = tmp_path / "disk.img"
    if fmt == "raw":
        path.write_bytes(data)
    else:
        path = compress(fmt, data, tmp_path / f"disk.img{EXT[fmt]}")
    image = open_image(str(path))
    kind = image.kind
    assert kind is images.by_name(fmt) and kind.name == image.format == fmt
    assert kind.decoded == image.compressed == (fmt != "raw")
    assert image.seekable_raw == (fmt == "raw")
    assert kind.needs_whole_file == (fmt == "zip") and image.tappable == kind.streamed
    assert kind.size_up_front == (fmt not in ("gzip", "bzip2"))
    assert fmt == "raw" or images.by_suffix(EXT[fmt]) is kind


@pytest.mark.parametrize("fmt", ["raw", *COMPRESSED])
def test_open_stream_decodes_what_streams_and_refuses_a_zip(tmp_path: Path, fmt: str) -> None:
    """A download is decoded exactly as a file is; a zip, read by seeking, cannot be."""
    data = image_bytes(70_000, seed=4)
    packed = data if fmt == "raw" else compress(fmt, data, tmp_path / f"d{EXT[fmt]}").read_bytes()
    raw = io.BytesIO(packed)
    if fmt == "zip":
        with pytest.raises(ImageError, match=r"^url is a zip file, which cannot be read as a"):
            images.open_stream(raw, fmt, "url")
        return
    with images.open_stream(raw, fmt, "url") as stream:
        assert stream.read() == data


def test_every_name_hint_belongs_to_one_format(tmp_path: Path) -> None:
    hints = [suffix for kind in images.REGISTRY for suffix in kind.suffixes]
    assert len(hints) == len(set(hints)) and images.by_suffix(".ZST") is images.by_name("zstd")
    fake = tmp_path / "disk.img.zstd"
    fake.write_bytes(gzip.compress(b"x" * 600))
    image = open_image(str(fake))
    assert image.warning == f"{fake} has a .zstd name but holds gzip data; using it as gzip data"


def test_open_image_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImageError, match=r"^nope\.iso does not exist$"):
        open_image("nope.iso")
    with pytest.raises(ImageError, match="is a directory, not an image"):
        open_image(str(tmp_path))
    (tmp_path / "empty.img").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.img is empty"):
        open_image(str(tmp_path / "empty.img"))
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ImageError, match=r"is a named pipe \(FIFO\), which can be read only"):
        open_image(str(tmp_path / "pipe"))

    (tmp_path / "locked.img").write_bytes(b"x")

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(image_files, "open", denied, raising=False)  # root ignores mode bits
    with pytest.raises(ImageError, match=r"locked\.img cannot be read: permission denied"):
        open_image(str(tmp_path / "locked.img"))


# ----------------------------------------------------------------------------- checksums

SHA256_OF_ABC = hashlib.sha256(b"abc").hexdigest()


def test_parse_checksum_option() -> None:
    assert parse_checksum_option(None, None) is None
    assert parse_checksum_option(SHA256_OF_ABC.upper(), None) == Checksum(
        "sha256", SHA256_OF_ABC, "--sha256"
    )
    sha512 = hashlib.sha512(b"abc").hexdigest()
    assert parse_checksum_option(None, f"SHA512:{sha512}") == Checksum(
        "sha512", sha512, "--checksum"
    )
    sha1 = hashlib.sha1(b"abc").hexdigest()
    assert parse_checksum_option(None, f"sha1:{sha1}").algo == "sha1"  # type: ignore[union-attr]
    blake = hashlib.blake2b(b"abc").hexdigest()
    assert parse_checksum_option(None, f"blake2b:{blake}").algo == "blake2b"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("sha256", "checksum", "message"),
    [
        ("abc", None, r"--sha256: expected 64 hexadecimal digits, got 'abc'"),
        ("g" * 64, None, "--sha256: expected 64 hexadecimal digits"),
        (f"{SHA256_OF_ABC}  disk.img", None, "--sha256: expected 64"),
        (
            None,
            f"md5:{'0' * 32}",
            r"^--checksum: unknown algorithm md5 \(use sha1, sha256, sha512 or blake2b\)$",
        ),
        (None, SHA256_OF_ABC, "--checksum: expected ALGO:HEX"),
        (None, f"sha512:{SHA256_OF_ABC}", "a sha512 checksum is 128 hexadecimal digits"),
        (None, "sha256:", "a sha256 checksum is 64"),
        (SHA256_OF_ABC, f"sha256:{SHA256_OF_ABC}", "either --sha256 or --checksum"),
    ],
)
def test_parse_checksum_option_refuses(
    sha256: str | None, checksum: str | None, message: str
) -> None:
    with pytest.raises(ImageError, match=message):
        parse_checksum_option(sha256, checksum)


@pytest.fixture
def download(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "disk.img.xz"
    path.write_bytes(lzma.compress(image_bytes(300_000)))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_verify_checksum_right_and_wrong(download: tuple[Path, str]) -> None:
    path, digest = download
    calls: list[tuple[int, int]] = []
    verify_checksum(
        str(path), Checksum("sha256", digest, "--sha256"), lambda d, t: calls.append((d, t))
    )
    size = path.stat().st_size
    assert calls and calls[-1] == (size, size)

    wrong = "0" * 64
    with pytest.raises(ImageError) as info:
        verify_checksum(str(path), Checksum("sha256", wrong, "SHA256SUMS"))
    assert str(info.value) == (
        f"checksum mismatch for {path}: expected sha256 {wrong} (from SHA256SUMS), got {digest}"
    )


def test_verify_checksum_other_algorithms(download: tuple[Path, str]) -> None:
    path, _ = download
    data = path.read_bytes()
    for algo, digest in (
        ("sha1", hashlib.sha1(data).hexdigest()),
        ("sha512", hashlib.sha512(data).hexdigest()),
        ("blake2b", hashlib.blake2b(data).hexdigest()),
        ("blake2b", hashlib.blake2b(data, digest_size=32).hexdigest()),  # b2sum -l 256
    ):
        verify_checksum(str(path), Checksum(algo, digest, "--checksum"))


def test_verify_checksum_can_be_cancelled(download: tuple[Path, str]) -> None:
    path, digest = download
    with pytest.raises(ChecksumCancelled):
        verify_checksum(str(path), Checksum("sha256", digest, "--sha256"), cancel=lambda: True)


def sidecar_cases(name: str, digest: str) -> dict[str, Callable[[Path], None]]:
    return {
        "bare .sha256": lambda d: (d / f"{name}.sha256").write_text(digest + "\n"),
        "gnu .sha256sum": lambda d: (d / f"{name}.sha256sum").write_text(f"{digest}  {name}\n"),
        "SHA256SUMS text": lambda d: (d / "SHA256SUMS").write_text(
            f"{'1' * 64}  other.img\n{digest}  {name}\n"
        ),
        "SHA256SUMS binary": lambda d: (d / "SHA256SUMS").write_text(f"{digest} *{name}\r\n"),
        "SHA256SUMS bsd": lambda d: (d / "SHA256SUMS").write_text(
            f"-----BEGIN PGP SIGNED MESSAGE-----\n# {name}: 1 bytes\nSHA256 ({name}) = {digest}\n"
        ),
    }


@pytest.mark.parametrize("case", list(sidecar_cases("x", "y")))
def test_find_sidecar(download: tuple[Path, str], case: str) -> None:
    path, digest = download
    sidecar_cases(path.name, digest.upper())[case](path.parent)
    found = find_sidecar(str(path))
    assert found is not None
    assert (found.algo, found.hexdigest) == ("sha256", digest)
    assert os.path.dirname(found.source) == str(path.parent)
    verify_checksum(str(path), found)


def test_find_sidecar_none_when_nothing_applies(download: tuple[Path, str]) -> None:
    path, digest = download
    assert find_sidecar(str(path)) is None
    (path.parent / "SHA256SUMS").write_text(f"{digest}  some-other.img\n")
    assert find_sidecar(str(path)) is None


def test_find_sidecar_prefers_image_sidecar_and_knows_sha512(download: tuple[Path, str]) -> None:
    path, digest = download
    sha512 = hashlib.sha512(path.read_bytes()).hexdigest()
    (path.parent / "SHA512SUMS").write_text(f"{sha512}  {path.name}\n")
    assert find_sidecar(str(path)) == Checksum("sha512", sha512, str(path.parent / "SHA512SUMS"))
    (path.parent / f"{path.name}.sha256").write_text(f"{digest}  {path.name}\n")
    assert find_sidecar(str(path)) == Checksum("sha256", digest, f"{path}.sha256")


def test_find_sidecar_refuses_a_useless_image_sidecar(download: tuple[Path, str]) -> None:
    """A 404 page saved as IMAGE.sha256 must not quietly turn checking off."""
    path, _ = download
    (path.parent / f"{path.name}.sha256").write_text("<html>Not Found</html>\n")
    with pytest.raises(ImageError, match=r"holds no usable sha256 checksum for disk\.img\.xz"):
        find_sidecar(str(path))


def test_find_sidecar_refuses_conflicting_entries(download: tuple[Path, str]) -> None:
    path, digest = download
    (path.parent / "SHA256SUMS").write_text(f"{digest}  {path.name}\n{'2' * 64}  {path.name}\n")
    with pytest.raises(ImageError, match="different checksums"):
        find_sidecar(str(path))


@pytest.mark.parametrize(
    "head",
    [
        bytes(16),  # a bare ISO 9660, an ext4 file system: zeros first
        b"\xebc\x90\x10\x8e\xd0\xbc\x00\xb0\xb8\x00\x00\x8e\xd8\x8e\xc0",  # GRUB's MBR
        b"\xeb<\x90mkfs.fat\x00\x02\x04\x01\x00",  # FAT
        b"hsqs\x10\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00",  # squashfs
        b"QFI\xfb\x00\x00\x00\x03" + bytes(8),  # qcow2: left to the sanity check
        b"\x33\xc0\x8e\xd0\xbc\x00\x7c\x8e\xc0\x8e\xd8\xbe\x00\x7c\xbf\x00",  # Windows MBR
    ],
)
def test_disk_images_are_neither_a_format_nor_a_damaged_one(head: bytes) -> None:
    assert images.detect(head).name == "raw"
    assert images.damaged(head) is None
    assert images.judge(head, "x").name == "raw"


@pytest.mark.parametrize(
    ("head", "damaged"),
    [
        (b"BZh0" + b"1AY&SY" + bytes(6), "bzip2"),
        (b"\x1f\x8b\x07\x00" + bytes(12), "gzip"),
        (b"\x1f\x8b\x08\xe0" + bytes(12), "gzip"),
        (b"\xfd7zXY\x00\x00\x04\xe6\xd6\xb4\x46" + bytes(4), "xz"),
        (b"\x28\xb5\x2f\xfc" + bytes(12), "zstd"),
    ],
)
def test_damaged_headers_are_refused_by_name(head: bytes, damaged: str) -> None:
    assert images.detect(head).name == "raw"
    with pytest.raises(ImageError, match=f"damaged {damaged} header"):
        images.judge(head, "x")


def test_lzma_alone_is_decoded_with_or_without_its_size(tmp_path: Path) -> None:
    data = image_bytes(300_000, 3)
    packed = bytearray(lzma.compress(data, format=lzma.FORMAT_ALONE))
    path = tmp_path / "x.lzma"
    path.write_bytes(packed)
    image = open_image(str(path))
    assert (image.format, image.size) == ("lzma", None)
    assert read_all(image) == data
    packed[5:13] = len(data).to_bytes(8, "little")
    path.write_bytes(packed)
    image = open_image(str(path))
    assert (image.format, image.size) == ("lzma", len(data))
    assert read_all(image) == data
    path.write_bytes(packed + b"\0\0\0\0")  # xz -t: "Compressed data is corrupt"
    with pytest.raises(ImageError, match="nothing may follow it"):
        read_all(open_image(str(path)))


def test_how_an_image_file_changed_is_said_in_a_few_words() -> None:
    from popsicle_py.images.stillness import FileState, change

    before = FileState(dev=1, ino=2, size=4096, mtime_ns=10, ctime_ns=10)
    assert change(before, before) is None
    assert change(before, None) == "it is gone"
    assert change(before, FileState(1, 3, 4096, 10, 10)) == "another file took its name"
    assert change(before, FileState(1, 2, 2048, 11, 11)) == \
        "its size went from 4 KiB to 2 KiB"
    assert change(before, FileState(1, 2, 4096, 11, 11)) == "it was written to"
    assert change(before, FileState(1, 2, 4096, 10, 11)) == \
        "its inode changed: written to with its time set back, or its mode or links"
