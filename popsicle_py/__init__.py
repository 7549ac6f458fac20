"""popsicle-py: write one disk image to many drives at once.

Two ways in.  The safe path for a program is the application layer, :mod:`popsicle_py.app`:
a request (image, drives, options) is prepared (every check of the CLI, every refusal before a
byte is written) and run with a view.  Beneath it is the broadcast engine:
:class:`BusWriter` reads a source once and writes it to every destination in parallel with
bounded memory; :class:`BusVerifier` reads every destination back and compares.

The engine is imported on first use, so that ``popsicle-py --version`` (which imports this
package) does not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from popsicle_py._version import __version__

if TYPE_CHECKING:
    from popsicle_py.engine import (
        AllDestinationsFailed,
        BusVerifier,
        BusWriter,
        Cancelled,
        DestinationResult,
        WriteResult,
    )
    from popsicle_py.messages import BusVerifierMessage, BusWriterMessage

_LAZY = {
    "AllDestinationsFailed": "popsicle_py.engine",
    "BusVerifier": "popsicle_py.engine",
    "BusWriter": "popsicle_py.engine",
    "Cancelled": "popsicle_py.engine",
    "DestinationResult": "popsicle_py.engine",
    "WriteResult": "popsicle_py.engine",
    "BusVerifierMessage": "popsicle_py.messages",
    "BusWriterMessage": "popsicle_py.messages",
}

__all__ = [
    "AllDestinationsFailed",
    "BusVerifier",
    "BusVerifierMessage",
    "BusWriter",
    "BusWriterMessage",
    "Cancelled",
    "DestinationResult",
    "WriteResult",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'popsicle_py' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
