"""A file that is not a disk image (a failed download) is refused before anything is written.

The pure check is tried on images made by the real tools (mkfs, sfdisk, xorriso), which must
pass silently; the command is tried on a real loop device, whose bytes must stay untouched.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd

from popsicle_py.sanity import HEAD_SIZE, Verdict, check

MiB = 1 << 20
PATTERN = 0xA5

NOT_FOUND_HTML = (b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
                  b"<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n"
                  b"</body>\r\n</html>\r\n")
S3_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
          b"<Message>The specified key does not exist.</Message></Error>")


def _head(path: Path) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        return f.read(HEAD_SIZE), os.path.getsize(path)


def _verdict(path: Path) -> Verdict:
    head, size = _head(path)
    return check(head, size, path.name)


# ----------------------------------------------------------------------------------------------
# The pure check


@pytest.mark.parametrize(("data", "says"), [
    (NOT_FOUND_HTML, 'an HTML page ("404 Not Found"), not a disk image: the download may have '
                     "failed"),
    (b"<!DOCTYPE html>\n<html lang=en><p>" + b"x" * 5000 + b"</p></html>\n", "an HTML page"),
    (S3_XML, "an XML document, not a disk image"),
    (b'{"error": {"code": 404, "message": "Not Found"}}\n', "JSON data, not a disk image"),
    (b"404 page not found\n" + b"Sorry.\n" * 100, 'a text file, not a disk image: the download '
                                                  'may have failed (it begins "404 page not '
                                                  'found")'),
    ("Fehler: Datei nicht gefunden, bitte später\n".encode() * 40, "a text file"),
], ids=["nginx-404", "long-html", "s3-xml", "json", "text", "utf8-text"])
def test_text_is_refused_saying_what_it_looks_like(data: bytes, says: str) -> None:
    verdict = check(data[:HEAD_SIZE], len(data), "debian-12.iso")
    assert verdict.refusal is not None
    assert verdict.refusal.startswith("debian-12.iso is ")
    assert says in verdict.refusal


def test_text_cut_inside_a_character_at_the_end_of_the_head_is_still_text() -> None:
    data = "é".encode() * HEAD_SIZE
    verdict = check(data[:HEAD_SIZE - 1], len(data), "x.img")  # half an é at the end
    assert verdict.refusal is not None and "a text file" in verdict.refusal


def test_smaller_than_a_sector_is_refused() -> None:
    data = os.urandom(511)
    verdict = check(data, len(data), "tiny.img")
    assert verdict.refusal == ("tiny.img is only 511 bytes, smaller than one 512-byte sector: "
                               "not a disk image")
    assert check(os.urandom(512), 512, "x").refusal is None


def test_a_short_compressed_stream_of_unknown_size_is_judged_by_what_it_holds() -> None:
    assert check(b"\x01" * 100, None, "x.gz").refusal is not None  # all it decodes to
    assert check(os.urandom(HEAD_SIZE), None, "x.gz").refusal is None


@pytest.mark.parametrize(("data", "what"), [
    (b"QFI\xfb\x00\x00\x00\x03" + os.urandom(4096), "a QEMU qcow2 image"),
    (b"7z\xbc\xaf\x27\x1c" + os.urandom(4096), "a 7-Zip archive"),
    (bytes(257) + b"ustar\x0000" + bytes(4096), "a tar archive"),
], ids=["qcow2", "7z", "tar"])
def test_images_of_something_else_are_refused(data: bytes, what: str) -> None:
    verdict = check(data, len(data), "x.img")
    assert verdict.refusal is not None and f"is {what}, not a raw disk image" in verdict.refusal


def test_random_binary_is_accepted_with_a_note() -> None:
    data = os.urandom(1 * MiB)
    verdict = check(data[:HEAD_SIZE], len(data), "random.img")
    assert verdict.refusal is None
    assert verdict.note == ("random.img has no partition table, ISO 9660 or file system "
                            "signature at its start: make sure it is a disk image")


def _run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


@pytest.mark.parametrize("fs", ["ext4", "vfat"])
def test_a_bare_file_system_image_passes_silently(tmp_path: Path, fs: str) -> None:
    _need(f"mkfs.{fs}")
    image = tmp_path / f"{fs}.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    _run(f"mkfs.{fs}", *(["-q", "-F"] if fs == "ext4" else []), image)
    assert _verdict(image).refusal is None and _verdict(image).note is None


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_a_partitioned_image_passes_silently(tmp_path: Path, label: str) -> None:
    _need("sfdisk")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["sfdisk", "-q", str(image)], input=f"label: {label}\n,,L\n", text=True,
                   check=True, capture_output=True)
    head, _ = _head(image)
    assert head[510:512] == b"\x55\xaa"  # a protective MBR too, for GPT
    assert (head[512:520] == b"EFI PART") == (label == "gpt")
    verdict = _verdict(image)
    assert verdict.refusal is None and verdict.note is None


def test_an_iso_without_a_boot_record_gets_a_note(tmp_path: Path) -> None:
    tool = shutil.which("xorriso") or shutil.which("genisoimage")
    if tool is None:
        pytest.skip("neither xorriso nor genisoimage is installed")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "README.txt").write_text("hello\n")
    image = tmp_path / "cd.iso"
    if tool.endswith("xorriso"):
        _run(tool, "-as", "mkisofs", "-quiet", "-o", image, tree)
    else:
        _run(tool, "-quiet", "-o", image, tree)
    head, _ = _head(image)
    assert head[32769:32774] == b"CD001"
    verdict = _verdict(image)
    assert verdict.refusal is None
    assert verdict.note is not None and "may not boot from USB" in verdict.note


# ----------------------------------------------------------------------------------------------
# The command, on a real loop device


def _popsicle(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, check=False)


def _untouched(loop: Loop) -> bool:
    return loop.read() == bytes([PATTERN]) * loop.size


@pytest.mark.root
@pytest.mark.parametrize("command", ["flash", "watch"])
@pytest.mark.parametrize(("name", "data", "says"), [
    ("debian-12.iso", NOT_FOUND_HTML, "an HTML page"),
    ("raspios.img", b"Error 403: access to this file denied!!\n", "a text file"),
    ("image.img", b'{"message": "Not Found"}', "JSON data"),
    ("tiny.img", os.urandom(300), "only 300 bytes"),
    ("debian-12.iso.gz", gzip.compress(NOT_FOUND_HTML), "an HTML page"),
], ids=["html-404", "text-40-bytes", "json", "tiny", "gzip-html"])
def test_command_refuses_and_writes_nothing(loop_factory: Callable[..., Loop], tmp_path: Path,
                                            command: str, name: str, data: bytes,
                                            says: str) -> None:
    image = tmp_path / name
    image.write_bytes(data)
    loop = loop_factory(1 * MiB, fill=PATTERN)
    targets = [loop.path] if command == "flash" else ["--count", "1"]

    result = _popsicle(command, "--yes", image, *targets)

    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"popsicle-py: {image} is ") and says in line, line
    assert line.endswith("; --force writes it anyway"), line
    assert "Traceback" not in result.stderr
    assert _untouched(loop)


@pytest.mark.root
def test_json_refusal_ends_with_an_error_and_a_summary(loop_factory: Callable[..., Loop],
                                                       tmp_path: Path) -> None:
    image = tmp_path / "debian-12.iso"
    image.write_bytes(NOT_FOUND_HTML)
    loop = loop_factory(1 * MiB, fill=PATTERN)
    result = _popsicle("flash", "--yes", "--json", image, loop.path)
    assert result.returncode == 2
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["error", "summary"]
    assert "an HTML page" in events[0]["message"]
    assert _untouched(loop)


@pytest.mark.root
def test_force_writes_it_anyway(loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    image = tmp_path / "debian-12.iso"
    image.write_bytes(NOT_FOUND_HTML)
    loop = loop_factory(1 * MiB, fill=PATTERN)

    result = _popsicle("flash", "--yes", "--force", image, loop.path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "an HTML page" in result.stdout and "writing it anyway (--force)" in result.stdout
    assert loop.read(len(NOT_FOUND_HTML)) == NOT_FOUND_HTML
    assert loop.read(offset=len(NOT_FOUND_HTML)) == bytes([PATTERN]) * (
        loop.size - len(NOT_FOUND_HTML))


@pytest.mark.root
def test_random_binary_is_written_with_a_note(loop_factory: Callable[..., Loop],
                                              tmp_path: Path) -> None:
    data = os.urandom(256 * 1024)
    image = tmp_path / "random.img"
    image.write_bytes(data)
    loop = loop_factory(1 * MiB, fill=PATTERN)

    result = _popsicle("flash", "--yes", image, loop.path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "random.img has no partition table, ISO 9660 or file system signature" in (
        result.stdout)
    assert loop.read(len(data)) == data


@pytest.mark.root
def test_a_real_image_is_written_without_a_note(loop_factory: Callable[..., Loop],
                                                tmp_path: Path) -> None:
    _need("sfdisk")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 * MiB)
    subprocess.run(["sfdisk", "-q", str(image)], input="label: gpt\n,,L\n", text=True,
                   check=True, capture_output=True)
    loop = loop_factory(2 * MiB, fill=PATTERN)

    result = _popsicle("flash", "--yes", image, loop.path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "signature" not in result.stdout + result.stderr
    assert "not a disk image" not in result.stdout + result.stderr
    assert loop.read(1 * MiB) == image.read_bytes()
