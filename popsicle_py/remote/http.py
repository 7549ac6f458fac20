"""The HTTP client of remote images: urllib3 (2.x), and the pure decisions over its answers.

urllib3 gives pooled connections, redirects, timeouts and TLS verification against the system's
certificates by default, pure Python.  This module is the only one that speaks to it directly
(Download reads the responses it hands out): each transport failure becomes a RemoteError whose
one line a person can act on, and the first answer for a URL is probed here, so that error pages
and HTML are refused before anything is written.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    HTTPError,
    LocationValueError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.response import HTTPResponse
from urllib3.util import Retry, Timeout

from popsicle_py._version import __version__
from popsicle_py.images import ImageError, detect
from popsicle_py.records import record
from popsicle_py.remote.coding import coding, decoded_small, encoded, the_files_own
from popsicle_py.remote.headers import (
    Validator,
    content_length,
    looks_like_html,
    parse_content_range,
    status_message,
)
from popsicle_py.signatures import SIDECAR_LIMIT

__all__ = [
    "Client",
    "HttpSettings",
    "Probe",
    "RemoteError",
    "Validator",
    "content_length",
    "failure_reason",
    "final_url",
    "hang_up",
    "is_url",
    "limit_wait",
    "looks_like_html",
    "parse_content_range",
    "probe",
    "status_message",
    "transport_message",
    "without_credentials",
]

_HEAD = 4096  # bytes read before deciding what the body is
_MiB = 1 << 20

log = logging.getLogger(__name__)


class RemoteError(ImageError):
    """A download that cannot go on, as one line (an ImageError: the CLI refuses with it)."""


def without_credentials(url: str) -> tuple[str, str | None]:
    """The URL without its ``user:password@`` part (never shown: messages, events and the
    cache name the URL), and that part as an Authorization header's value (Basic).

    urllib3 ignores credentials in a URL: they are sent as a header instead, to that host only.
    """
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    clean = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return clean, "Basic " + base64.b64encode(token.encode()).decode("ascii")


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme.lower(), parts.hostname, port or (443 if parts.scheme == "https" else 80)


def is_url(text: str) -> bool:
    """True for http:// and https:// addresses (what flash and watch download)."""
    return text[:8].lower().startswith(("http://", "https://"))


@record
class HttpSettings:
    """Timeouts and retries; the environment can shorten them (tests, slow links)."""

    connect_timeout: float = 15.0
    read_timeout: float = 30.0  # no byte for this long: the connection is stalled, resume
    retries: int = 5  # consecutive failed attempts without progress before giving up
    backoff: float = 0.5  # first pause between attempts, doubled each time (at most 8 s)
    max_redirects: int = 10
    #: A download gives up after ``retries`` failed resumes in a row only once they have
    #: lasted this long: a router restart or a Wi-Fi roam of a minute or two is waited out.
    outage: float = 120.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HttpSettings:
        """POPSICLE_PY_HTTP_TIMEOUT, _RETRIES, _BACKOFF and _OUTAGE override the defaults."""
        env = os.environ if env is None else env
        base = cls()
        try:
            return cls(
                connect_timeout=float(env.get("POPSICLE_PY_HTTP_TIMEOUT", base.connect_timeout)),
                read_timeout=float(env.get("POPSICLE_PY_HTTP_TIMEOUT", base.read_timeout)),
                retries=int(env.get("POPSICLE_PY_HTTP_RETRIES", base.retries)),
                backoff=float(env.get("POPSICLE_PY_HTTP_BACKOFF", base.backoff)),
                outage=float(env.get("POPSICLE_PY_HTTP_OUTAGE", base.outage)),
            )
        except ValueError:
            raise ImageError("POPSICLE_PY_HTTP_TIMEOUT, _RETRIES, _BACKOFF and _OUTAGE must "
                             "be numbers") from None

    def pause(self, attempt: int) -> float:
        return float(min(8.0, self.backoff * 2 ** (attempt - 1)))


# ----------------------------------------------------------------------------------------------
# Transport errors, each as one line


_VERIFY_FAILED = re.compile(r"certificate verify failed: ([^(]*?)\s*(?:\(|$)")


