"""Is this file a disk image at all?  Decided from its first bytes and its size, before writing.

A failed download saved under the image's name (an HTML "404 Not Found" page, an XML or JSON
error from an object store, a one-line text message) is written over a drive's partition table
and even "verifies"; so a file that is *positively* not a disk image is refused, saying what it
looks like.  Raw images come in every layout (boot loaders at odd offsets, bare file systems,
random test data), so binary data without a known signature is still accepted, with a note.
Pure functions over plain bytes: the caller reads the head (decompressed, for compressed images).
"""

from __future__ import annotations

import json
import re

from popsicle_py.records import record

SECTOR = 512

#: How much of the (decoded) image to look at: btrfs keeps its magic at 64 KiB + 64.
HEAD_SIZE = 72 * 1024

#: How much of an ISO without a boot record to search for a Windows installer's files: its
#: directories (ISO 9660 and UDF) sit in the first few MiB.
ISO_SCAN = 8 << 20

#: The names a Windows installer's image is found by: ISO 9660 (upper case, ";1"), UDF
#: (OSTA compressed unicode, 8 or 16 bits per character).
_WINDOWS_NAMES = tuple(
    form for name in ("install.wim", "install.esd")
    for form in (name.upper().encode() + b";1", b"\x08" + name.encode(),
                 b"\x10" + name.encode("utf-16-be"))
)

#: Bytes that text files hold besides printable characters: tab, newlines, form feed, escape.
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\v\x1b")


@record
class Verdict:
    """What to do with an image: ``refusal`` (a sentence) or a ``note`` for the user, or neither."""

    refusal: str | None = None
    note: str | None = None


#: (offset, magic, what): the start of a real disk image, partition table or file system.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (510, b"\x55\xaa", "MBR or boot sector"),  # MBR, FAT, NTFS, exFAT boot sectors
    (512, b"EFI PART", "GPT"),
    (4096, b"EFI PART", "GPT (4 KiB sectors)"),
    (0, b"ER\x02\x00", "Apple partition map"),
    (0, b"ER\x08\x00", "Apple partition map"),
    (32769, b"CD001", "ISO 9660"),
    (32769, b"BEA01", "UDF"),
    (1080, b"\x53\xef", "ext2/3/4"),
    (1024, b"\x10\x20\xf5\xf2", "F2FS"),
    (1024, b"\xe2\xe1\xf5\xe0", "EROFS"),
    (1024, b"H+", "HFS+"),
    (1024, b"HX", "HFSX"),
    (0, b"hsqs", "squashfs"),
    (0, b"sqsh", "squashfs"),
    (0, b"XFSB", "XFS"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (65600, b"_BHRfS_M", "btrfs"),
    (4086, b"SWAPSPACE2", "swap"),
)

#: (offset, magic, what it is, what to do): files that are images of something else.
_CONVERT = "convert it with `qemu-img convert -O raw`"
_NOT_RAW: tuple[tuple[int, bytes, str, str], ...] = (
    (0, b"QFI\xfb", "a QEMU qcow2 image", _CONVERT),
    (0, b"KDMV", "a VMware VMDK image", _CONVERT),
    (0, b"vhdxfile", "a Hyper-V VHDX image", _CONVERT),
    # A dynamic or differencing VHD starts with a copy of its footer; a fixed one is the raw
    # disk with the footer after it, written as it is.
    (0, b"conectix", "a VHD (Virtual PC, Hyper-V) dynamic image", _CONVERT),
    (64, b"\x7f\x10\xda\xbe", "a VirtualBox VDI image", _CONVERT),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract the image from it first"),
    (0, b"Rar!\x1a\x07", "a RAR archive", "extract the image from it first"),
    (257, b"ustar", "a tar archive", "extract the image from it first"),
)


def _at(head: bytes, offset: int, magic: bytes) -> bool:
    return head[offset:offset + len(magic)] == magic


