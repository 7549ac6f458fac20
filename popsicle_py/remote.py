"""Images at http(s) URLs: one download streamed into every drive, resumed after drops.

The HTTP client is urllib3 (2.x): pooled connections, redirects, timeouts and TLS verification
against the system's certificates by default, pure Python.  The body is read through
:class:`Download`, which continues after a dropped or stalled connection with a Range request
from the byte reached, guarded by If-Range so that a file changed on the server is never
stitched together from two versions.  The bytes are hashed as they are handed out, and the
stream itself refuses to end (raises) when the published checksum does not match: the engine
holds the image's first bucket back until the stream ended, so a bad download never leaves a
bootable-looking drive.  Compressed bodies are decoded by :func:`images.open_stream`, exactly
like files.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import urllib3
from urllib3.exceptions import (
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import Retry, Timeout

from popsicle_py._version import __version__
from popsicle_py.cache import Cache, CacheWriter
from popsicle_py.events import Event, Note, Phase, Progress, Step
from popsicle_py.images import (
    Checksum,
    Image,
    ImageError,
    choose_sidecar,
    detect,
    name_warning,
    new_hasher,
    open_image,
    open_stream,
    parse_checksum_option,
    read_decoded,
)

__all__ = [
    "DOWNLOADING",
    "Download",
    "HttpSettings",
    "RemoteError",
    "RemoteImage",
    "UrlImage",
    "is_url",
    "materialize",
    "open_url",
]

#: The phase of the image-level Phase/Progress events while the body arrives.
DOWNLOADING = Step.DOWNLOADING

_HEAD = 4096  # bytes read before deciding what the body is
_CHUNK = 1 << 20  # most bytes per read from the connection: progress and stalls stay fine-grained
_PROGRESS_INTERVAL = 0.2
_SIDECAR_LIMIT = 16 << 20
SIGNATURE_SUFFIXES = (".gpg", ".sign", ".asc", ".sig")

Emit = Callable[[Event], None]


class RemoteError(ImageError):
    """A download that cannot go on, as one line (an ImageError: the CLI refuses with it)."""


def is_url(text: str) -> bool:
    """True for http:// and https:// addresses (what flash and watch download)."""
    return text[:8].lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class HttpSettings:
    """Timeouts and retries; the environment can shorten them (tests, slow links)."""

    connect_timeout: float = 15.0
    read_timeout: float = 30.0  # no byte for this long: the connection is stalled, resume
    retries: int = 5  # consecutive failed attempts without progress before giving up
    backoff: float = 0.5  # first pause between attempts, doubled each time (at most 8 s)
    max_redirects: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HttpSettings:
        """POPSICLE_PY_HTTP_TIMEOUT, _RETRIES and _BACKOFF override the defaults."""
        env = os.environ if env is None else env
        base = cls()
        try:
            return cls(
                connect_timeout=float(env.get("POPSICLE_PY_HTTP_TIMEOUT", base.connect_timeout)),
                read_timeout=float(env.get("POPSICLE_PY_HTTP_TIMEOUT", base.read_timeout)),
                retries=int(env.get("POPSICLE_PY_HTTP_RETRIES", base.retries)),
                backoff=float(env.get("POPSICLE_PY_HTTP_BACKOFF", base.backoff)),
            )
        except ValueError:
            raise ImageError("POPSICLE_PY_HTTP_TIMEOUT, _RETRIES and _BACKOFF must be "
                             "numbers") from None

    def pause(self, attempt: int) -> float:
        return float(min(8.0, self.backoff * 2 ** (attempt - 1)))


# ----------------------------------------------------------------------------------------------
# Pure decisions over headers


