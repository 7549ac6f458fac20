"""Checksums of the file as downloaded: given on the command line, published beside it, checked.

A checksum vouches for the bytes as stored (compressed or not), either in a pass of its own
(:func:`verify_checksum`) or in the write pass itself (:class:`ChecksumTap`), so it covers the
very bytes that were decoded and written.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from popsicle_py.errors import Cancelled
from popsicle_py.images.files import ImageError, open_file
from popsicle_py.records import record

if TYPE_CHECKING:
    from popsicle_py.engine.lane import Clock

__all__ = [
    "Checksum",
    "ChecksumCancelled",
    "ChecksumTap",
    "choose_sidecar",
    "fedora_names",
    "find_sidecar",
    "new_hasher",
    "parse_checksum_option",
    "sidecar_text",
    "signed_part",
    "verify_checksum",
]

_HASH_READ_SIZE = 1 << 20  # per read when hashing: a cancel is seen within one (a slow disk)
_HEX_LENGTHS = {"sha1": 40, "sha256": 64, "sha512": 128, "blake2b": 128}
_HEX = re.compile(r"[0-9a-fA-F]+")


class ChecksumCancelled(Cancelled, ImageError):
    """verify_checksum() stopped because cancel() said so; not a verdict on the image.

    The one Cancelled of the tree, and an ImageError, so that callers that refuse on image
    problems before writing also stop cleanly on it.
    """


@record
class Checksum:
    """An expected digest of the file as downloaded, and where the expectation came from."""

    algo: str
    hexdigest: str
    source: str


class Hasher(Protocol):
    """What a hashlib object is to us (hashlib's objects share no public type)."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher(checksum: Checksum) -> Hasher:
    """A fresh hash object of the checksum's algorithm (and digest length, for blake2b)."""
    import hashlib  # OpenSSL is loaded only when something is hashed (issue 30)

    if checksum.algo == "blake2b":  # b2sum -l N gives shorter digests
        return hashlib.blake2b(digest_size=len(checksum.hexdigest) // 2)
    return hashlib.new(checksum.algo)


def _valid_hex(algo: str, hexdigest: str) -> bool:
    if not _HEX.fullmatch(hexdigest):
        return False
    if algo == "blake2b":
        return 2 <= len(hexdigest) <= 128 and len(hexdigest) % 2 == 0
    return len(hexdigest) == _HEX_LENGTHS[algo]


def parse_checksum_option(sha256: str | None, checksum: str | None) -> Checksum | None:
    """Turn --sha256 HEX / --checksum ALGO:HEX into a Checksum, refusing anything malformed."""
    if sha256 is not None and checksum is not None:
        raise ImageError("use either --sha256 or --checksum, not both")
    if sha256 is not None:
        value = sha256.strip()
        if not _valid_hex("sha256", value):
            raise ImageError(f"--sha256: expected 64 hexadecimal digits, got {_clip(value)!r}")
        return Checksum("sha256", value.lower(), "--sha256")
    if checksum is None:
        return None
    algo, sep, value = checksum.strip().partition(":")
    algo = algo.strip().lower().replace("-", "")
    value = value.strip()
    if not sep or not algo:
        raise ImageError(
            f"--checksum: expected ALGO:HEX (e.g. sha256:<hex>), got {_clip(checksum)!r}"
        )
    if algo not in _HEX_LENGTHS:
        raise ImageError(
            f"--checksum: unknown algorithm {algo} (use sha1, sha256, sha512 or blake2b)"
        )
    if not _valid_hex(algo, value):
        want = "an even number of up to 128" if algo == "blake2b" else str(_HEX_LENGTHS[algo])
        raise ImageError(
            f"--checksum: a {algo} checksum is {want} hexadecimal digits, got {_clip(value)!r}"
        )
    return Checksum(algo, value.lower(), "--checksum")


def _clip(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


# "HEX  name" / "HEX *name" (GNU, '\' prefix = escaped name), a bare "HEX", and
# "SHA256 (name) = HEX" (BSD, and GNU --tag).
_GNU_LINE = re.compile(r"(\\?)([0-9a-fA-F]+)(?:[ \t]+\*?(.*))?")
_BSD_LINE = re.compile(
    r"(\\?)(SHA1|SHA256|SHA512|BLAKE2b(?:-\d+)?) ?\((.*)\) ?= ?([0-9a-fA-F]+)", re.I
)


def _unescape(name: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), name)


_CLEARSIGNED = "-----BEGIN PGP SIGNED MESSAGE-----"


def signed_part(text: str) -> str:
    """The text a clearsigned file (Fedora's CHECKSUM) signs; other text as it is.

    Only the signed lines count: anything after the signature is not vouched for by it.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != _CLEARSIGNED:
        return text
    body: list[str] = []
    started = False
    for line in lines[1:]:
        if not started:
            started = True  # armor headers ("Hash: SHA256") and the blank line that ends them
            if not line.strip() or re.match(r"[A-Za-z-]+: ", line):
                started = not line.strip()
                continue
        if line.startswith("-----BEGIN PGP SIGNATURE-----"):
            break
        body.append(line[2:] if line.startswith("- ") else line)  # dash-escaped lines
    return "\n".join(body)


def _sidecar_entries(text: str, algo: str) -> Iterator[tuple[str, str, str | None]]:
    """(algo, hex, name or None) for each usable line; lines of other shapes are ignored."""
    for line in signed_part(text).splitlines():
        line = line.strip().lstrip(_BOM)
        if m := _BSD_LINE.fullmatch(line):
            escaped, tag, name, hexdigest = m.groups()
            line_algo = tag.lower().split("-")[0]
            if _valid_hex(line_algo, hexdigest):
                yield line_algo, hexdigest.lower(), _unescape(name) if escaped else name
        elif m := _GNU_LINE.fullmatch(line):
            escaped, hexdigest, name = m.groups()
            if _valid_hex(algo, hexdigest):
                if name is not None:
                    name = _unescape(name) if escaped else name
                yield algo, hexdigest.lower(), name


def _listed_badly(text: str, algo: str, base: str, bare: bool) -> bool:
    """A line names ``base`` but gives no usable checksum for it (cut short, mangled, a stray
    character in its digest): a tagged line (``SHA256 (NAME) = ...``), or (``bare``: the list
    is named after ``algo``) an untagged one too (``HEX  NAME``).  Asked only when no line gave
    one; comment lines (Fedora's ``# NAME: N bytes``) do not count."""
    name = rf"(?:\./)?{re.escape(base)}"
    tagged = re.compile(rf"\({name}\)")
    untagged = re.compile(rf"(?:^|[ \t]\*?){name}$")
    for line in signed_part(text).splitlines():
        line = line.strip().lstrip(_BOM)
        if line.startswith("#"):
            continue
        if tagged.search(line) or (bare and untagged.search(line)):
            return True
    return False


def _listed(text: str, algo: str, where: str, base: str, bare: bool = True
            ) -> Checksum | None:
    """The entry for ``base`` in the list ``where``; a line for it that holds no usable
    checksum is an error (the list does name the image: flashing unchecked would hide it).
    ``bare``: the list is named after ``algo`` (SHA256SUMS, b2sums.txt), so its untagged
    lines are of that algorithm (not so in a CHECKSUM file)."""
    picked = _pick(list(_sidecar_entries(text, algo)), where, base)
    if picked is None and _listed_badly(text, algo, base, bare):
        raise ImageError(f"checksum file {where} lists {base} without a usable {algo} "
                         "checksum (cut short or mangled)")
    return picked


#: A byte order mark, as Notepad and PowerShell start a text file with.
_BOM = "\ufeff"


def sidecar_text(data: bytes) -> str:
    """A checksum file's text: UTF-8, or UTF-16 with its byte order mark (what Windows
    PowerShell's ``>`` writes); a UTF-8 byte order mark (Notepad's) is dropped."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    return data.decode("utf-8-sig", errors="replace")


def _read_sidecar(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return sidecar_text(f.read(16 << 20))
    except OSError as e:
        raise ImageError(f"checksum file {path} cannot be read: {e.strerror or e}") from None


#: The algorithms from weakest to strongest (what a list naming the image twice is read by).
_STRENGTH = ("sha1", "sha256", "blake2b", "sha512")


def _pick(entries: list[tuple[str, str, str | None]], sidecar: str, base: str) -> Checksum | None:
    """The entry for ``base``: the strongest algorithm when it is listed under several (a list
    made by ``sha256sum --tag; sha512sum --tag``); two different digests of one algorithm are
    refused (which one is the image's?)."""
    by_algo: dict[str, set[str]] = {}
    for algo, hexdigest, name in entries:
        if name in (base, "./" + base):
            by_algo.setdefault(algo, set()).add(hexdigest)
    if any(len(digests) > 1 for digests in by_algo.values()):
        raise ImageError(f"checksum file {sidecar} lists {base} with different checksums")
    if not by_algo:
        return None
    algo = max(by_algo, key=lambda a: _STRENGTH.index(a) if a in _STRENGTH else -1)
    return Checksum(algo, by_algo[algo].pop(), sidecar)


#: Lists of checksums distributions publish under fixed names (Arch: sha256sums.txt and
#: b2sums.txt, BLAKE2b-512), with the algorithm their bare lines use.
_LISTS = (("sha256sums.txt", "sha256"), ("sha512sums.txt", "sha512"),
          ("b2sums.txt", "blake2b"), ("CHECKSUM", "sha256"))
_FEDORA = re.compile(r"Fedora-([A-Za-z0-9_]+)-.*?(\d+)-(\d+\.\d+)")
_FEDORA_ARCHES = ("x86_64", "aarch64", "ppc64le", "s390x")


def fedora_names(base: str) -> list[str]:
    """The names Fedora gives the CHECKSUM file beside ``base``: Fedora-Workstation-Live-x86_64-
    41-1.4.iso is listed in Fedora-Workstation-41-1.4-x86_64-CHECKSUM (for a web server, which
    cannot be listed)."""
    m = _FEDORA.match(base)
    arch = next((a for a in _FEDORA_ARCHES if a in base), None)
    if m is None or arch is None:
        return []
    edition, version, release = m.groups()
    return [f"Fedora-{edition}-{version}-{release}-{arch}-CHECKSUM"]


def find_sidecar(path: str) -> Checksum | None:
    """The checksum published next to the image file, if there is one that applies to it."""
    path = os.path.abspath(path)
    folder, base = os.path.split(path)
    try:
        listed = sorted(n for n in os.listdir(folder) if n.endswith("CHECKSUM"))
    except OSError:
        listed = []
    return choose_sidecar(base, lambda name: os.path.join(folder, name),
                          lambda p: _read_sidecar(p) if os.path.isfile(p) else None, listed)


def choose_sidecar(base: str, beside: Callable[[str], str],
                   read: Callable[[str], str | None],
                   listed: Iterable[str] = ()) -> Checksum | None:
    """The published checksum for ``base`` among the files ``beside(name)``, read by ``read``.

    IMAGE.sha256 / IMAGE.sha256sum (then the .sha512 variants) belong to the image by name, so
    one that holds no usable checksum is an error rather than a silent skip; a SHA256SUMS (or
    SHA512SUMS) that does not list the image simply does not apply.  ``read`` returns None for
    a file that is not there, so the same rules serve a folder and a web server.  Then the
    lists distributions publish (sha256sums.txt, b2sums.txt, Fedora's *-CHECKSUM, named by
    ``listed`` or guessed from ``base``), which apply only when they list the image.
    """
    for algo in ("sha256", "sha512"):
        for suffix in (f".{algo}", f".{algo}sum"):
            sidecar = beside(base + suffix)
            text = read(sidecar)
            if text is None:
                continue
            entries = list(_sidecar_entries(text, algo))
            picked = _pick(entries, sidecar, base)
            if picked:
                return picked
            unnamed = {(a, h) for a, h, n in entries if n is None}
            # A single entry under another name: renamed downloads keep their sidecar's text.
            candidates = unnamed or (
                {(a, h) for a, h, _ in entries} if len(entries) == 1 else set()
            )
            if len(candidates) == 1:
                algo_found, hexdigest = candidates.pop()
                return Checksum(algo_found, hexdigest, sidecar)
            raise ImageError(f"checksum file {sidecar} holds no usable {algo} checksum for {base}")
        sums = beside(f"{algo.upper()}SUMS")
        text = read(sums) if sums != beside(base) else None
        if text is not None:
            picked = _listed(text, algo, sums, base)
            if picked:
                return picked
    lists = [*_LISTS, *((n, "sha256") for n in dict.fromkeys([*listed, *fedora_names(base)]))]
    for name, algo in lists:
        where = beside(name)
        text = read(where) if name != base else None
        if text is not None:
            picked = _listed(text, algo, where, base, bare=(name, algo) in _LISTS[:3])
            if picked:
                return picked
    return None


class ChecksumTap:
    """Hashes the image file as stored, as the write pass reads it; vouches at the end.

    The file must be read from its start, in order, to its end: a seek elsewhere (or a read
    that was never finished) means the hash covers other bytes, and nothing is vouched for.
    """

    def __init__(self, checksum: Checksum, *, checked_before: bool = True) -> None:
        self.checksum = checksum
        self.checked_before = checked_before  # a checksum pass matched before this one
        self._hasher = new_hasher(checksum)
        self._file: _HashingFile | None = None

    def wrap(self, raw: io.FileIO) -> _HashingFile:
        self._file = _HashingFile(raw, self._hasher)
        return self._file

    def vouch(self) -> None:
        """Hash what the decoder left unread, then compare; raises ChecksumMismatch."""
        from popsicle_py.errors import ChecksumMismatch

        f = self._file
        if f is None or f.broken:
            raise ChecksumMismatch(self.checksum.algo)
        f.drain()
        if self._hasher.hexdigest() != self.checksum.hexdigest:
            raise ChecksumMismatch(self.checksum.algo, checked_before=self.checked_before)


class _HashingFile(io.RawIOBase):
    """A raw file whose sequential reads are hashed; used by :class:`ChecksumTap`."""

    def __init__(self, raw: io.FileIO, hasher: Hasher) -> None:
        super().__init__()
        self._raw = raw
        self._hasher = hasher
        self._pos = 0
        self.broken = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = self._raw.seek(offset, whence)
        if target != self._pos:
            self.broken = True
        self._pos = target
        return target

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = self._raw.readinto(view) or 0
        self._hasher.update(view[:n])
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._hasher.update(data)
        self._pos += len(data)
        return data

    def drain(self) -> None:
        if self.closed or self._raw.closed:
            with open(self._raw.name, "rb", buffering=0) as again:
                again.seek(self._pos)
                while chunk := again.read(_HASH_READ_SIZE):
                    self._hasher.update(chunk)
                    self._pos += len(chunk)
            return
        while chunk := self.read(_HASH_READ_SIZE):
            pass

    def close(self) -> None:
        self._raw.close()
        super().close()


def verify_checksum(
    path: str,
    checksum: Checksum,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    compressed: str | None = None,
    stall_timeout: float | None = None,
) -> None:
    """Hash the file as downloaded, in large sequential reads that also warm the page cache.

    ``compressed``: the format's name when the file is decoded into the image, so that a
    mismatch says which bytes were hashed (a common mistake: the image's checksum given for
    its .xz, or the reverse).  The reads run on a thread of their own, so that a file whose
    disk or network share hangs neither holds Ctrl-C nor waits forever: with
    ``stall_timeout``, less than 1 MiB in that long refuses the image.  ``progress`` is
    called on the calling thread.
    """
    from popsicle_py.engine.watched import WorkStalled, watched

    hasher = new_hasher(checksum)
    read = [0, 0]  # bytes hashed, of the file's size

    def work(clock: Clock, stopped: Callable[[], bool]) -> bool:
        buf = bytearray(_HASH_READ_SIZE)
        view = memoryview(buf)
        with open_file(path, path) as f:
            fd = f.fileno()
            try:
                read[1] = os.fstat(fd).st_size or os.lseek(fd, 0, os.SEEK_END)
                os.lseek(fd, 0, os.SEEK_SET)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while not stopped():
                    n = f.readinto(view)
                    if not n:
                        return True
                    hasher.update(view[:n])
                    read[0] += n
                    clock.advance(n)
            except OSError as e:
                raise ImageError(
                    f"{path} could not be read (at byte {read[0]}): {e.strerror or e}"
                ) from None
        return False

    shown = [-1]

    def tick() -> None:
        if progress is not None and read[0] != shown[0]:
            shown[0] = read[0]
            progress(read[0], read[1])

    try:
        ended = watched(work, cancel=cancel, stall_timeout=stall_timeout, tick=tick,
                        name="checksum")
    except WorkStalled as e:
        raise ImageError(
            f"{path} stopped answering while its checksum was computed: "
            + (f"no data for {e.limit:g} s (is the disk or network share it is on hung?)"
               if not e.moved else f"only {e.moved // 1024} KiB in {e.limit:g} s")
        ) from None
    if not ended:
        raise ChecksumCancelled(f"checksum of {path} cancelled")
    actual = hasher.hexdigest()
    if actual != checksum.hexdigest:
        hint = "" if compressed is None else (
            f"; this is the {checksum.algo} of the {compressed} file as downloaded, the one "
            "given may be the decompressed image's")
        raise ImageError(
            f"checksum mismatch for {path}: expected {checksum.algo} {checksum.hexdigest} "
            f"(from {checksum.source}), got {actual}{hint}"
        )
