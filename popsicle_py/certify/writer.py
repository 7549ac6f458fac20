"""``--certificate DIR`` (and ``--sign-key KEY``): one certificate per verified drive.

Made before anything is written (the directory opened, the key tried on a test message, so a
bad one is refused with exit 2), then called by the job for each drive that ended ok and was
read back, with the digests the verify pass compared: the certificate says what was *read*
from the drive, never what was merely sent to it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence

from popsicle_py._version import __version__
from popsicle_py.certify import files, sshsig
from popsicle_py.certify.model import Certificate, chunks_from_digests
from popsicle_py.events import DriveInfo, DriveResult
from popsicle_py.records import record
from popsicle_py.report import iso

#: What the job hands over: each extent's (offset, length) and the XXH3-128 digest it read.
Evidence = Sequence[tuple[tuple[int, int], bytes]]
#: What the job calls for each verified drive (the flash job's ``Certify``).
Certify = Callable[[DriveResult, Evidence, float], str]


@record
class Place:
    """Who and where, when known (a station): None leaves them out."""

    station: str | None = None
    batch: str | None = None
    operator: str | None = None
    #: The slot of a USB port path (a station's slot map).
    slot_of: Callable[[str | None], str | None] = lambda port: None


class CertificateWriter:
    """Writes ``NAME.json`` (and ``NAME.json.sig``) in the directory for each verified drive."""

    def __init__(self, directory: str, sign_key: str | None, image: str,
                 image_sha256: str | None, place: Place | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if sign_key is not None:
            sshsig.check_key(sign_key)
        self.path = directory
        self.fd = files.open_directory(directory)
        self.sign_key = sign_key
        self.image = image
        self.image_sha256 = image_sha256
        self.place = place or Place()
        self.clock = clock
        #: Why signing cannot work this run (a signer that did not answer): no drive waits
        #: for it again.
        self.unsigned: str | None = None

    def until(self, stopped: Callable[[], bool]) -> Certify:
        """:meth:`certify` for a run whose cancellation is ``stopped``: a signature waited
        for ends at it (the job's Ctrl-C is heard, not held by a hung ssh-agent)."""
        def certify(result: DriveResult, evidence: Evidence, started: float) -> str:
            return self.certify(result, evidence, started, stopped=stopped)
        return certify

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def certify(self, result: DriveResult, evidence: Evidence, started: float, *,
                stopped: Callable[[], bool] | None = None) -> str:
        """Write the certificate of a drive that read back as the image; its path.

        Raises OSError (or :class:`~.sshsig.SignError`) when it cannot be written or signed;
        raises ValueError for a result that does not certify anything.
        """
        if not (result.ok and result.verified and result.device_sha256):
            raise ValueError(f"{result.device}: not read back as the image: nothing to certify")
        info = result.drive or DriveInfo()
        chunks = chunks_from_digests([e for e, _ in evidence], [d for _, d in evidence])
        if not chunks:
            raise ValueError(f"{result.device}: no digests were read back: nothing to certify")
        now = self.clock()
        cert = Certificate(
            image=self.image, image_size=chunks[-1].end, device_sha256=result.device_sha256,
            chunks=chunks, drive=info, device=result.device, started=iso(started),
            finished=iso(now), tool_version=__version__, image_sha256=self.image_sha256,
            slot=self.place.slot_of(info.port_path), station=self.place.station,
            batch=self.place.batch, operator=self.place.operator)
        data = cert.text().encode()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        # Signed first: a certificate that could not be signed is never left behind.
        signature = (None if self.sign_key is None else
                     (sshsig.SIG_SUFFIX, self._sign(self.sign_key, data, stopped)))
        try:
            name = files.write_new(self.fd, files.certificate_name(
                stamp, info.seq, info.serial, info.port_path), data, signature)
        except OSError as exc:  # "No space left on device" alone did not say where
            raise OSError(f"{self.path}: {exc.strerror or exc}") from None
        return os.path.join(self.path, name)

    def _sign(self, key: str, data: bytes, stopped: Callable[[], bool] | None) -> bytes:
        """The signature of ``data``; a signer that once did not answer is not waited for
        again (each drive's end held the run a minute more)."""
        if self.unsigned is not None:
            raise sshsig.SignError(self.unsigned)
        try:
            return sshsig.sign(key, data, stopped)
        except sshsig.SignTimeout as exc:
            self.unsigned = f"{exc}; not asked again this run"
            raise
