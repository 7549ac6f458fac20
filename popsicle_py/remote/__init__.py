"""Images at http(s) URLs: one download streamed into every drive, resumed after drops.

The package reads from the bottom up:

- :mod:`.headers`: pure decisions over an answer's headers (validators, Content-Range,
  HTML pages, status lines);
- :mod:`.coding`: a Content-Encoding the server sent although none was asked for;
- :mod:`.http`: the urllib3 client (pool, timeouts, redirects, TLS), the first answer for a
  URL (probed) and transport errors as one line each;
- :mod:`.download`: the body as a stream, resumed after drops and stalls, hashed as it is
  handed out, kept in a sink (the cache, or a private file) committed at its end;
- :mod:`.image`: the remote image (probed once, its published checksum, a cached copy) and
  what the CLI calls: :func:`open_url`, :func:`attach`, :func:`materialize`.

GPG signatures of checksum files live in :mod:`popsicle_py.signatures` (local files use them
too); their names are re-exported here, as before.  Every name is loaded on first use, so that
``import popsicle_py.remote`` does not import urllib3: only a URL needs the HTTP client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from popsicle_py.remote.download import DOWNLOADING, Download, Emit, FileSink
    from popsicle_py.remote.http import (
        Client,
        HttpSettings,
        Probe,
        RemoteError,
        Validator,
        content_length,
        final_url,
        is_url,
        looks_like_html,
        parse_content_range,
        probe,
        status_message,
        transport_message,
        without_credentials,
    )
    from popsicle_py.remote.image import (
        RemoteImage,
        UrlImage,
        attach,
        hidden_credentials,
        materialize,
        open_url,
        published_checksum,
    )
    from popsicle_py.signatures import SIGNATURE_SUFFIXES, check_signature, read_local

#: Where each name lives.
_HOMES = {
    **dict.fromkeys(("DOWNLOADING", "Download", "Emit", "FileSink"), "popsicle_py.remote.download"),
    **dict.fromkeys(("Client", "HttpSettings", "Probe", "RemoteError", "Validator",
                     "content_length", "final_url", "is_url", "looks_like_html",
                     "parse_content_range", "probe", "status_message", "transport_message",
                     "without_credentials"),
                    "popsicle_py.remote.http"),
    **dict.fromkeys(("RemoteImage", "UrlImage", "attach", "hidden_credentials",
                     "materialize", "open_url", "published_checksum"),
                    "popsicle_py.remote.image"),
    **dict.fromkeys(("SIGNATURE_SUFFIXES", "check_signature", "read_local"),
                    "popsicle_py.signatures"),
}

__all__ = [
    "DOWNLOADING",
    "SIGNATURE_SUFFIXES",
    "Client",
    "Download",
    "Emit",
    "FileSink",
    "HttpSettings",
    "Probe",
    "RemoteError",
    "RemoteImage",
    "UrlImage",
    "Validator",
    "attach",
    "check_signature",
    "content_length",
    "final_url",
    "hidden_credentials",
    "is_url",
    "looks_like_html",
    "materialize",
    "open_url",
    "parse_content_range",
    "probe",
    "published_checksum",
    "read_local",
    "status_message",
    "transport_message",
    "without_credentials",
]


def __getattr__(name: str) -> Any:
    """Import the module that holds ``name`` on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
