"""Certificates: proof, later and without the image, that a drive holds what was written.

A certificate is one JSON file per drive (:mod:`.model`: what it says, how it is checked for
shape), written without following symlinks (:mod:`.files`), optionally signed with an OpenSSH
key (:mod:`.sshsig`: ``ssh-keygen -Y``, namespace ``popsicle-py``).  ``popsicle-py check``
re-reads a drive against one (:mod:`.readback`), or against a published SHA-256.
"""

from __future__ import annotations

from popsicle_py.certify.model import (
    CHUNK_DIGEST,
    FORMAT,
    NAMESPACE,
    Certificate,
    CertificateError,
    Chunk,
    parse,
)

__all__ = ["CHUNK_DIGEST", "FORMAT", "NAMESPACE", "Certificate", "CertificateError", "Chunk",
           "parse"]