class _SaidRetry(Retry):
    """urllib3's retries, each failed attempt said on stderr: a host that drops connections
    takes minutes to give up (every attempt waits out the connect timeout), and silence all
    that time looks like a hang."""

    attempts = 1  # in all, the first one included
    shown = ""  # the URL asked for, as messages name it

    def new(self, **kw: Any) -> _SaidRetry:
        made = super().new(**kw)
        made.attempts, made.shown = self.attempts, self.shown
        return made

    def get_retry_after(self, response: Any) -> float | None:
        """A Retry-After of at most 8 s (the longest pause between attempts): a server that
        says "in an hour" would hold the command that long, silent, on every attempt."""
        wanted = super().get_retry_after(response)
        return None if wanted is None else min(wanted, 8.0)

    def increment(self, method: str | None = None, url: str | None = None,
                  response: Any = None, error: Exception | None = None, _pool: Any = None,
                  _stacktrace: Any = None) -> _SaidRetry:
        made = super().increment(method, url, response, error, _pool, _stacktrace)
        failed = len(made.history)
        answered = response is not None and response.status in (self.status_forcelist or ())
        if failed < self.attempts and (error is not None or answered):
            why = (transport_message(self.shown, error) if error is not None
                   else f"{self.shown}: the server answered {response.status}")
            log.warning("%s; trying again (attempt %d of %d)", why, failed + 1, self.attempts)
        return made


def transport_message(url: str, exc: BaseException) -> str:
    """One line for a connection that could not be made or went wrong (no traceback text)."""
    reason = exc.reason if isinstance(exc, MaxRetryError) else exc
    host = urllib.parse.urlsplit(url).hostname or url
    text = str(reason)
    if isinstance(exc, MaxRetryError) and "too many redirects" in text.lower():
        return f"{url}: too many redirects (a redirect loop?)"
    if isinstance(reason, SSLError) or "SSL" in text:
        if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text.lower():
            return (f"{url}: {host} does not answer with TLS on that port (an http:// "
                    "server? try http://); nothing was downloaded")
        m = _VERIFY_FAILED.search(text)
        if m:
            return (f"{url}: TLS certificate of {host} is not trusted ({m[1]}); "
                    "nothing was downloaded")
        return f"{url}: TLS error with {host}: {_short(text)}"
    if isinstance(reason, NewConnectionError):
        # "HTTPConnection(host='::1%lo', port=80): Failed to ...": the host may hold colons
        m = re.match(r"\w+\(host=.*?, port=\d+\): (.*)", text, re.S)
        cause = (m[1] if m else text.rsplit(":", 1)[-1]).strip() or "refused"
        cause = cause.removeprefix("Failed to establish a new connection: ")
        return f"{url}: cannot connect to {host}: {cause}"
    if isinstance(reason, ReadTimeoutError) or "timed out" in text.lower():
        return f"{url}: {host} did not answer in time"
    if isinstance(reason, LocationValueError):  # the URL itself was checked: a redirect's
        if not urllib.parse.urlsplit(url).hostname:
            return f"{url}: not a valid URL (no host)"
        return (f"{url}: redirected to an address that is not an http:// or https:// URL; "
                "nothing was downloaded")
    if isinstance(reason, ProtocolError):
        return f"{url}: {failure_reason(reason)}"
    return f"{url}: {_short(text)}"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


# ----------------------------------------------------------------------------------------------
# The client


def _headers_in_time(conn: HTTPConnection, get: Callable[[], HTTPResponse]) -> HTTPResponse:
    """``get()`` (the status line and headers) within the connection's read timeout, all of
    them: a server that trickles them keeps every read timeout alive, and would hold the run
    for as long as it likes.  Past it the socket is shut down, and the attempt is a timeout
    (retried as one)."""
    seconds, sock = conn.timeout, conn.sock
    if not isinstance(seconds, (int, float)) or seconds <= 0 or sock is None:
        return get()
    lock = threading.Lock()
    state = {"done": False, "fired": False}

    def fire() -> None:
        with lock:
            if state["done"]:
                return
            state["fired"] = True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        response = get()
    except BaseException:
        if state["fired"]:
            raise TimeoutError(f"no complete answer in {seconds:g} s") from None
        raise
    finally:
        with lock:
            state["done"] = True
        timer.cancel()
    if state["fired"]:  # cut in its headers: what came looks like an answer, and is none
        response.close()
        raise TimeoutError(f"no complete answer in {seconds:g} s")
    return response


class _Connection(HTTPConnection):
    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        return _headers_in_time(self, super().getresponse)


