"""The remote image: a URL probed once, its published checksum, and what the CLI calls.

:func:`open_url` probes the URL, finds the checksum published beside it (SHA256SUMS, NAME.sha256
..., signed when a keyring is given) and uses a cached copy of this version when there is one;
:class:`RemoteImage` streams (and decodes, exactly like files, through
:func:`images.open_stream`) a fresh :class:`Download` for each pass; :func:`materialize` keeps
the whole body in a file first, for watch and zip images.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import io
import os
import posixpath
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from urllib3.exceptions import HTTPError

from popsicle_py.cache import Cache, CacheWriter
from popsicle_py.defaults import DEFAULT_STALL_TIMEOUT
from popsicle_py.events import Note
from popsicle_py.images import (
    Checksum,
    Image,
    ImageError,
    choose_sidecar,
    judge,
    name_warning,
    open_image,
    open_stream,
    parse_checksum_option,
    read_decoded,
)
from popsicle_py.images.checksums import Hasher, sidecar_text
from popsicle_py.images.formats import Format
from popsicle_py.images.sample import Sample, runnable, take_sample
from popsicle_py.images.stillness import holding_still
from popsicle_py.records import record
from popsicle_py.remote.download import CHUNK, Download, Emit, FileSink
from popsicle_py.remote.http import (
    Client,
    HttpSettings,
    Probe,
    RemoteError,
    Validator,
    parse_content_range,
    probe,
    without_credentials,
)
from popsicle_py.signatures import check_signature

__all__ = [
    "RemoteImage",
    "UrlImage",
    "attach",
    "hidden_credentials",
    "materialize",
    "open_url",
    "published_checksum",
]

class _Decoded(io.RawIOBase):
    """The decoded image over a Download, keeping the download's hasher/expected in reach."""

    #: The download under it judges its own stalls (see :class:`.download.Download`).
    judges_its_stalls = True

    def judge_stalls(self, limit: float | None) -> None:
        self.download.judge_stalls(limit)

    def __init__(self, download: Download, decoded: BinaryIO) -> None:
        super().__init__()
        self.download = download
        self._decoded = decoded

    @property
    def hasher(self) -> Hasher | None:
        return self.download.hasher

    @property
    def expected(self) -> Checksum | None:
        return self.download.expected

    def verify(self) -> None:
        self.download.verify()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        return self._decoded.readinto(buffer)  # type: ignore[attr-defined, no-any-return]

    def close(self) -> None:
        if not self.closed:  # the download first: it ends a read blocked under the decoder
            self.download.close()
            self._decoded.close()
        super().close()


def _judged(probe_: Probe) -> Format:
    """The body's format; a refusal's advice names FILE, not the URL, in its commands."""
    try:
        return judge(probe_.head, probe_.url)
    except ImageError as exc:
        raise ImageError(runnable(str(exc), probe_.url,
                                  f"the file downloaded from {probe_.url}")) from None


def _sample(client: Client, probe_: Probe, kind: Format) -> Sample:
    """The start of the body, decoded as far as the "not a disk image" check needs: read on
    from the probe's answer, and left in its ``head`` for the download to serve first.

    A connection lost or too slow here (more than the read timeout for the whole sample)
    ends the sample: the download takes over from the byte reached, as after any drop.
    """
    resp = probe_.response
    deadline = time.monotonic() + client.settings.read_timeout
    got = len(probe_.head)
    broken = False

    def more(n: int) -> bytes | None:
        nonlocal got, broken
        if resp is None or broken or time.monotonic() > deadline:
            return None
        try:
            data = resp.read1(n)
        except (HTTPError, OSError, http.client.HTTPException):
            broken = True
            return None
        if not data and probe_.total is not None and got < probe_.total:
            broken = True  # closed early: a cut, not the end
            return None
        got += len(data)
        return data

    try:
        sample = take_sample(probe_.head, more, kind, probe_.url)
    except ImageError as exc:
        raise ImageError(runnable(str(exc), probe_.url,
                                  f"the file downloaded from {probe_.url}")) from None
    probe_.head = sample.raw
    if broken and resp is not None:
        resp.close()
        probe_.response = None  # the download asks again from the byte reached
    return sample


