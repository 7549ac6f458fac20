"""popsicle-py: write one disk image to many drives at once.

The library API is the broadcast engine: :class:`BusWriter` reads a source once and writes it
to every destination in parallel with bounded memory; :class:`BusVerifier` reads every
destination back and compares.
"""

from popsicle_py._version import __version__
from popsicle_py.engine import (
    AllDestinationsFailed,
    BusVerifier,
    BusWriter,
    Cancelled,
    DestinationResult,
    WriteResult,
)
from popsicle_py.messages import BusVerifierMessage, BusWriterMessage

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
