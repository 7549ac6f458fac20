"""The format registry: one record per kind of image file, asked instead of switching on names.

The format is found from the first bytes (file names lie: ``foo.img`` is often gzip), and
for a local file from the last ones too (a DMG's trailer, a zip behind a self-extractor's
stub). Each :class:`Format` says how it is recognised (strictly, and with a damaged header),
which names hint at it, how it is decoded and what that demands (the whole file first, or a
stream), how its decoded size is learned before decoding, or why it is refused.
:func:`judge` is the one decision: a format to decode with, or a one-line refusal.  A new
format is a new record in :data:`REGISTRY`; callers ask the record
(``image.kind.needs_whole_file``), never compare ``image.format`` with a name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeAlias

from popsicle_py.images import magic
from popsicle_py.images.decoders import (
    Bzip2Stream,
    DecoderFactory,
    GzipStream,
    LzmaAloneStream,
    XzStream,
    ZipStream,
    ZstdStream,
)
from popsicle_py.images.files import ImageError
from popsicle_py.images.magic import HEAD_SIZE, TAIL_SIZE
from popsicle_py.images.sizes import lzma_size, xz_measure, zip_member, zstd_measure
from popsicle_py.records import record

__all__ = [
    "BZIP2",
    "DMG",
    "FORMATS",
    "GZIP",
    "HEAD_SIZE",
    "LZIP",
    "LZMA",
    "RAW",
    "REGISTRY",
    "TAIL_SIZE",
    "XZ",
    "ZIP",
    "ZSTD",
    "Format",
    "Stored",
    "by_name",
    "by_suffix",
    "damaged",
    "detect",
    "detect_format",
    "end_refusal",
    "ends_as",
    "judge",
    "lacks_check",
    "name_warning",
    "runnable",
    "unchecked_note",
]


@record
class Stored:
    """An image file as open_image() has it open, handed to a format's ``measure``."""

    path: str  # absolute
    shown: str  # as the user wrote it, for messages
    fd: int
    size: int  # bytes in the file
    head: bytes = b""  # the first HEAD_SIZE bytes


#: (decoded size or None when unknown, the archive member holding the image or None)
Measured: TypeAlias = "tuple[int | None, str | None]"


@record
class Format:
    """One kind of image file: how it is recognised, decoded and measured, or why refused.

    ``name`` is what Image.format, events and JSON carry.  ``matches`` judges the first
    :data:`HEAD_SIZE` bytes strictly (what the format's own tool accepts); ``at_end`` judges
    the last :data:`TAIL_SIZE` bytes of a local file (a DMG's trailer, a zip behind a stub);
    ``near`` recognises this format's header with a byte damaged, which is refused, never
    written raw.  ``suffixes`` are the file-name endings that say "this format" (a mismatch is
    worth a warning, never a decision).  ``decoder`` is None when the bytes are the image.
    ``needs_whole_file``: decoded by seeking (a zip's directory is at its end), so it cannot be
    decoded from a download or pipe, nor hashed in the same pass.  ``measure`` reads the
    decoded size (and an archive's member) from a local file before decoding, and raises
    ImageError for one that is cut off or cannot be used.  ``refusal``: recognised but not
    decoded; the sentence (``{name}``: the file as the user wrote it) says what to do.
    ``problem`` finds, in the head, a header this program must not decode (None: fine).
    ``unchecked`` says, from the head, how the file lacks an integrity check of its own (None:
    it has one), so that damage to it may decode cleanly (:func:`unchecked_note`).
    """

    name: str
    matches: Callable[[bytes], bool]
    suffixes: tuple[str, ...] = ()
    decoder: DecoderFactory | None = None
    needs_whole_file: bool = False
    measure: Callable[[Stored], Measured] | None = None
    at_end: Callable[[bytes], bool] | None = None
    near: Callable[[bytes], bool] | None = None
    refusal: str | None = None
    problem: Callable[[bytes], str | None] | None = None
    unchecked: Callable[[bytes], str | None] | None = None

    @property
    def decoded(self) -> bool:
        """True when the file's bytes are decoded into the image (not raw)."""
        return self.decoder is not None

    @property
    def streamed(self) -> bool:
        """True when it can be decoded front to back from a stream (a download, a checksum tap)."""
        return not self.needs_whole_file

    @property
    def size_up_front(self) -> bool:
        """True when the decoded size may be known before decoding (it can still be None)."""
        return self.measure is not None


def _nothing(head: bytes) -> bool:
    return False