class _TLSConnection(HTTPSConnection):
    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        return _headers_in_time(self, super().getresponse)


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class Client:
    """One connection pool for a run: the probe, the body, its resumes and the sums files."""

    def __init__(self, settings: HttpSettings | None = None,
                 credentials: tuple[str, str] | None = None) -> None:
        """``credentials``: (a URL, its Authorization value), sent to that URL's origin only
        (urllib3 drops the header on a redirect to another host)."""
        self.settings = settings or HttpSettings.from_env()
        self._auth = None if credentials is None else (_origin(credentials[0]), credentials[1])
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
        self.pool.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}

    def sends_credentials_to(self, url: str) -> bool:
        """Whether the URL's user and password go to ``url`` (its origin, as curl does)."""
        return self._auth is not None and _origin(url) == self._auth[0]

    def get(self, url: str, headers: Mapping[str, str] | None = None, redirects: bool = True,
            retries: bool = True, wait: float | None = None) -> urllib3.BaseHTTPResponse:
        """GET with redirects and retries of the connection; transport errors as RemoteError.

        ``retries=False``: one attempt, for a caller that counts its own (a download's
        resumes: each is one of POPSICLE_PY_HTTP_RETRIES, not that many again).  ``wait``:
        the most seconds to wait for the connection and the answer, if less than set."""
        s = self.settings
        most = float("inf") if wait is None else wait
        limit = Timeout(connect=min(s.connect_timeout, most), read=min(s.read_timeout, most))
        n = s.retries if retries else 0
        retry = _SaidRetry(total=None, connect=n, read=n, status=n,
                           redirect=s.max_redirects if redirects else 0, other=0,
                           status_forcelist=(429, 500, 502, 503, 504), backoff_factor=s.backoff,
                           backoff_max=8.0, raise_on_status=False, raise_on_redirect=True)
        retry.attempts, retry.shown = n + 1, url
        sent = dict(headers or {})
        if self._auth is not None and _origin(url) == self._auth[0]:
            sent["Authorization"] = self._auth[1]
        try:
            return self.pool.request("GET", url, headers=sent, retries=retry, timeout=limit,
                                     preload_content=False, decode_content=False)
        except (HTTPError, OSError) as exc:
            raise RemoteError(transport_message(url, exc)) from None

    def fetch_small(self, url: str) -> bytes | None:
        """A sums or signature file; None when it is not there (404, 410, or an HTML page)."""
        resp = self.get(url)
        read = False  # the body came in time (a trickling connection is never reused)
        try:
            if resp.status in (403, 404, 410):
                left = resp.length_remaining
                if left is not None and left <= 64 << 10:  # its page read in time: reused
                    with contextlib.suppress(RemoteError, HTTPError, OSError):
                        self._read_small(resp, url)
                        read = True
                return None
            if resp.status != 200:
                raise RemoteError(f"checksum file {status_message(url, resp.status, resp.reason)}")
            data = self._read_small(resp, url)
            read = True
            data = decoded_small(data, resp.headers, url)
            if len(data) > SIDECAR_LIMIT:
                raise RemoteError(f"checksum file {url} is larger than 16 MiB: not a checksum "
                                  "file")
            if looks_like_html(data[:_HEAD], resp.headers.get("Content-Type")):
                return None  # a "soft 404" page
            return data
        except (HTTPError, OSError) as exc:
            raise RemoteError(transport_message(url, exc)) from None
        finally:
            left = resp.length_remaining
            if read and left is not None and left <= 64 << 10:  # read the little left: reuse
                resp.drain_conn()
                resp.release_conn()
            else:
                resp.close()  # never hand back a connection in the middle of a body

    def _read_small(self, resp: urllib3.BaseHTTPResponse, url: str) -> bytes:
        """The body (SIDECAR_LIMIT + 1 bytes at most), each MiB of it within the read timeout:
        a server that trickles keeps every read timeout alive, and would hold the run for as
        long as it likes before anything is written."""
        window = self.settings.read_timeout
        deadline = time.monotonic() + window
        data = bytearray()
        mark = _MiB
        while len(data) <= SIDECAR_LIMIT:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteError(f"checksum file {url}: stalled: less than 1 MiB came in "
                                  f"{window:g} s; nothing was written")
            limit_wait(resp, left)
            try:
                more = resp.read1(min(SIDECAR_LIMIT + 1 - len(data), 64 << 10))
            except ReadTimeoutError:
                if time.monotonic() < deadline - 0.05:
                    raise
                continue  # the deadline said above
            if not more:
                break
            data += more
            if len(data) >= mark:  # a MiB moved: the next one gets a window of its own
                mark += _MiB
                deadline = time.monotonic() + window
        return bytes(data)


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
    coding: str | None = None  # its Content-Encoding (see .coding): every resume's must match

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None


