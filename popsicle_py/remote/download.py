"""The body of one URL as a stream: resumed after drops and stalls, hashed, kept in a sink.

:class:`Download` continues after a dropped or stalled connection with a Range request from the
byte reached, guarded by If-Range, and takes the answer only when it carries the first one's
ETag (or Last-Modified), so that a file changed on the server is never stitched together from
two versions.  A connection that moves less than STALL_BYTES in the stall timeout (a trickle,
which no read timeout sees) is stalled: dropped and resumed, a failed attempt.  The bytes are
hashed as they are handed out, and the stream itself refuses to end (raises) when the published
checksum does not match: the engine holds the image's first bucket back until the stream ended,
so a bad download never leaves a bootable-looking drive.  The same bytes go to a sink (a cache
entry, or a private file) that is committed only at that end.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from urllib3.exceptions import HTTPError

from popsicle_py import files
from popsicle_py.cache import CacheWriter
from popsicle_py.defaults import DEFAULT_STALL_TIMEOUT
from popsicle_py.events import Download as DownloadNews
from popsicle_py.events import Event, Fetch, Note, Phase, Progress, Step
from popsicle_py.images import Checksum, ImageError, new_hasher
from popsicle_py.images.checksums import Hasher
from popsicle_py.pacing import STALL_BYTES
from popsicle_py.remote.coding import coding
from popsicle_py.remote.http import (
    Client,
    Probe,
    RemoteError,
    Validator,
    content_length,
    failure_reason,
    hang_up,
    limit_wait,
    parse_content_range,
)

__all__ = ["CHUNK", "DOWNLOADING", "Download", "Emit", "FileSink"]

#: The phase of the image-level Phase/Progress events while the body arrives.
DOWNLOADING = Step.DOWNLOADING

CHUNK = 1 << 20  # most bytes per read from the connection: progress and stalls stay fine-grained
_PROGRESS_INTERVAL = 0.2

Emit = Callable[[Event], None]


class Download(io.RawIOBase):
    """The body of one URL, continued after drops and stalls; hashes and keeps what it yields.

    It judges its own connection (a read timeout; less than STALL_BYTES in ``stall_timeout``
    seconds of reading; then resumes, then an error), so a reader of it applies no stall rule
    of its own (``judges_its_stalls``) and hands it its stall timeout (``judge_stalls``).
    Only the time spent waiting in its reads counts: a reader that stops reading (its drives
    are behind) never makes the server look stalled.

    ``hasher`` sees every byte handed out; with ``expected`` set, the end of the body is
    reported only after the digest matched (a mismatch raises RemoteError instead).  ``sink``
    (a cache entry or a private file) receives the same bytes and is committed at that end.
    A sink that cannot take them (its disk full) ends the download when it is ``required``
    (the only copy, for watch and zip images), else it is dropped with a note.
    """

    def __init__(self, client: Client, probe_: Probe, *, expected: Checksum | None = None,
                 sink: CacheWriter | FileSink | None = None, emit: Emit | None = None,
                 cancel: Callable[[], bool] | None = None, required: bool = False,
                 stall_timeout: float | None = DEFAULT_STALL_TIMEOUT) -> None:
        super().__init__()
        self.client = client
        self.url = probe_.url
        self.final_url = probe_.final_url
        self.validator = probe_.validator
        self.total = probe_.total
        self.coding = probe_.coding
        self.expected = expected
        # No cost unless a checksum is expected.
        self.hasher: Hasher | None = new_hasher(expected) if expected else None
        self.sink = sink
        #: The SHA-256 a cache entry records of its bytes (the checksum's hasher when it is one).
        self._kept: Hasher | None = None
        if isinstance(sink, CacheWriter) and (expected is None or expected.algo != "sha256"):
            import hashlib

            self._kept = hashlib.sha256()
        self.required = required
        self.emit = emit
        self.cancel = cancel
        self.resumes = 0
        self._resp = probe_.response
        probe_.response = None  # ours now
        self._pending = probe_.head
        self._net = len(probe_.head)  # offset of the next byte from the connection
        #: After a start over: the bytes first sent and judged (not a disk image? HTML?),
        #: which the new body must repeat (see _same_start).
        self._judged = b""
        self._handed = 0
        self._failures = 0
        self._failing_since = 0.0  # monotonic time of the first failure in a row
        self.stall_timeout = stall_timeout
        self._recent = 0  # bytes from this connection since it last moved STALL_BYTES
        self._waited = 0.0  # seconds spent waiting in its reads meanwhile
        self._vouched = False  # a resume without validators was taken (a checksum judges)
        self._finished = False
        self._closing = False  # close() began, maybe on another thread: a stop, no failure
        self._error: ImageError | None = None
        self._last_progress = 0.0
        self._reported = 0  # the bytes the last Progress event said
        self.committed: str | None = None
        self.on_commit: Callable[[str], None] | None = None

    #: The engine's reader leaves the stall rule to this stream's own timeouts and resumes.
    judges_its_stalls = True

    def judge_stalls(self, limit: float | None) -> None:
        """The run's stall timeout (the engine's reader hands it over)."""
        self.stall_timeout = limit

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
            data = self._next(min(len(out), CHUNK))
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
            if self._kept is not None:
                self._kept.update(data)
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
        stopped = self._closing or (self.cancel is not None and self.cancel())
        if self.emit is not None and not stopped:
            self.emit(DownloadNews(Fetch.FAILED, self._handed, self.total, str(exc)))
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
            self._check_stop()
            if self._resp is None:
                self._reconnect()
                continue
            if self._handed != self._reported:  # the view learns what came before a wait
                self._progress(force=True)
            try:
                data = self._read(self._resp, limit)
            except (HTTPError, OSError, http.client.HTTPException) as exc:
                self._retry(self._crawled() or failure_reason(exc))
                continue
            if data:
                if self._net < len(self._judged):
                    self._same_start(data)
                self._net += len(data)
                self._recent += len(data)
                if self._recent >= STALL_BYTES:  # progress: the window and the count restart
                    self._recent, self._waited, self._failures = 0, 0.0, 0
                return data
            if self.total is not None and self._net < self.total:
                self._retry(f"the connection closed at byte {self._net}")
                continue
            return b""

    def _read(self, resp: Any, limit: int) -> bytes:
        """What the connection has (at most ``limit``), waiting no longer than the stall
        window's rest; a window spent with less than STALL_BYTES raises (a stall)."""
        if self.stall_timeout is not None:
            if self._crawled():
                raise http.client.HTTPException("stalled")
            limit_wait(resp, min(self.client.settings.read_timeout,
                                 self.stall_timeout - self._waited))
        started = time.monotonic()
        try:
            return resp.read1(limit)  # type: ignore[no-any-return]
        finally:
            self._waited += time.monotonic() - started

    def _crawled(self) -> str | None:
        """Why this connection is stalled by the stall rule, if it is."""
        if self.stall_timeout is None or self._waited < self.stall_timeout:
            return None
        return f"stalled: less than {STALL_BYTES >> 20} MiB came in {self.stall_timeout:g} s"

    def _check_stop(self) -> None:
        if self._closing or (self.cancel is not None and self.cancel()):
            raise RemoteError(f"{self.url}: download cancelled")

    def _retry(self, why: str) -> None:
        """One more failed attempt: pause, or give up with what happened."""
        self._drop()
        self._check_stop()  # a connection shut down by a stop is no drop to resume
        self._recent, self._waited = 0, 0.0  # the next connection gets a window of its own
        self._failures += 1
        now = time.monotonic()
        if self._failures == 1:
            self._failing_since = now
        if (self._failures > self.client.settings.retries
                and now - self._failing_since >= self.client.settings.outage):
            of = f" of {self.total}" if self.total is not None else ""
            raise RemoteError(f"{self.url}: download failed at byte {self._net}{of} after "
                              f"{self._failures} attempts: {why}")
        if self.emit is not None:
            self.emit(Note(f"download interrupted at byte {self._net} ({why}); resuming"))
            self.emit(DownloadNews(Fetch.RESUMING, self._net, self.total, why))
        deadline = now + self.client.settings.pause(self._failures)
        while time.monotonic() < deadline:
            self._check_stop()
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _reconnect(self) -> None:
        """Ask for the rest; take the answer only if it is the same file from the same byte.

        A server that gives neither a strong ETag nor Last-Modified cannot show that the file
        changed: its download starts over while nothing was used, and is resumed afterwards
        only when a checksum will judge the result.
        """
        blind = not self.validator.strong and self.expected is None
        if blind and self._handed:
            which = ("only a weak ETag (W/: the same meaning, not the same bytes) and no "
                     "Last-Modified" if self.validator.etag else "no ETag or Last-Modified")
            raise RemoteError(f"{self.url}: the connection was lost at byte {self._net} and "
                              f"the server gives {which}, so a resumed "
                              "download could mix two versions of the file; run again, or "
                              "give its checksum (--sha256) to allow resuming")
        headers = {} if blind else {"Range": f"bytes={self._net}-"}
        if self.validator.if_range:
            headers["If-Range"] = self.validator.if_range
        try:  # one attempt: this loop counts them (_retry); no answer in time is a stall
            resp = self.client.get(self.final_url, headers, retries=False,
                                   wait=self.stall_timeout)
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
        if resp.status in (200, 206) and not blind and not self.validator.same_bytes(now):
            self._unconfirmed(resp)  # (a blind start over is judged by its first bytes)
        if resp.status in (200, 206) and coding(resp.headers) != self.coding:
            resp.close()  # other bytes than the file's (a proxy that compresses some answers)
            raise RemoteError(f"{self.url}: the server answered the resume at byte {self._net} "
                              f"with Content-Encoding {coding(resp.headers) or 'none'}, the "
                              f"download with {self.coding or 'none'}; not stitching other "
                              "bytes in: run again")
        if resp.status == 206:
            span = parse_content_range(resp.headers.get("Content-Range"))
            if span is None or span[0] != self._net or (
                    self.total is not None and span[2] not in (None, self.total)):
                resp.close()
                raise RemoteError(f"{self.url}: the server resumed at the wrong place "
                                  f"(asked for byte {self._net}, got "
                                  f"{resp.headers.get('Content-Range')!r})")
            if self.total is None:  # the file's length, known at last: the end is checked
                self.total = span[2]
            self._resp = resp
            return
        if resp.status == 200:
            if self._handed == 0:  # nothing used yet: starting over is harmless
                self._judged = self._judged or self._pending
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

    def _same_start(self, data: bytes) -> None:
        """A body started over must begin with the bytes first sent: those were judged
        before any drive was opened (an HTML page, not a disk image?), and a server that
        now sends others (a login page of a captive portal, another version of a file
        without validators) would have them written unjudged."""
        at = self._net
        first = self._judged[at : at + len(data)]
        if data[: len(first)] != first:
            differ = at + next(i for i, (a, b) in enumerate(zip(data, first, strict=False))
                                 if a != b)
            raise RemoteError(f"{self.url}: the connection was lost before anything was "
                              "written and the server started the file over with other "
                              f"bytes than it first sent (they differ at byte {differ}); "
                              "not writing what was not checked: run again")
        if at + len(data) >= len(self._judged):
            self._judged = b""  # all of it seen again

    def _unconfirmed(self, resp: Any) -> None:
        """An answer without the first one's validator cannot show it is the same file: not
        taken, unless the checksum will judge the whole download (then said once)."""
        if not self.validator.strong:
            why = (f"the server gives only a weak ETag (W/: the same meaning, not the same "
                   f"bytes), so nothing shows the rest from byte {self._net} is of the same "
                   "version")
        else:
            which = "ETag" if self.validator.etag else "Last-Modified"
            why = (f"the server answered the resume at byte {self._net} without the file's "
                   f"{which}, so nothing shows the rest is of the same version")
        if self.expected is None:
            resp.close()
            raise RemoteError(f"{self.url}: {why}; not stitching two versions together: run "
                              "again, or give its checksum (--sha256) to allow it")
        if not self._vouched and self.emit is not None:
            self.emit(Note(f"{self.url}: {why}; resuming anyway: the checksum "
                           f"({self.expected.algo} from {self.expected.source}) judges the "
                           "whole download"))
        self._vouched = True

    def _finish(self) -> None:
        """The body ended: check its length, that nothing follows it, and the checksum."""
        if self.total is not None and self._handed != self.total:
            raise RemoteError(f"{self.url}: the server announced {self.total} bytes "
                              f"(Content-Length) but sent {self._handed}")
        self._drop()
        if not self._nothing_follows() and self.total is None and self.expected is None \
                and self.emit is not None:
            self.emit(Note(f"{self.url}: the server gave no length and no checksum was found: "
                           "nothing shows that the download is complete"))
        if self.expected is not None and self.hasher is not None:
            actual = self.hasher.hexdigest()
            if actual != self.expected.hexdigest:
                raise RemoteError(
                    f"checksum mismatch for {self.url}: expected {self.expected.algo} "
                    f"{self.expected.hexdigest} (from {self.expected.source}), got {actual}")
        self._finished = True
        self._progress(force=True)
        if self.emit is not None:
            self.emit(DownloadNews(Fetch.COMPLETE, self._handed, self.total,
                                   checked=self.expected is not None))
        if self.sink is not None:
            sink, self.sink = self.sink, None
            kept = self._kept if self._kept is not None else self.hasher
            try:
                self.committed = str(sink.commit(None if kept is None else kept.hexdigest()))
            except OSError as exc:  # its disk filled up at the last flush, or its metadata
                sink.abort()
                self._sink_failed(sink.where, exc)
                return
            if self.on_commit is not None:
                self.on_commit(self.committed)

    def _nothing_follows(self) -> bool:
        """Ask for what follows the body's end: a Content-Length shorter than the file, or a
        body without one whose connection closed early, is a truncated image (raises).  True
        when the answer shows the body was the whole file."""
        end = self._net
        headers = {"Range": f"bytes={end}-"}
        if self.validator.if_range:
            headers["If-Range"] = self.validator.if_range
        try:  # within the stall timeout too: the body is all there, nothing more to wait for
            resp = self.client.get(self.final_url, headers, retries=False,
                                   wait=self.stall_timeout)
        except RemoteError:
            return False  # no answer is no evidence; the body itself was complete
        if self.validator.contradicts(Validator.of(resp.headers)):
            resp.close()  # another version now: its length says nothing of the one read
            if self.total is not None or self.expected is not None:
                return False  # the announced length (checked) or the checksum judges
            raise RemoteError(f"{self.url} changed on the server as its download ended (the "
                              "server's ETag/Last-Modified differ) and nothing shows the body "
                              "was the whole file (no length, no checksum); run again")
        try:
            length = content_length(resp.headers)
            # An empty 206 (some servers answer a Range past the end so) says nothing follows.
            extra = (resp.status == 206 and length != 0) or (
                resp.status == 200 and length not in (None, end))
            shown = resp.status == 416 or (resp.status == 206 and length == 0) or (
                resp.status == 200 and length == end)
            whole = _complete_length(resp.headers.get("Content-Range"))
            if resp.status in (206, 416) and whole is not None:  # the file's length, said
                extra, shown = whole > end, whole == end  # (a 206 of other bytes than asked)
        finally:
            resp.close()
        if resp.status in (206, 416) and whole is not None and whole < end:
            raise RemoteError(f"{self.url}: the server sent {end} bytes but says the file is "
                              f"{whole} bytes long; refusing a damaged image")
        if extra and self.total is not None:
            raise RemoteError(f"{self.url}: the server announced {self.total} bytes "
                              "(Content-Length) but the file is longer; refusing a truncated "
                              "image")
        if extra:
            raise RemoteError(f"{self.url}: the connection closed at byte {end} but the file "
                              "is longer (the server gave no length); refusing a truncated "
                              "image")
        return shown

    def _progress(self, force: bool = False) -> None:
        if self.emit is None:
            return
        now = time.monotonic()
        if force or now - self._last_progress >= _PROGRESS_INTERVAL:
            self._last_progress = now
            self._reported = self._handed
            self.emit(Progress(None, DOWNLOADING, self._handed, self.total))

    def _drop(self) -> None:
        if self._resp is not None:
            with contextlib.suppress(Exception):
                self._resp.close()
            self._resp = None

    def verify(self) -> None:
        """Read what is left and check the checksum (for an engine that stops early)."""
        while self.readinto(bytearray(CHUNK)):
            pass

    def close(self) -> None:
        """Also from another thread (a stop) while a read waits on a silent connection: the
        connection is shut down first, so that the read returns and releases it at once."""
        if not self.closed:
            self._closing = True
            resp = self._resp
            if resp is not None:
                hang_up(resp)
            self._drop()
            if self.sink is not None:
                self.sink.abort()
                self.sink = None
        super().close()


def _complete_length(content_range: str | None) -> int | None:
    """The file's length a Content-Range gives ("bytes 0-9/10", "bytes */10"), if any."""
    m = re.fullmatch(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", (content_range or "").strip(), re.I)
    return int(m[1]) if m else None


class FileSink:
    """A private copy of the download (watch without --cache, zip images)."""

    def __init__(self, directory: str) -> None:
        self.where = directory
        self.dir = tempfile.mkdtemp(prefix="popsicle-py-download-", dir=directory)
        self.path = os.path.join(self.dir, "image")
        self._file = files.create_regular(self.path, exclusive=True)  # see commit(), abort()

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)

    def commit(self, sha256: str | None = None) -> str:
        self._file.close()
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
