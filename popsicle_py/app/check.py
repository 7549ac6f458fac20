"""The check use case: does a drive still hold what its certificate (or a published digest)
says, without the image?

``prepare_check`` reads and checks the certificate and its signature (``CERT.sig``) first:
a certificate that is not one, or whose signature does not verify, is refused (exit 2) before
any drive is read.  ``run`` then re-reads each drive, read-only, and each ends ok (it
matches, exit 0) or invalid (it differs: the first differing chunk is named; exit 1).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from typing import TypeVar

from popsicle_py import events
from popsicle_py.app.access import require_access
from popsicle_py.app.verify import ReadsDrives
from popsicle_py.certify import model, sshsig
from popsicle_py.certify.readback import CheckJob, Expected
from popsicle_py.defaults import DEFAULT_STALL_TIMEOUT
from popsicle_py.drives import Drive
from popsicle_py.errors import Refused
from popsicle_py.images.checksums import choose_sidecar, sidecar_text
from popsicle_py.plan import make_read_plan
from popsicle_py.protocols import View
from popsicle_py.records import record
from popsicle_py.signals import Cancellation

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
#: Names whose published digest is of a compressed file, which no drive holds.
_COMPRESSED = (".gz", ".xz", ".bz2", ".zst", ".zip", ".lz", ".lzma", ".7z")
_SUMS = "SHA256SUMS"
#: A line of another algorithm (``sha256sum --tag; sha512sum --tag``): the strongest listed
#: was picked, and a list with a SHA-256 of NAME in it said "no SHA-256 for NAME".
_OTHER_TAG = re.compile(r"\s*\ufeff?\\?(?:SHA1|SHA512|BLAKE2b(?:-\d+)?) ?\(", re.I)
T = TypeVar("T")


@record
class CheckRequest:
    """Judge drives against a certificate (one drive) or a published SHA-256 and size."""

    devices: tuple[str, ...]
    certificate: str | None = None
    #: ssh-keygen's allowed_signers file: the certificate must be signed by one of them.
    allowed_signers: str | None = None
    sha256: str | None = None
    size: int | None = None
    #: (SHA256SUMS file, the image's name in it), instead of ``sha256``.
    sums: tuple[str, str] | None = None
    stall_timeout: float = DEFAULT_STALL_TIMEOUT


class PreparedCheck(ReadsDrives):
    """A check whose certificate (and signature) passed: what each drive must hold."""

    def __init__(self, request: CheckRequest, expected: Expected, targets: tuple[Drive, ...],
                 notes: tuple[str, ...]) -> None:
        super().__init__(targets)
        self.request = request
        self.expected = expected
        self.notes = notes

    def run(self, view: View, cancel: Cancellation) -> events.Summary:
        """Read every drive (nothing is written); the summary says which match."""
        opened = self.open_drives(view, cancel, self.request.stall_timeout)
        if opened is None:
            return self.cancelled(view)
        for note in self.notes:
            view.handle(events.Note(note))
        summary = CheckJob(self.expected, opened, view.handle, cancel,
                           self.request.stall_timeout, self.infos).run()
        view.close()
        return summary


#: What each small file read is, as a refusal names it.
_SMALL_FILES = {"certificate": "a certificate", "signature": "a signature",
                "--sums": "a SHA256SUMS file", "--allowed-signers": "an allowed_signers file"}


def _read_small(path: str, what: str, stall_timeout: float | None, *,
                regular: bool = False) -> bytes:
    """The whole of a small file (``what``: a key of :data:`_SMALL_FILES`), or a refusal;
    read on a thread of its own (:func:`_watched`)."""
    return _watched(path, what, stall_timeout, lambda: _read_now(path, what, regular))


def _read_signature(path: str, stall_timeout: float | None) -> bytes | None:
    """The signature file's bytes, or None when there is none (a dangling link too)."""
    return _watched(path, "signature", stall_timeout,
                    lambda: _read_now(path, "signature") if os.path.exists(path) else None)


def _watched(path: str, what: str, stall_timeout: float | None, work: Callable[[], T]) -> T:
    """``work()``, a look at ``path``, on a thread of its own: a file on a hung disk or
    network share (certificates kept on a server) held the command for ever, Ctrl-C unheard;
    now Ctrl-C is heard at once, and no answer in ``stall_timeout`` seconds is a refusal."""
    from popsicle_py.engine.watched import WorkStalled, watched_calls
    from popsicle_py.failures import hung_check

    try:
        return watched_calls(work, stall_timeout=stall_timeout, name="check-input",
                             hung_note=hung_check(path, f"a read of {_SMALL_FILES[what]}"))
    except WorkStalled as exc:
        raise Refused([f"{what} {path} stopped answering: no answer for {exc.limit:g} s (is "
                       "the disk or network share it is on hung?)"]) from None


def _read_now(path: str, what: str, regular: bool = False) -> bytes:
    """:func:`_read_small`'s read.  Opened without blocking: a named pipe nobody writes to
    reads as empty at once, where a plain open would wait for a writer for ever (a pipe that
    has one, ``<(...)``, is read).  ``regular``: anything but a regular file is refused
    (ssh-keygen reads it again).  A block device is never read: ``check /dev/sdb CERT`` read
    256 MiB of the drive before it said "too large to be a certificate"."""
    try:
        if stat.S_ISBLK(os.stat(path).st_mode):
            raise Refused([f"{what} {path}: a drive, not {_SMALL_FILES[what]}"
                           + (" (give CERT first, then DEVICE)" if what == "certificate"
                              else "")])
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused([f"{what} {path}: {exc.strerror or exc}"]) from None
    try:
        if regular and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Refused([f"{what} {path}: not a regular file"])
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as f:  # 1 MiB a call: the watch sees it move
            pieces: list[bytes] = []
            while sum(map(len, pieces)) <= model.MAX_BYTES and (piece := f.read(1 << 20)):
                pieces.append(piece)
            data = b"".join(pieces)
    except OSError as exc:
        raise Refused([f"{what} {path}: {exc.strerror or exc}"]) from None
    finally:
        os.close(fd)
    if len(data) > model.MAX_BYTES:
        raise Refused([f"{path}: too large to be {_SMALL_FILES[what]}"])
    return data