def _optical_only(head: bytes) -> bool:
    """An ISO 9660 or UDF image without a hybrid boot record (no MBR, no GPT): made for a
    CD or DVD, where firmware boots it through El Torito; written raw, a USB stick may not."""
    return signature(head) in ("ISO 9660", "UDF")


def needs_more(head: bytes) -> bool:
    """Whether the verdict needs :data:`ISO_SCAN` bytes rather than :data:`HEAD_SIZE`."""
    return _optical_only(head)


def _windows_installer(head: bytes) -> bool:
    lowered = head.lower()
    return any(name.lower() in lowered for name in _WINDOWS_NAMES)


def signature(head: bytes) -> str | None:
    """The disk layout or file system the head starts with, or None when none is known."""
    for offset, magic, what in _SIGNATURES:
        if _at(head, offset, magic):
            return what
    return None


def _as_text(head: bytes, complete: bool) -> str | None:
    """``head`` decoded, when it is text through and through; None when it holds binary."""
    if not head or b"\x00" in head:
        return None
    data = head.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # A multi-byte character cut at the end of the head is still text.
        if complete or e.start < len(data) - 3:
            return None
        text = data[:e.start].decode("utf-8")
    if any((ord(c) < 0x20 and ord(c) not in _TEXT_CONTROLS) or 0x7f <= ord(c) < 0xa0
           for c in text):
        return None
    return text


def _text_kind(text: str, complete: bool) -> str:
    """What a text file is, as a user would call it."""
    start = text.lstrip().lower()
    if start.startswith(("<!doctype html", "<html")) or any(
            tag in start[:4096] for tag in ("<html", "<head>", "<body", "<title>")):
        return "an HTML page"
    if start.startswith("<?xml") or start.startswith("<"):
        return "an XML document"
    if start.startswith(("{", "[")):
        if not complete:
            return "JSON data"
        try:
            json.loads(text)
        except ValueError:
            return "a text file"
        return "JSON data"
    return "a text file"


def _first_line(text: str, width: int = 60) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[:width - 3] + "..."


def check(head: bytes, size: int | None, name: str) -> Verdict:
    """Judge an image by its first bytes ``head`` (decoded) and its decoded ``size``.

    ``size`` is None when a compressed format does not record it; a head shorter than asked
    for then is the whole image.  ``name`` is how the user wrote the image's path.
    """
    complete = size is not None and len(head) >= size
    total = size if size is not None else len(head)
    for offset, magic, what, advice in _NOT_RAW:
        if _at(head, offset, magic):
            return Verdict(refusal=f"{name} is {what}, not a raw disk image: {advice}")
    text = _as_text(head, complete)
    if text is not None:
        kind = _text_kind(text, complete)
        title = re.search(r"<title[^>]*>([^<]*)</title", text, re.I)
        if kind == "an HTML page" and title and title.group(1).strip():
            kind += f' ("{_first_line(title.group(1))}")'
            begins = ""
        else:
            begins = _first_line(text)
        shown = f' (it begins "{begins}")' if begins else ""
        return Verdict(refusal=f"{name} is {kind}, not a disk image: the download may have "
                               f"failed{shown}")
    if total < SECTOR:
        return Verdict(refusal=f"{name} is only {total} bytes, smaller than one {SECTOR}-byte "
                               "sector: not a disk image")
    if signature(head) is None:
        return Verdict(note=f"{name} has no partition table, ISO 9660 or file system signature "
                            "at its start: make sure it is a disk image")
    if _optical_only(head):
        if _windows_installer(head):
            return Verdict(refusal=f"{name} is a Windows installer ISO, which does not boot "
                                   "when written as it is: make the stick with Rufus, "
                                   "WoeUSB or Microsoft's Media Creation Tool")
        return Verdict(note=f"{name} is an ISO without a hybrid boot record (no MBR or GPT): "
                            "it may not boot from USB")
    return Verdict()

