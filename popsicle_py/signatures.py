"""Detached GPG signatures of checksum files, checked with gpgv against one keyring.

Published checksum files (SHA256SUMS and the like) are trusted only when a signature beside
them verifies with the user's ``--keyring``, whether they lie next to a local image or were
fetched from beside a URL (``read`` says how to get the bytes).  gpgv runs with an empty
GNUPGHOME, so no other key on the system is trusted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable

from popsicle_py.files import create_regular
from popsicle_py.images import ImageError

__all__ = ["SIDECAR_LIMIT", "SIGNATURE_SUFFIXES", "check_signature", "read_local"]

#: The most bytes a checksum or signature file may have (a bigger one is not one).
SIDECAR_LIMIT = 16 << 20
SIGNATURE_SUFFIXES = (".gpg", ".sign", ".asc", ".sig")


def _signature_check(name: str, data: bytes, signature: bytes | None, keyring: str) -> None:
    """gpgv against the user's keyring only (an empty GNUPGHOME: no other trusted keys)."""
    if shutil.which("gpgv") is None:
        raise ImageError("--keyring needs gpgv, which is not installed (apt install gpgv)")
    if not os.path.isfile(keyring):
        raise ImageError(f"--keyring {keyring}: no such file")
    with tempfile.TemporaryDirectory(prefix="popsicle-py-gpgv-") as home:
        sums, sig = os.path.join(home, "sums"), os.path.join(home, "sums.sig")
        with create_regular(sums, exclusive=True) as f:
            f.write(data)
        if signature is not None:
            with create_regular(sig, exclusive=True) as f:
                f.write(signature)
        files = [sig, sums] if signature is not None else [sums]  # clearsigned: the file itself
        try:
            proc = subprocess.run(["gpgv", "--keyring", os.path.abspath(keyring), *files],
                                  capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "GNUPGHOME": home}, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageError(f"gpgv could not check {name}: {exc}") from None
    if proc.returncode != 0:
        # Its own lines only: not its advice to give the signature first (it was), nor the
        # "could not be verified" that every failure ends with; the cause is the last left.
        lines = [ln.removeprefix("gpgv: ").strip() for ln in proc.stderr.splitlines()
                 if ln.startswith("gpgv: ")]
        lines = [ln for ln in lines if ln and ln != "the signature could not be verified."]
        why = lines[-1] if lines else f"gpgv exited with {proc.returncode}"
        raise ImageError(f"the signature of {name} does not verify with {keyring}: {why}")


def check_signature(source: str, read: Callable[[str], bytes | None], keyring: str) -> str:
    """Verify the detached signature next to ``source``, or its own when it is clearsigned;
    returns the signature's name."""
    if not os.path.isfile(keyring):  # said first: a missing keyring is not a missing signature
        raise ImageError(f"--keyring {keyring}: no such file")
    data = read(source)
    if data is None:
        raise ImageError(f"checksum file {source} cannot be read again to check its signature")
    if data.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"):  # Fedora's CHECKSUM
        _signature_check(source, data, None, keyring)
        return source
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
            return f.read(SIDECAR_LIMIT)
    except OSError:
        return None
