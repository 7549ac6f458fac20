"""Pure decisions over an HTTP answer's headers: which version of the file it is (ETag,
Last-Modified), where a 206 starts, how long the body is, whether it is an error page, and
the words for a status a download cannot use.  No I/O: :mod:`.http` speaks to the server."""

from __future__ import annotations

import re
from collections.abc import Mapping

from popsicle_py.records import record

__all__ = ["Validator", "content_length", "looks_like_html", "parse_content_range",
           "status_message"]


@record
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

    @property
    def strong(self) -> bool:
        """True when a later answer can show it carries this version's very bytes: a strong
        ETag, or a Last-Modified date.  A weak ETag (``W/``) promises only the same meaning
        (RFC 9110 8.8.1: a body compressed again, a page rendered again), so a resume must
        not stitch on it, and If-Range cannot carry it."""
        return bool(self.etag and not self.etag.startswith("W/")) or bool(self.last_modified)

    def same_bytes(self, other: Validator) -> bool:
        """True when ``other`` shows, by a strong validator, that it is this version byte for
        byte: what stitching a resumed body onto the first needs (a weak ETag shows only the
        same meaning; Last-Modified stands in when that is all there is)."""
        if self.etag and not self.etag.startswith("W/"):
            return other.etag == self.etag
        if self.last_modified:
            return other.last_modified == self.last_modified
        return not self.etag  # no validator at all: Download resumes only under a checksum

    def confirms(self, other: Validator) -> bool:
        """True when ``other`` (a later response's) shows it is this version: the same ETag,
        or the same Last-Modified when that is all this one had.  An answer without them
        cannot show it, whatever its bytes are (a mirror that ignores If-Range)."""
        if self.etag:
            return other.etag is not None and (
                self.etag.removeprefix("W/") == other.etag.removeprefix("W/"))
        if self.last_modified:
            return other.last_modified == self.last_modified
        return True  # nothing to show (see Download: resumed only when a checksum judges)


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