def identity_notes(cert: model.Certificate, drive: Drive) -> list[str]:
    """Where the drive read is not the one the certificate names (its bytes may still match)."""
    notes = []
    if cert.drive.serial and drive.serial.strip() and cert.drive.serial != drive.serial.strip():
        notes.append(f"{drive.path}: serial {drive.serial.strip()}, not the certificate's "
                     f"{cert.drive.serial}: another drive, judged by its bytes")
    if cert.drive.size and drive.size and cert.drive.size != drive.size:
        notes.append(f"{drive.path}: {drive.size} bytes, not the certificate's "
                     f"{cert.drive.size}: another drive, judged by its bytes")
    return notes


def _from_certificate(request: CheckRequest) -> tuple[Expected, list[str], model.Certificate]:
    path = request.certificate
    assert path is not None
    stall = request.stall_timeout
    if request.allowed_signers is not None:  # ssh-keygen would say only "No principal matched"
        _read_small(request.allowed_signers, "--allowed-signers", stall, regular=True)
    data = _read_small(path, "certificate", stall)
    cert = model.parse(data.decode("utf-8", errors="replace"), path)
    sig_path = path + sshsig.SIG_SUFFIX
    notes = []
    signature = _read_signature(sig_path, stall)
    if signature is not None:
        if request.allowed_signers is not None:
            who = sshsig.verify(path, data, signature, request.allowed_signers)
            notes.append(f"{path}: signed by {who}")
        else:
            sshsig.check_intact(path, data, signature)
            notes.append(f"{path}: the signature matches, but who signed it is not checked "
                         "(give --allowed-signers FILE)")
    elif request.allowed_signers is not None:
        raise model.CertificateError(f"{path}: not signed (no {sig_path}), and "
                                     "--allowed-signers asks for a signature")
    else:
        notes.append(f"{path}: not signed: it proves only what its own file says")
    expected = Expected(path, "certificate", cert.image_size, cert.device_sha256, cert.chunks)
    return expected, notes, cert


def _published(request: CheckRequest) -> Expected:
    if request.size is None:
        raise Refused(["--size N is needed with a published digest: the image's size in "
                       "bytes (the drive is read that far)"])
    if request.sums is not None:
        sums, name = request.sums
        if name.lower().endswith(_COMPRESSED):
            raise Refused([f"{name} is compressed: a drive holds the decompressed image; give "
                           "the digest of the uncompressed image"])
        text = "\n".join(line for line in sidecar_text(_read_small(
            sums, "--sums", request.stall_timeout)).splitlines()
            if not _OTHER_TAG.match(line))
        # Only the file given is read, as SHA256SUMS (no IMAGE.sha256 beside NAME), and its
        # refusals name it ("\0": a name no file has).
        found = choose_sidecar(name, lambda n: sums if n == _SUMS else "\0" + n,
                               lambda n: text if n == sums else None)
        if found is None or found.algo != "sha256":
            raise Refused([f"--sums {sums}: no SHA-256 for {name}"])
        digest = found.hexdigest
        shown = f"{name} (sha256 from {sums})"
    else:
        assert request.sha256 is not None
        digest = request.sha256
        if not _SHA256.fullmatch(digest):
            raise Refused([f"--sha256 {digest}: not 64 hex digits"])
        shown = f"sha256 {digest.lower()}"
    return Expected(shown, "sha256", request.size, digest.lower())


def prepare_check(request: CheckRequest) -> PreparedCheck:
    """Check the certificate (or the digest) and the drives; raises :class:`Refused` (exit 2),
    or :class:`~popsicle_py.certify.CertificateError` when it is not to be trusted."""
    given = [request.certificate is not None, request.sha256 is not None,
             request.sums is not None]
    if sum(given) != 1:
        raise Refused(["give one of: a CERTIFICATE, --sha256 HEX, --sums SHA256SUMS NAME"])
    if request.size is not None and request.size < 1:
        raise Refused([f"--size {request.size}: must be at least 1 byte"])
    notes: list[str] = []
    if request.certificate is not None:
        if len(request.devices) != 1:
            raise Refused(["a certificate is one drive's: give one DEVICE"])
        if request.size is not None:
            raise Refused(["--size goes with --sha256 or --sums: a certificate has its size"])
        expected, notes, cert = _from_certificate(request)
    else:
        if request.allowed_signers is not None:
            raise Refused(["--allowed-signers goes with a certificate"])
        if not request.devices:
            raise Refused(["no drives: name the DEVICE(s) to check"])
        expected, cert = _published(request), None
    # A drive smaller than the image is not refused: it does not hold it (exit 1, "ends at").
    targets = make_read_plan(request.devices, None).targets
    require_access([d.path for d in targets], writing=False, limit=request.stall_timeout)
    if cert is not None:
        notes += identity_notes(cert, targets[0])
    return PreparedCheck(request, expected, targets, tuple(notes))