@dataclass(frozen=True)
class Validator:
    """What identifies one version of the file on the server."""

    etag: str | None
    last_modified: str | None

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> Validator:
        return cls(headers.get("ETag"), headers.get("Last-Modified"))

    @property
    def if_range(self) -> str | None:
        """If-Range takes a strong ETag or a date (RFC 9110 13.1.5), never a weak ETag."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    @property
    def key(self) -> str | None:
        """The cache's notion of a version; None when the server gives no validator."""
        if self.etag:
            return f"etag:{self.etag}"
        if self.last_modified:
            return f"date:{self.last_modified}"
        return None

    def contradicts(self, other: Validator) -> bool:
        """True when ``other`` (a later response's) says the file is another version."""
        if self.etag and other.etag:
            return self.etag.removeprefix("W/") != other.etag.removeprefix("W/")
        if self.last_modified and other.last_modified:
            return self.last_modified != other.last_modified
        return False


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.I)


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total or None) of a 206's Content-Range; None when absent or malformed."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not m:
        return None
    return int(m[1]), int(m[2]), None if m[3] == "*" else int(m[3])


def content_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("Content-Length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<!--", b"<?xml")


def looks_like_html(head: bytes, content_type: str | None) -> bool:
    """An error or download page where an image was expected: markup, or text/html text."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(_HTML_STARTS):
        return True
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind in ("text/html", "application/xhtml+xml") and b"\0" not in head


def status_message(url: str, status: int, reason: str | None) -> str:
    what = f"HTTP {status}{' ' + reason if reason else ''}"
    if status == 404:
        return f"{url}: not found ({what})"
    if status == 410:
        return f"{url}: gone from the server ({what})"
    if status in (401, 403):
        return f"{url}: access refused ({what})"
    return f"{url}: the server answered {what}"


_VERIFY_FAILED = re.compile(r"certificate verify failed: ([^(]*?)\s*(?:\(|$)")


def transport_message(url: str, exc: BaseException) -> str:
    """One line for a connection that could not be made or went wrong (no traceback text)."""
    reason = exc.reason if isinstance(exc, MaxRetryError) else exc
    host = urllib.parse.urlsplit(url).hostname or url
    text = str(reason)
    if isinstance(exc, MaxRetryError) and "too many redirects" in text.lower():
        return f"{url}: too many redirects (a redirect loop?)"
    if isinstance(reason, SSLError) or "SSL" in text:
        m = _VERIFY_FAILED.search(text)
        if m:
            return (f"{url}: TLS certificate of {host} is not trusted ({m[1]}); "
                    "nothing was downloaded")
        return f"{url}: TLS error with {host}: {_short(text)}"
    if isinstance(reason, NewConnectionError):
        cause = text.rsplit(":", 1)[-1].strip() or "refused"
        return f"{url}: cannot connect to {host}: {cause}"
    if isinstance(reason, ReadTimeoutError) or "timed out" in text.lower():
        return f"{url}: {host} did not answer in time"
    return f"{url}: {_short(text)}"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _name_of(url: str) -> str:
    """The file name a URL ends with (what SHA256SUMS lists)."""
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(posixpath.basename(path))


def _beside(url: str, name: str) -> str:
    return urllib.parse.urljoin(url, urllib.parse.quote(name))


# ----------------------------------------------------------------------------------------------
# The client


class Client:
    """One connection pool for a run: the probe, the body, its resumes and the sums files."""

    def __init__(self, settings: HttpSettings | None = None) -> None:
        self.settings = settings or HttpSettings.from_env()
        s = self.settings
        # urllib3 logs each retry as a warning: our own notes say it once, in the user's words.
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            logging.getLogger("urllib3").setLevel(logging.ERROR)
        self.pool = urllib3.PoolManager(
            maxsize=4,  # the body, a resume or the end check, and the sums files at once
            timeout=Timeout(connect=s.connect_timeout, read=s.read_timeout),
            headers={"User-Agent": f"popsicle-py/{__version__}",
                     "Accept-Encoding": "identity"},  # Range offsets are offsets in the file
        )

    def get(self, url: str, headers: Mapping[str, str] | None = None,
            redirects: bool = True) -> urllib3.BaseHTTPResponse:
        """GET with redirects and retries of the connection; transport errors as RemoteError."""
        s = self.settings
        retry = Retry(total=None, connect=s.retries, read=s.retries, status=s.retries,
                      redirect=s.max_redirects if redirects else 0, other=0,
                      status_forcelist=(429, 500, 502, 503, 504), backoff_factor=s.backoff,
                      backoff_max=8.0, raise_on_status=False, raise_on_redirect=True)
        try:
            return self.pool.request("GET", url, headers=dict(headers or {}), retries=retry,
                                     preload_content=False, decode_content=False)
        except (HTTPError, OSError) as exc:
            raise RemoteError(transport_message(url, exc)) from None

    def fetch_small(self, url: str) -> bytes | None:
        """A sums or signature file; None when it is not there (404, 410, or an HTML page)."""
        resp = self.get(url)
        try:
            if resp.status in (403, 404, 410):
                return None
            if resp.status != 200:
                raise RemoteError(f"checksum file {status_message(url, resp.status, resp.reason)}")
            data = resp.read(_SIDECAR_LIMIT + 1)
            if len(data) > _SIDECAR_LIMIT:
                raise RemoteError(f"checksum file {url} is larger than 16 MiB: not a checksum "
                                  "file")
            if looks_like_html(data[:_HEAD], resp.headers.get("Content-Type")):
                return None  # a "soft 404" page
            return data
        except (HTTPError, OSError) as exc:
            raise RemoteError(transport_message(url, exc)) from None
        finally:
            left = resp.length_remaining
            if left is not None and left <= 64 << 10:  # read the little left: reuse it
                resp.drain_conn()
                resp.release_conn()
            else:
                resp.close()  # never hand back a connection in the middle of a body


@dataclass
class Probe:
    """The first answer for a URL: what the body is, and the open response to stream it from."""

    url: str
    final_url: str
    response: urllib3.BaseHTTPResponse | None
    head: bytes
    total: int | None
    validator: Validator
    content_type: str | None

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None


def final_url(url: str, resp: urllib3.BaseHTTPResponse) -> str:
    """Where the redirects ended (resume requests go there, to the same mirror)."""
    retries = getattr(resp, "retries", None)
    for step in getattr(retries, "history", ()) or ():
        if step.redirect_location:
            url = urllib.parse.urljoin(url, step.redirect_location)
    return url


def probe(client: Client, url: str) -> Probe:
    """GET the URL and read its first bytes; refuse errors and HTML pages before anything."""
    resp = client.get(url)
    if resp.status != 200:
        resp.close()
        raise RemoteError(status_message(url, resp.status, resp.reason))
    final = final_url(url, resp)
    try:
        head = resp.read(_HEAD)
    except (HTTPError, OSError) as exc:
        resp.close()
        raise RemoteError(transport_message(url, exc)) from None
    result = Probe(url, final, resp, head, content_length(resp.headers),
                   Validator.of(resp.headers), resp.headers.get("Content-Type"))
    if not head:
        result.close()
        raise RemoteError(f"{url} is empty (the server sent no bytes)")
    if not detect(head).decoded and looks_like_html(head, result.content_type):
        result.close()
        raise RemoteError(f"{url} is an HTML page, not a disk image (an error or download "
                          "page? use the direct link to the image)")
    return result


# ----------------------------------------------------------------------------------------------
# The body as a stream


class Download(io.RawIOBase):
    """The body of one URL, continued after drops and stalls; hashes and keeps what it yields.

    ``hasher`` sees every byte handed out; with ``expected`` set, the end of the body is
    reported only after the digest matched (a mismatch raises RemoteError instead).  ``sink``
    (a cache entry or a private file) receives the same bytes and is committed at that end.
    A sink that cannot take them (its disk full) ends the download when it is ``required``
    (the only copy, for watch and zip images), else it is dropped with a note.
    """

    def __init__(self, client: Client, probe_: Probe, *, expected: Checksum | None = None,
                 sink: CacheWriter | _FileSink | None = None, emit: Emit | None = None,
                 cancel: Callable[[], bool] | None = None, required: bool = False) -> None:
        super().__init__()
        self.client = client
        self.url = probe_.url
        self.final_url = probe_.final_url
        self.validator = probe_.validator
        self.total = probe_.total
        self.expected = expected
        self.hasher: Any = new_hasher(expected) if expected else None  # no cost unless needed
        self.sink = sink
        self.required = required
        self.emit = emit
        self.cancel = cancel
        self.resumes = 0
        self._resp = probe_.response
        probe_.response = None  # ours now
        self._pending = probe_.head
        self._net = len(probe_.head)  # offset of the next byte from the connection
        self._handed = 0
        self._failures = 0
        self._finished = False
        self._error: ImageError | None = None
        self._last_progress = 0.0
        self.committed: str | None = None
        self.on_commit: Callable[[str], None] | None = None

    def readable(self) -> bool:
        return True

    @property
    def position(self) -> int:
        return self._handed

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._error is not None:
            raise self._error
        out = memoryview(buffer).cast("B")
        if not len(out) or self._finished:
            return 0
        try:
            if self._handed == 0 and self.emit is not None:
                self.emit(Phase(None, DOWNLOADING, self.url))
            data = self._next(min(len(out), _CHUNK))
            if not data:
                self._finish()
                return 0
            if self.sink is not None:
                self._keep(data)
        except ImageError as exc:
            self._fail(exc)
            raise
        n = len(data)
        out[:n] = data
        if self.hasher is not None:
            self.hasher.update(data)
        self._handed += n
        self._progress()
        return n

    def _keep(self, data: bytes) -> None:
        assert self.sink is not None
        try:
            self.sink.write(data)
        except OSError as exc:
            where = self.sink.where
            self.sink.abort()
            self.sink = None
            self._sink_failed(where, exc)

    def _sink_failed(self, where: str, exc: OSError) -> None:
        """The copy could not be kept: the end of the download if it is needed, else a note."""
        why = exc.strerror or str(exc)
        if self.required:
            raise RemoteError(f"cannot keep the download of {self.url} in {where}: {why}") \
                from None
        if self.emit is not None:
            self.emit(Note(f"not caching {self.url}: {where}: {why}; the flash goes on"))

    def _fail(self, exc: ImageError) -> None:
        self._error = exc
        if self.sink is not None:
            self.sink.abort()
            self.sink = None
        self._drop()

    def _next(self, limit: int) -> bytes:
        """Up to ``limit`` bytes: the probe's head first, then the connection; b"" at the end.

        The first read joins the head to more of the body, so that a connection lost before
        anything was handed out can start over even on a server without Range support.
        """
        if self._pending:
            if self._handed or len(self._pending) >= limit:
                data, self._pending = self._pending[:limit], self._pending[limit:]
                return data
            more = self._from_connection(limit - len(self._pending))  # may start over
            data, self._pending = self._pending + more, b""
            return data
        return self._from_connection(limit)

    def _from_connection(self, limit: int) -> bytes:
        while True:
            if self.cancel is not None and self.cancel():
                raise RemoteError(f"{self.url}: download cancelled")
            if self._resp is None:
                self._reconnect()
                continue
            try:
                data = self._resp.read(limit)
            except (HTTPError, OSError, http.client.HTTPException) as exc:
                self._retry(_why(exc))
                continue
            if data:
                self._net += len(data)
                self._failures = 0
                return data
            if self.total is not None and self._net < self.total:
                self._retry(f"the connection closed at byte {self._net}")
                continue
            return b""

    def _retry(self, why: str) -> None:
        """One more failed attempt: pause, or give up with what happened."""
        self._drop()
        self._failures += 1
        if self._failures > self.client.settings.retries:
            of = f" of {self.total}" if self.total is not None else ""
            raise RemoteError(f"{self.url}: download failed at byte {self._net}{of} after "
                              f"{self._failures} attempts: {why}")
        if self.emit is not None:
            self.emit(Note(f"download interrupted at byte {self._net} ({why}); resuming"))
        deadline = time.monotonic() + self.client.settings.pause(self._failures)
        while time.monotonic() < deadline:
            if self.cancel is not None and self.cancel():
                raise RemoteError(f"{self.url}: download cancelled")
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _reconnect(self) -> None:
        """Ask for the rest; take the answer only if it is the same file from the same byte.

        A server that gives neither ETag nor Last-Modified cannot show that the file changed:
        its download starts over while nothing was used, and is resumed afterwards only when a
        checksum will judge the result.
        """
        blind = self.validator.key is None and self.expected is None
        if blind and self._handed:
            raise RemoteError(f"{self.url}: the connection was lost at byte {self._net} and "
                              "the server gives no ETag or Last-Modified, so a resumed "
                              "download could mix two versions of the file; run again, or "
                              "give its checksum (--sha256) to allow resuming")
        headers = {} if blind else {"Range": f"bytes={self._net}-"}
        if self.validator.if_range:
            headers["If-Range"] = self.validator.if_range
        try:
            resp = self.client.get(self.final_url, headers)
        except RemoteError as exc:
            self._retry(str(exc).removeprefix(f"{self.final_url}: "))
            return
        self.resumes += 1
        now = Validator.of(resp.headers)
        if resp.status in (200, 206) and self.validator.contradicts(now):
            resp.close()
            raise RemoteError(f"{self.url} changed on the server during the download (the "
                              "server's ETag/Last-Modified differ); not mixing two versions: "
                              "run again")
        if resp.status == 206:
            span = parse_content_range(resp.headers.get("Content-Range"))
            if span is None or span[0] != self._net or (
                    self.total is not None and span[2] not in (None, self.total)):
                resp.close()
                raise RemoteError(f"{self.url}: the server resumed at the wrong place "
                                  f"(asked for byte {self._net}, got "
                                  f"{resp.headers.get('Content-Range')!r})")
            self._resp = resp
            return
        if resp.status == 200:
            if self._handed == 0:  # nothing used yet: starting over is harmless
                self._pending = b""
                self._net = 0
                self._resp = resp
                if content_length(resp.headers) not in (None, self.total):
                    resp.close()
                    raise RemoteError(f"{self.url} changed size on the server during the "
                                      "download; run again")
                return
            resp.close()
            raise RemoteError(f"{self.url}: the connection was lost at byte {self._net} and "
                              "the server cannot resume (it ignores Range requests)")
        if resp.status == 416 and self.total is not None:
            resp.close()
            raise RemoteError(f"{self.url}: the server announced {self.total} bytes "
                              f"(Content-Length) but the file ends at byte {self._net}")
        if resp.status == 412:
            resp.close()
            raise RemoteError(f"{self.url} changed on the server during the download; "
                              "run again")
        status, reason = resp.status, resp.reason
        resp.close()
        self._retry(f"HTTP {status}{' ' + reason if reason else ''}")

    def _finish(self) -> None:
        """The body ended: check its length, that nothing follows it, and the checksum."""
        if self.total is not None and self._handed != self.total:
            raise RemoteError(f"{self.url}: the server announced {self.total} bytes "
                              f"(Content-Length) but sent {self._handed}")
        self._drop()
        if self.total is not None:
            self._check_nothing_follows()
        if self.expected is not None:
            actual = self.hasher.hexdigest()
            if actual != self.expected.hexdigest:
                raise RemoteError(
                    f"checksum mismatch for {self.url}: expected {self.expected.algo} "
                    f"{self.expected.hexdigest} (from {self.expected.source}), got {actual}")
        self._finished = True
        self._progress(force=True)
        if self.sink is not None:
            sink, self.sink = self.sink, None
            try:
                self.committed = str(sink.commit())
            except OSError as exc:  # its disk filled up at the last flush, or its metadata
                sink.abort()
                self._sink_failed(sink.where, exc)
                return
            if self.on_commit is not None:
                self.on_commit(self.committed)

    def _check_nothing_follows(self) -> None:
        """A Content-Length shorter than the file is a truncated image: ask for what follows."""
        headers = {"Range": f"bytes={self.total}-"}
        if self.validator.if_range:
            headers["If-Range"] = self.validator.if_range
        try:
            resp = self.client.get(self.final_url, headers)
        except RemoteError:
            return  # no answer is no evidence; the body itself was complete
        try:
            extra = resp.status == 206 or (
                resp.status == 200 and content_length(resp.headers) not in (None, self.total))
        finally:
            resp.close()
        if extra:
            raise RemoteError(f"{self.url}: the server announced {self.total} bytes "
                              "(Content-Length) but the file is longer; refusing a truncated "
                              "image")

    def _progress(self, force: bool = False) -> None:
        if self.emit is None:
            return
        now = time.monotonic()
        if force or now - self._last_progress >= _PROGRESS_INTERVAL:
            self._last_progress = now
            self.emit(Progress(None, DOWNLOADING, self._handed, self.total))

    def _drop(self) -> None:
        if self._resp is not None:
            with contextlib.suppress(Exception):
                self._resp.close()
            self._resp = None

    def verify(self) -> None:
        """Read what is left and check the checksum (for an engine that stops early)."""
        while self.readinto(bytearray(_CHUNK)):
            pass

    def close(self) -> None:
        if not self.closed:
            self._drop()
            if self.sink is not None:
                self.sink.abort()
                self.sink = None
        super().close()


def _why(exc: BaseException) -> str:
    if isinstance(exc, ReadTimeoutError) or "timed out" in str(exc).lower():
        return "no data for too long (stalled)"
    if isinstance(exc, ProtocolError):
        inner = exc.args[1] if len(exc.args) > 1 else exc
        if isinstance(inner, http.client.IncompleteRead):
            return "the connection closed before the body ended"
        return f"connection broken: {_short(str(inner))}"
    return _short(str(exc)) or type(exc).__name__


class _FileSink:
    """A private copy of the download (watch without --cache, zip images)."""

    def __init__(self, directory: str) -> None:
        self.where = directory
        self.dir = tempfile.mkdtemp(prefix="popsicle-py-download-", dir=directory)
        self.path = os.path.join(self.dir, "image")
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by commit() or abort()

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)

    def commit(self) -> str:
        self._file.close()
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _Decoded(io.RawIOBase):
    """The decoded image over a Download, keeping the download's hasher/expected in reach."""

    def __init__(self, download: Download, decoded: BinaryIO) -> None:
        super().__init__()
        self.download = download
        self._decoded = decoded

    @property
    def hasher(self) -> Any:
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
        if not self.closed:
            self._decoded.close()
            self.download.close()
        super().close()


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
        self.kind = detect(probe_.head)
        self.format = self.kind.name
        self.file_size = probe_.total or 0
        self.size = None if self.kind.decoded else probe_.total
        self.expected = expected
        self.cache = cache
        self.emit: Emit | None = None
        self.cancel: Callable[[], bool] | None = None
        self.local: str | None = None  # a complete copy, once one exists
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

    def open_raw(self, sink: CacheWriter | _FileSink | None = None, *,
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
                            emit=self.emit, cancel=self.cancel, required=required)
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
        if not self.kind.decoded:
            return download if tap is None else _Decoded(download, raw)  # type: ignore[return-value]
        decoded = open_stream(raw, self.format, self.url)
        return _Decoded(download, decoded)  # type: ignore[return-value]

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the image at ``offset`` (repairs): from the copy, else again."""
        stream: Any
        with self.open() as stream:
            return read_decoded(stream, offset, length)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None


# ----------------------------------------------------------------------------------------------
# Published checksums and their signatures


def _signature_check(name: str, data: bytes, signature: bytes, keyring: str) -> None:
    """gpgv against the user's keyring only (an empty GNUPGHOME: no other trusted keys)."""
    if shutil.which("gpgv") is None:
        raise ImageError("--keyring needs gpgv, which is not installed (apt install gpgv)")
    if not os.path.isfile(keyring):
        raise ImageError(f"--keyring {keyring}: no such file")
    with tempfile.TemporaryDirectory(prefix="popsicle-py-gpgv-") as home:
        sums, sig = os.path.join(home, "sums"), os.path.join(home, "sums.sig")
        with open(sums, "wb") as f:
            f.write(data)
        with open(sig, "wb") as f:
            f.write(signature)
        try:
            proc = subprocess.run(["gpgv", "--keyring", os.path.abspath(keyring), sig, sums],
                                  capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "GNUPGHOME": home}, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageError(f"gpgv could not check {name}: {exc}") from None
    if proc.returncode != 0:
        lines = [ln.removeprefix("gpgv: ") for ln in proc.stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"gpgv exited with {proc.returncode}"
        raise ImageError(f"the signature of {name} does not verify with {keyring}: {why}")


def check_signature(source: str, read: Callable[[str], bytes | None], keyring: str) -> str:
    """Verify the detached signature next to ``source``; returns the signature's name."""
    data = read(source)
    if data is None:
        raise ImageError(f"checksum file {source} cannot be read again to check its signature")
    for suffix in SIGNATURE_SUFFIXES:
        signature = read(source + suffix)
        if signature is not None:
            _signature_check(source, data, signature, keyring)
            return source + suffix
    raise ImageError(f"--keyring: no signature next to {source} (looked for "
                     f"{', '.join(SIGNATURE_SUFFIXES)}): not trusting it")


def read_local(path: str) -> bytes | None:
    """A local sums or signature file's bytes, None when absent (for :func:`check_signature`)."""
    try:
        with open(path, "rb") as f:
            return f.read(_SIDECAR_LIMIT)
    except OSError:
        return None


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
        return None if data is None else data.decode("utf-8", errors="replace")

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
        urllib.parse.urlsplit(url).port  # noqa: B018 - raises for a malformed host or port
    except ValueError as exc:
        raise RemoteError(f"{url}: not a valid URL ({exc})") from None
    client = Client(settings)
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
            if entry is not None:
                first.close()
                notes.append(f"using the cached download of {url} ({entry.path})")
                return UrlImage(open_image(str(entry.path)), expected, notes)
        image = RemoteImage(client, first, expected, cache if key is not None else None)
    except BaseException:
        first.close()
        raise
    if expected is not None:
        notes.append(f"checksum: {expected.algo} from {expected.source}, checked while "
                     "downloading")
    return UrlImage(image, None, notes)


def attach(image: Any, emit: Emit | None, cancel: Callable[[], bool] | None = None) -> None:
    """Send a RemoteImage's download events to the view (no-op for local images)."""
    if isinstance(image, RemoteImage):
        image.attach(emit, cancel)


def materialize(image: RemoteImage, emit: Emit, cancel: Callable[[], bool],
                tmpdir: str) -> tuple[Image | None, Callable[[], None]]:
    """Download the whole image to a file (the cache, else a private one) and open that.

    For watch (every drive served from one download) and for zip files (whose directory is at
    the end).  Returns (None, cleanup) when cancelled.  The checksum is checked in the same
    pass; ImageError when the download fails.  ``cleanup`` removes a private copy.
    """
    sink: CacheWriter | _FileSink | None = None
    private: _FileSink | None = None
    if image.cache is None:
        try:
            private = _FileSink(tmpdir)
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

    buf = bytearray(_CHUNK)
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
        emit(Note(f"downloaded {image.url} once to {path}; every drive is written from it"))
    local = open_image(path)
    return local, cleanup