class RemoteImage:
    """An image at a URL, probed once; open() streams (and decodes) the download.

    The first open() uses the probe's response; later ones read the copy the first download
    left in the cache, or download again, refusing a file that changed on the server.
    ``expected`` is the published checksum, checked by the stream in the same pass.
    """

    seekable_raw = False
    member: str | None = None

    def __init__(self, client: Client, probe_: Probe, expected: Checksum | None,
                 cache: Cache | None) -> None:
        self.client = client
        self._probe: Probe | None = probe_
        self.url = probe_.url
        self.path = probe_.url
        self.final_url = probe_.final_url
        self.validator = probe_.validator
        self.total = probe_.total
        self.kind = _judged(probe_)  # refused or damaged: before any drive
        self.format = self.kind.name
        #: The decoded start, judged before any drive is opened (app/sources.sanity_note).
        self.sample = _sample(client, probe_, self.kind)
        self.file_size = probe_.total or 0
        self.size = None if self.kind.decoded else probe_.total
        self.expected = expected
        self.cache = cache
        self.emit: Emit | None = None
        self.cancel: Callable[[], bool] | None = None
        self.local: str | None = None  # a complete copy, once one exists
        #: Less than STALL_BYTES in this many seconds of reading stalls a connection; the
        #: engine's reader hands each stream the run's --stall-timeout (judge_stalls).
        self.stall_timeout: float | None = DEFAULT_STALL_TIMEOUT
        self.warning: str | None = None
        ext = posixpath.splitext(urllib.parse.urlsplit(self.final_url).path)[1].lower()
        self.warning = name_warning(self.url, ext, self.kind)

    @property
    def compressed(self) -> bool:
        return self.kind.decoded

    def attach(self, emit: Emit | None, cancel: Callable[[], bool] | None = None) -> None:
        """Where download progress goes (the view), and what stops a pause between retries."""
        self.emit = emit
        self.cancel = cancel

    def open_raw(self, sink: CacheWriter | FileSink | None = None, *,
                 required: bool = False) -> Download:
        """The body as published (compressed bytes for a compressed image).

        With a cache, the body is also kept there; ``required`` when that copy is the one the
        caller will use (else a cache that cannot be written is skipped with a note).
        """
        p = self._probe
        self._probe = None
        if p is None:  # a second pass: a fresh request, which must be the same version
            p = probe(self.client, self.url)
            if self.validator.contradicts(p.validator) or p.total != self.total:
                p.close()
                raise RemoteError(f"{self.url} changed on the server since it was first "
                                  "read; run again")
            if not self.validator.confirms(p.validator):  # a checksum would not judge a
                p.close()  # repair's few bytes: this answer is never used
                which = "ETag" if self.validator.etag else "Last-Modified"
                raise RemoteError(f"{self.url}: the server answered again without the file's "
                                  f"{which}, so nothing shows it is the version first read; "
                                  "not mixing two versions: run again")
        if sink is None and self.cache is not None and self.validator.key is not None:
            try:
                sink = self.cache.writer(self.url, self.validator.key)
            except OSError as exc:
                why = f"{self.cache.root}: {exc.strerror or exc}"
                if required:
                    p.close()
                    raise RemoteError(f"cannot keep the download of {self.url} in {why}; "
                                      "fix it, or run without --cache") from None
                if self.emit is not None:
                    self.emit(Note(f"not caching {self.url}: {why}; the flash goes on"))
        download = Download(self.client, p, expected=self.expected, sink=sink,
                            emit=self.emit, cancel=self.cancel, required=required,
                            stall_timeout=self.stall_timeout)
        download.on_commit = self._keep
        return download

    def _keep(self, path: str) -> None:
        self.local = path

    #: The bytes as published can be hashed in the write pass (see open's ``tap``).
    tappable = True

    def open(self, tap: Any = None) -> BinaryIO:
        """A fresh stream of the image: decoded, hashed, resumed after drops.

        ``tap`` (an engine's checksum tap: ``tap.wrap(raw)`` returns a hashing stream) sees the
        downloaded bytes before they are decoded, as for a file.  Without it the stream still
        checks ``expected`` itself at the end of the body.
        """
        if self.local is not None and os.path.exists(self.local):
            local: Any = open_image(self.local)  # checked when it was downloaded
            return local.open() if tap is None else local.open(tap)  # type: ignore[no-any-return]
        download = self.open_raw()
        raw: Any = download if tap is None else tap.wrap(download)
        # Judged at its end too (a DMG shows only there): see images.image.EndJudged.
        decoded = open_stream(raw, self.format, self.url,
                              saved=f"the file downloaded from {self.url}")
        return _Decoded(download, decoded)  # type: ignore[return-value]

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the image at ``offset`` (repairs): from the copy, else again.

        A download that fails here is an OSError: the engine names the image, not the drive
        it repairs ("reading the image again for this drive failed ...", cause source)."""
        stream: Any
        try:
            if not self.kind.decoded and (self.local is None or not os.path.exists(self.local)):
                ranged = self._ranged(offset, length)
                if ranged is not None:
                    return ranged
            with self.open() as stream:
                return read_decoded(stream, offset, length)
        except (ImageError, HTTPError, http.client.HTTPException) as exc:
            raise OSError(errno.EIO, str(exc)) from None

    def _ranged(self, offset: int, length: int) -> bytes | None:
        """A raw image's bytes by a Range request of their own, when the server answers it
        as asked (None: download from the start instead).  A repair near the end of a large
        image would otherwise download all that comes before, and its drive wait that long
        (the engine checks these bytes against the digests of the first read)."""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if self.validator.if_range:
            headers["If-Range"] = self.validator.if_range
        resp = self.client.get(self.final_url, headers, wait=self.stall_timeout)
        try:
            span = parse_content_range(resp.headers.get("Content-Range"))
            if resp.status != 206 or span is None or span[0] != offset \
                    or not self.validator.confirms(Validator.of(resp.headers)):
                return None
            data = resp.read(length)
        finally:
            resp.close()
        if len(data) != length:
            raise RemoteError(f"{self.url}: the server sent {len(data)} of the {length} bytes "
                              f"asked for at byte {offset}")
        return bytes(data)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None


# ----------------------------------------------------------------------------------------------
# Published checksums (their signatures: popsicle_py.signatures)


def _name_of(url: str) -> str:
    """The file name a URL ends with (what SHA256SUMS lists)."""
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(posixpath.basename(path))


def _beside(url: str, name: str) -> str:
    return urllib.parse.urljoin(url, urllib.parse.quote(name))


def published_checksum(client: Client, probe_: Probe, keyring: str | None
                       ) -> tuple[Checksum | None, list[str]]:
    """The checksum published beside the URL (or beside where it redirected), and notes."""
    fetched: dict[str, bytes | None] = {}

    def read_bytes(url: str) -> bytes | None:
        if url not in fetched:
            fetched[url] = client.fetch_small(url)
        return fetched[url]

    def read_text(url: str) -> str | None:
        data = read_bytes(url)
        return None if data is None else sidecar_text(data)

    found = None
    for where in dict.fromkeys((probe_.url, probe_.final_url)):
        name = _name_of(where)
        if name:
            found = choose_sidecar(name, lambda n, w=where: _beside(w, n),  # type: ignore[misc]
                                   read_text)
        if found:
            break
    notes = []
    if keyring is not None:
        if found is None:
            raise ImageError(f"--keyring: no SHA256SUMS, SHA512SUMS or {_name_of(probe_.url)}"
                             f".sha256 found beside {probe_.url}: nothing to verify")
        sig = check_signature(found.source, read_bytes, keyring)
        notes.append(f"signature ok: {sig} (keyring {keyring})")
    return found, notes


# ----------------------------------------------------------------------------------------------
# What the CLI calls


@dataclass
class UrlImage:
    """A URL opened for flashing: the image, a checksum still to check first, and notes."""

    image: RemoteImage | Image
    prepass: Checksum | None = None  # set for a cached copy: checked like a local file
    notes: list[str] = field(default_factory=list)
    #: For a cached copy: raises if it changes from now on (see images.stillness).
    still: Callable[[], None] | None = None


def open_url(url: str, *, sha256: str | None = None, checksum: str | None = None,
             no_checksum: bool = False, keyring: str | None = None,
             cache: Cache | None = None, settings: HttpSettings | None = None) -> UrlImage:
    """Probe the URL, find its checksum, and use a cached copy of this version if there is one.

    Raises ImageError (one line) for anything that stops the flash before writing.
    """
    given = parse_checksum_option(sha256, checksum)
    if keyring is not None and (given is not None or no_checksum):
        raise ImageError("--keyring checks a published checksum file; it cannot be combined "
                         "with --sha256, --checksum or --no-checksum")
    try:
        url, auth = without_credentials(url)  # a password is never shown, nor cached
        urllib.parse.urlsplit(url).port  # noqa: B018 - raises for a malformed host or port
    except ValueError as exc:
        shown = hidden_credentials(url)
        hidden = url.partition("//")[2].rpartition("@")[0]
        quoted = any(part in str(exc) for part in re.split(r"[:/?#@]", hidden) if part)
        why = (f"{exc}" if not quoted else  # its words quote a part of the password
               "is a / ? # or @ in its password not written %2F %3F %23 %40?")
        raise RemoteError(f"{shown}: not a valid URL ({why})") from None
    client = Client(settings, None if auth is None else (url, auth))
    first = probe(client, url)
    try:
        notes: list[str] = []
        expected = given
        if expected is None and not no_checksum:
            expected, notes = published_checksum(client, first, keyring)
        key = first.validator.key
        if cache is not None and key is None:
            notes.append(f"not cached: {url} gives no ETag or Last-Modified to tell versions "
                         "apart")
        if cache is not None and key is not None:
            entry = cache.lookup(url, key)
            if entry is not None and expected is None and entry.sha256 is None:
                notes.append(f"not using the cached download of {url}: nothing could check "
                             "it (no checksum recorded, none published); downloading again")
                entry = None
            if entry is not None:
                first.close()
                notes.append(f"using the cached download of {url} ({entry.path})")
                check = expected
                if check is None and entry.sha256 is not None:  # damaged since: refused
                    check = Checksum("sha256", entry.sha256, f"the cache's record of {url}")
                path = str(entry.path)
                return UrlImage(open_image(path), check, notes, holding_still(path))
        image = RemoteImage(client, first, expected, cache if key is not None else None)
    except BaseException:
        first.close()
        raise
    if expected is not None:
        notes.append(f"checksum: {expected.algo} from {expected.source}, checked while "
                     "downloading")
    return UrlImage(image, None, notes)


def hidden_credentials(text: str) -> str:
    """``text`` (a URL, or what was meant as one and does not parse) as a refusal shows it:
    what stands between its ``//`` and its last ``@`` is taken for a user and a password and
    left out (a password with an unencoded / or # ends the URL's host part early)."""
    head, sep, rest = text.partition("//")
    if not sep or "@" not in rest:
        return text
    return head + sep + rest.rpartition("@")[2]


def attach(image: object, emit: Emit | None, cancel: Callable[[], bool] | None = None) -> None:
    """Send a RemoteImage's download events to the view (no-op for local images)."""
    if isinstance(image, RemoteImage):
        image.attach(emit, cancel)


def materialize(image: RemoteImage, emit: Emit, cancel: Callable[[], bool],
                tmpdir: str, stall_timeout: float | None = None
                ) -> tuple[Image | None, Callable[[], None]]:
    """Download the whole image to a file (the cache, else a private one) and open that.

    For watch (every drive served from one download) and for zip files (whose directory is at
    the end).  Returns (None, cleanup) when cancelled.  The checksum is checked in the same
    pass; ImageError when the download fails.  ``cleanup`` removes a private copy.
    ``stall_timeout`` (the run's, when it has one) replaces the image's default stall rule.
    """
    if stall_timeout is not None:
        image.stall_timeout = stall_timeout
    sink: CacheWriter | FileSink | None = None
    private: FileSink | None = None
    if image.cache is None:
        try:
            private = FileSink(tmpdir)
        except OSError as exc:
            raise ImageError(f"cannot make a temporary file in {tmpdir} for the download: "
                             f"{exc.strerror or exc}; set TMPDIR") from None
        sink = private
    image.attach(emit, cancel)

    def cleanup() -> None:
        if private is not None:
            private.remove()

    download = image.open_raw(sink, required=True)
    outcome: list[BaseException | None] = []

    def pull() -> None:
        try:
            while download.readinto(buf):
                pass
            outcome.append(None)
        except BaseException as exc:  # handed to the waiting thread
            outcome.append(exc)

    buf = bytearray(CHUNK)
    thread = threading.Thread(target=pull, name="popsicle-download", daemon=True)
    thread.start()
    while thread.is_alive():  # the main thread stays free for signals
        thread.join(0.1)
        if cancel():
            download.close()
            cleanup()
            return None, cleanup
    download.close()
    if outcome and outcome[0] is not None:
        cleanup()
        error = outcome[0]
        if isinstance(error, ImageError):
            raise error
        raise ImageError(f"{image.url}: download failed: {error}") from None
    path = download.committed
    assert path is not None
    image.local = path
    if emit is not None:
        where = "a private copy, removed at the end" if private is not None else path
        emit(Note(f"downloaded {image.url} once to {where}; every drive is written from it"))
    try:
        local = open_image(path)
    except ImageError as exc:
        cleanup()
        raise ImageError(str(exc).replace(path, image.url)) from None
    fields = {f.name: getattr(local, f.name) for f in dataclasses.fields(local)}
    return DownloadedCopy(**fields, url=image.url), cleanup


@record
class DownloadedCopy(Image):
    """The copy of a download, named in its errors by its URL, not by the private file."""

    url: str = ""

    def open(self, tap: Any = None) -> io.RawIOBase:
        stream = super().open(tap)
        if not self.kind.decoded:  # the file itself, read by position too
            return stream
        return _Named(stream, self.path, self.url)


class _Named(io.RawIOBase):
    """A decoded stream whose errors say ``url`` where they said ``path``."""

    def __init__(self, stream: io.RawIOBase, path: str, url: str) -> None:
        super().__init__()
        self._stream, self._path, self._url = stream, path, url

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return self._stream.readinto(buffer)
        except ImageError as exc:
            raise ImageError(str(exc).replace(self._path, self._url)) from None

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()