def _anything(head: bytes) -> bool:
    return True


def _zip_measure(f: Stored) -> Measured:
    member, size = zip_member(f.path, f.shown)
    return size, member


def _xz_problem(head: bytes) -> str | None:
    import lzma

    check = head[7] & 0x0F
    if lzma.is_check_supported(check):
        return None
    return (f"its integrity check (ID {check}) is one xz cannot verify either (`xz -t` warns); "
            "if you trust it, `xz -dc` it into a file or pipe it to `popsicle-py flash -`")


def _when(judge: Callable[[bytes], bool], how: str) -> Callable[[bytes], str | None]:
    return lambda head: how if judge(head) else None


RAW = Format("raw", _anything, measure=lambda f: (f.size, None))
GZIP = Format("gzip", magic.is_gzip, (".gz",), GzipStream, near=magic.near_gzip)
XZ = Format("xz", magic.is_xz, (".xz",), XzStream, near=magic.near_xz,
            measure=lambda f: (xz_measure(f.fd, f.size, f.shown), None), problem=_xz_problem,
            unchecked=_when(magic.xz_unchecked, "an xz file without an integrity check "
                            "(made with `xz --check=none`)"))
LZMA = Format("lzma", magic.is_lzma_alone, (".lzma",), LzmaAloneStream,
              measure=lambda f: (lzma_size(f.head), None), near=magic.near_lzma,
              unchecked=_when(_anything, "an LZMA-alone (.lzma) file, which has no integrity "
                              "check"))
BZIP2 = Format("bzip2", magic.is_bzip2, (".bz2",), Bzip2Stream, near=magic.near_bzip2)
ZSTD = Format("zstd", magic.is_zstd, (".zst", ".zstd"), ZstdStream, near=magic.near_zstd,
              measure=lambda f: (zstd_measure(f.fd, f.size, f.shown), None),
              unchecked=_when(magic.zstd_unchecked, "a zstd file without its checksum (made "
                              "with `zstd --no-check`, or by a library that leaves it out)"))
ZIP = Format("zip", magic.is_zip, (".zip",), ZipStream, needs_whole_file=True,
             measure=_zip_measure, at_end=magic.is_zip_at_end)
# lzip: the one PyPI binding (lzip 1.2.0, 2022) is not kept up enough to trust with every
# byte of an image, so lzip files are refused with the command that decodes them.
LZIP = Format("lzip", magic.is_lzip, (".lz",), refusal=(
    "{name} is an lzip file, which popsicle-py does not decompress: run `lzip -dk {name}` "
    "and write the result, or `lzip -dc {name} | popsicle-py flash - DEVICE`"))
DMG = Format("dmg", _nothing, (".dmg",), at_end=magic.is_dmg, refusal=(
    "{name} is an Apple disk image (DMG), which is not a raw disk image: convert it with "
    "`dmg2img {name} image.img` and write image.img"))


def _piped(what: str, tool: str) -> str:
    return (f"{{name}} is {what} file, which popsicle-py does not decompress: "
            f"run `{tool} -dc {{name}} | popsicle-py flash - DEVICE`")


LZ4 = Format("lz4", magic.is_lz4, (".lz4",), refusal=_piped("an lz4", "lz4"))
LZOP = Format("lzop", magic.is_lzop, (".lzo",), refusal=_piped("an lzop", "lzop"))
COMPRESS = Format("compress", magic.is_compress, (".Z",),
                  refusal=_piped("a Unix compress (.Z)", "gzip"))
SPARSE = Format("android-sparse", magic.is_sparse, (".simg",), refusal=(
    "{name} is an Android sparse image, which is not a raw disk image: convert it with "
    "`simg2img {name} image.img` and write image.img (or flash it with fastboot)"))

#: Every known format, in the order detection tries them: a DMG first (its trailer is the only
#: sure sign: its first bytes may be any compressed chunk), raw, which takes anything, last.
REGISTRY: tuple[Format, ...] = (DMG, GZIP, XZ, BZIP2, ZSTD, ZIP, LZIP, LZ4, LZOP, COMPRESS,
                                SPARSE, LZMA, RAW)

#: The names of the formats that are decoded, raw first.
FORMATS = (RAW.name, *(f.name for f in REGISTRY if f is not RAW and f.decoded))

_BY_NAME = {f.name: f for f in REGISTRY}
_BY_SUFFIX = {suffix: f for f in REGISTRY for suffix in f.suffixes}