def final_url(url: str, resp: urllib3.BaseHTTPResponse) -> str:
    """Where the redirects ended (resume requests go there, to the same mirror), without a
    user and password a Location gave (urllib3 never sends them; messages name this URL)."""
    retries = getattr(resp, "retries", None)
    for step in getattr(retries, "history", ()) or ():
        if step.redirect_location:
            url = urllib.parse.urljoin(url, step.redirect_location)
    return without_credentials(url)[0]


def probe(client: Client, url: str) -> Probe:
    """GET the URL and read its first bytes; refuse errors and HTML pages before anything."""
    resp = client.get(url)
    if resp.status != 200:
        resp.close()
        said = status_message(url, resp.status, resp.reason)
        final = final_url(url, resp)
        if resp.status == 401 and client.sends_credentials_to(url) \
                and not client.sends_credentials_to(final):
            said += (f" at {final}, where it was redirected: the URL's user and password go to "
                     "its own scheme, host and port only; give that URL")
        raise RemoteError(said)
    final = final_url(url, resp)
    try:
        head = _first_bytes(resp, client.settings.read_timeout)
    except (HTTPError, OSError) as exc:
        resp.close()
        raise RemoteError(transport_message(url, exc)) from None
    if head is None:
        resp.close()
        raise RemoteError(f"{url}: the server sent less than {_HEAD} bytes in "
                          f"{client.settings.read_timeout:g} s (stalled); nothing was written")
    result = Probe(url, final, resp, head, content_length(resp.headers),
                   Validator.of(resp.headers), resp.headers.get("Content-Type"),
                   coding(resp.headers))
    if not head:
        result.close()
        raise RemoteError(f"{url} is empty (the server sent no bytes)")
    value = coding(resp.headers)
    if value is not None and not the_files_own(value, detect(head).name, (url, final)):
        result.close()
        raise RemoteError(f"{encoded(url, value)} (a misconfigured server or proxy); "
                          "nothing was written")
    if not detect(head).decoded and looks_like_html(head, result.content_type):
        result.close()
        raise RemoteError(f"{url} is an HTML page, not a disk image (an error or download "
                          "page? use the direct link to the image)")
    return result


def limit_wait(resp: urllib3.BaseHTTPResponse, seconds: float) -> None:
    """The longest the next read of ``resp`` may wait for a byte: urllib3 sets its read
    timeout once per request, and a download's stall window may end sooner than that."""
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(max(0.01, seconds))


def hang_up(resp: urllib3.BaseHTTPResponse) -> None:
    """Shut ``resp``'s connection down, from any thread: a read blocked on it (a silent
    server) returns at once, where closing the response would wait for that read's lock
    until the read timeout."""
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _first_bytes(resp: urllib3.BaseHTTPResponse, seconds: float) -> bytes | None:
    """The body's first _HEAD bytes (fewer when it is shorter), or None when they do not come
    in ``seconds``: a trickle resets every read timeout, and would hold the probe for hours."""
    head = b""
    deadline = time.monotonic() + seconds
    while len(head) < _HEAD:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        limit_wait(resp, min(seconds, left))
        try:
            more = resp.read1(_HEAD - len(head))
        except ReadTimeoutError:
            if time.monotonic() >= deadline - 0.05:  # the deadline's bound on the wait
                return None
            raise
        except (HTTPError, OSError):
            if head:  # cut after some bytes: kept, the download resumes from there
                break
            raise
        if not more:
            break
        head += more
    limit_wait(resp, seconds)  # the read timeout again, for what reads on
    return head


def failure_reason(exc: BaseException) -> str:
    """Why a read of the body failed, in a note's words (a stall is called one)."""
    if isinstance(exc, ReadTimeoutError) or "timed out" in str(exc).lower():
        return "no data for too long (stalled)"
    if isinstance(exc, ProtocolError):
        inner = exc.args[1] if len(exc.args) > 1 else exc
        if isinstance(inner, http.client.IncompleteRead):
            return "the connection closed before the body ended"
        if isinstance(inner, http.client.HTTPException):  # headers too long or too many
            return f"the server's answer is malformed: {_short(str(inner))}"
        if isinstance(inner, OSError) and inner.strerror:
            return f"connection broken: {inner.strerror}"
        return f"connection broken: {_short(str(inner))}"
    return _short(str(exc)) or type(exc).__name__