def detect(head: bytes, tail: bytes = b"") -> Format:
    """The format the first bytes (and, for a local file, the last ones) show; anything
    unrecognised is a raw image."""
    return next(f for f in REGISTRY
                if f.matches(head) or (tail and f.at_end is not None and f.at_end(tail)))


def ends_as(tail: bytes) -> Format | None:
    """The format whose trailer ends ``tail`` (a DMG's, a zip's directory), if any: what a
    stream shows only once it is read to its end."""
    return next((f for f in REGISTRY if f.at_end is not None and f.at_end(tail)), None)


def end_refusal(kind: Format, name: str) -> str:
    """Why a stream that ends as ``kind`` does is no disk image."""
    if kind.refusal is not None:
        return kind.refusal.format(name=name)
    return (f"{name} is a {kind.name} file (its end shows it), which cannot be read as a "
            "stream: save it to a file and give its name")


_LAYER = r" \(inside its (\S+) layer\)"


def runnable(message: str, shown: str, stream: str | None = None) -> str:
    """A refusal whose advice names the image in a command (`lzip -dk NAME`), made runnable.

    A name that is no file (standard input, a URL: ``stream`` says what FILE then is) or an
    inner layer (``NAME (inside its gzip layer)``) cannot be given to a command: the commands
    name FILE, and the sentence says what FILE is.
    """
    inner = re.compile(re.escape(shown) + _LAYER)
    layers: list[str] = []

    def layer(m: re.Match[str]) -> str:
        layers.append(m[1])
        return "FILE"

    def fix(command: re.Match[str]) -> str:
        text = inner.sub(layer, command[0])
        return text.replace(shown, "FILE") if stream is not None else text

    fixed = re.sub(r"`[^`]*`", fix, message)
    if fixed == message:
        return message
    if layers:
        return (f"{fixed}, where FILE is what {shown}'s {layers[0]} layer holds, "
                "decompressed into a file")
    return f"{fixed}, where FILE is {stream}"


def damaged(head: bytes) -> Format | None:
    """The format whose header ``head`` nearly is (a byte or two damaged), if any."""
    return next((f for f in REGISTRY if f.near is not None and f.near(head)), None)


def judge(head: bytes, shown: str, tail: bytes = b"") -> Format:
    """The format to decode with; ImageError for one recognised and not decoded, a damaged
    header of a decoded one (never written raw, even with --force), or a header not to trust.
    """
    kind = detect(head, tail)
    if kind.refusal is not None:
        raise ImageError(kind.refusal.format(name=shown))
    if kind is RAW and (near := damaged(head)) is not None:
        raise ImageError(f"{shown} has a damaged {near.name} header: it is neither a valid "
                         f"{near.name} file nor a disk image; download it again (a damaged "
                         "compressed file is never written as it is, not even with --force)")
    if kind.problem is not None and (problem := kind.problem(head)) is not None:
        raise ImageError(f"{shown} is not written: {problem}")
    return kind


def lacks_check(kind: Format, head: bytes) -> str | None:
    """How a file of ``kind`` whose first bytes are ``head`` lacks an integrity check of its
    own (None: it has one, or its format never needs one)."""
    return kind.unchecked(head) if kind.unchecked is not None else None


def unchecked_note(how: str, shown: str, *, beside: bool = True) -> str:
    """The note for a file without an integrity check (``how``, from :func:`lacks_check`):
    damage to it may decode without an error, and a drive holding the damaged image reads
    back right.  For when no checksum is checked instead (the caller knows); ``beside``: a
    checksum file beside it would be found (not so for standard input)."""
    where = "--sha256, or a SHA256SUMS beside it" if beside else "--sha256"
    return (f"{shown} is {how}: damage to it may decode without an error and be written as "
            f"it is; give its checksum ({where}) to have it checked")


def detect_format(head: bytes) -> str:
    """Name the format from the first bytes; anything unrecognised is a raw image."""
    return detect(head).name


def by_name(name: str) -> Format:
    """The record of a format name (Image.format); KeyError for a name no record has."""
    return _BY_NAME[name]


def by_suffix(ext: str) -> Format | None:
    """The format a file-name ending such as ".xz" hints at (any case), if any."""
    return _BY_SUFFIX.get(ext.lower())


def name_warning(shown: str, ext: str, kind: Format) -> str | None:
    """The warning for a name whose ending hints at another format than the bytes show."""
    if by_suffix(ext) in (None, kind):
        return None
    what = "a raw image" if not kind.decoded else f"{kind.name} data"
    return f"{shown} has a {ext} name but holds {what}; using it as {what}"
