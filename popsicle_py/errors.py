"""The exceptions popsicle-py raises, in one tree, each carrying the exit status it means.

    PopsicleError                  exit_code   show() prints
    ├── Refused                    2           one line per problem; nothing was written
    │   (ImageError, PlanError, TargetError, BmapError, OpenError are Refused)
    ├── Cancelled                  130         a stop signal or cancel() ended the run
    └── AllDestinationsFailed      1           every destination failed (``results`` says how)

    KeyboardInterrupt
    └── InterruptedWhileHung       Ctrl-C while a check's call had not returned (``note`` says)

    OSError (a destination that failed, typed where it failed: failures.py words it)
    ├── Counterfeit                the capacity probe found less than the drive claims
    ├── TooSmall                   the image does not fit on the drive (ENOSPC)
    ├── Stalled                    the drive made no progress within the stall timeout (ETIMEDOUT)
    └── Rejected                   graded out: too slow, the wrong size, a bad surface

    OSError (a source that cannot be trusted; raised by the engine's reader)
    ├── SourceReadFailed           a read of the source failed: where, its error as __cause__
    ├── SourceChanged              the source held more or fewer bytes than it was said to
    ├── SourceStalled              reading the source made no progress within the stall timeout
    ├── SourceUnreadable           a read of the source for one destination alone failed
    ├── ExtentChecksumError        a block-map range fails its checksum
    └── ChecksumMismatch           the bytes read do not match the image's checksum

Like click's exceptions, a user-facing error knows its exit status and how to show itself, so
the CLI has one ``except PopsicleError`` instead of a ladder.  Source errors stay ``OSError``
because the engine reports every I/O failure as one (the seed's API promises it).
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Sequence
from typing import IO, Generic, Protocol, TypeVar

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGNAL_BASE = 128
PROG = "popsicle-py"


class PopsicleError(Exception):
    """Base of every error popsicle-py means to show a user."""

    exit_code = EXIT_FAILED

    def messages(self) -> list[str]:
        """What to show: one line per problem. The message is one line whatever a name in it
        holds: a file name with a newline must not forge a line of its own (the viewer
        escapes it), so nothing here splits."""
        text = str(self)
        return [text] if text else []

    def show(self, file: IO[str] | None = None) -> None:
        """Print ``popsicle-py: LINE`` for each line, to stderr by default."""
        out = file if file is not None else sys.stderr
        if out is None:  # stderr closed (``2>&-``): the exit status still says it
            return
        from popsicle_py.view_json import printable  # here: view_json imports events, us

        with contextlib.suppress(OSError, ValueError):
            for line in self.messages():
                print(f"{PROG}: {printable(line)}", file=out, flush=True)


class Refused(PopsicleError):
    """Bad usage or input found before anything was written (exit 2), one line per problem:
    each text given is one line, never split, since a name in it may hold a newline."""

    exit_code = EXIT_USAGE

    def __init__(self, lines: Sequence[str] | str = (), notes: Sequence[str] = ()) -> None:
        given = [lines] if isinstance(lines, str) else list(lines)
        self.lines = [text for text in given if text]
        self.notes = tuple(notes)
        super().__init__("\n".join(self.lines))

    def messages(self) -> list[str]:
        return list(self.lines)


class Cancelled(PopsicleError):
    """The run was cancelled; no unfinished destination was reported as completed."""

    exit_code = EXIT_SIGNAL_BASE + 2  # SIGINT, unless the caller knows the signal


class InterruptedWhileHung(KeyboardInterrupt):
    """Ctrl-C came while a check's call to a file system had not returned (a hung disk or
    share): the process can end only once that call does, and ``note`` tells the user so."""

    def __init__(self, note: str) -> None:
        super().__init__(note)
        self.note = note


class Outcome(Protocol):
    """How one destination did, as far as this error needs it (an engine DestinationResult:
    typed by what it has, so errors, below the engine, imports nothing of it)."""

    @property
    def id(self) -> int: ...

    @property
    def error(self) -> OSError | None: ...


R = TypeVar("R", bound=Outcome)


class AllDestinationsFailed(PopsicleError, Generic[R]):
    """Every destination failed; ``results`` (the engine's DestinationResults) says how."""

    def __init__(self, results: Sequence[R]) -> None:
        self.results = tuple(results)
        reasons = "; ".join(f"{r.id}: {r.error}" for r in self.results)
        super().__init__(f"every destination failed ({reasons})")


class SourceChanged(OSError):
    """The source held more or fewer bytes than it was said to."""

    def __init__(self, expected: int, got: int, said_by: str | None = None) -> None:
        super().__init__(errno.EIO, (
            f"the image holds {got} bytes but {said_by} {expected}: is it the image the map "
            "was made for?" if said_by else
            f"the image ended at byte {got} but should hold {expected} bytes (was it "
            "truncated or changed while being read?)"))
        self.expected = expected
        self.got = got


class SourceStalled(OSError):
    """Reading the image made (almost) no progress for the stall timeout: its disk or network
    share hangs (ETIMEDOUT).  No drive can hold the image; every one fails."""

    def __init__(self, limit: float, moved: int, spill: str | None = None) -> None:
        super().__init__(errno.ETIMEDOUT, (
            f"keeping the decompressed image in {spill} stalled: a write made no progress "
            f"for {limit:g} s (is the disk it is on hung? set TMPDIR to another)" if spill else
            f"reading the image stalled: no data for {limit:g} s (is the disk or network "
            "share it is on hung?)" if not moved else
            f"reading the image stalled: only {moved // 1024} KiB in {limit:g} s"))


class SourceReadFailed(OSError):
    """The image's own read failed (a bad block of a master drive, a dying disk under the
    file): said as the image's, with where, not as a bare "Input/output error" that reads
    like the drive's."""

    def __init__(self, start: int, length: int, cause: OSError) -> None:
        super().__init__(cause.errno, f"reading the image failed in its bytes {start}-"
                         f"{start + length - 1}: {cause.strerror or cause}")


class SourceDiffers(OSError):
    """A drive that read part of the image again on its own got other bytes than the read that
    fed the others (a file changed while it was flashed): that drive does not hold the image."""

    def __init__(self, offset: int, length: int) -> None:
        super().__init__(errno.EIO, f"the image changed while it was read: bytes {offset}-"
                         f"{offset + length - 1}, read again for this drive, differ")
        self.offset = offset
        self.length = length


class SourceUnreadable(OSError):
    """A read of the image (or of its spill file) for one drive alone failed: a laggard's
    own read, a repair's.  The image's fault (its disk, its share), though only that drive
    fails: not to be worded as the drive's I/O error."""

    def __init__(self, cause: OSError, offset: int, what: str = "the image") -> None:
        why = cause.strerror or str(cause)
        super().__init__(cause.errno, f"reading {what} again for this drive failed (from byte "
                         f"{offset}): {why}")
        self.offset = offset


class ExtentChecksumError(OSError):
    """A range of the source does not match the checksum its block map gives."""

    def __init__(self, offset: int, length: int, algo: str) -> None:
        super().__init__(errno.EIO, f"the image does not match its block map: bytes {offset}-"
                         f"{offset + length - 1} fail their {algo} checksum")
        self.offset = offset
        self.length = length


class ChecksumMismatch(OSError):
    """The bytes the drives were fed do not match the image's checksum (read in the same pass).

    After a checksum pass that matched, the image changed; without one (--checksum-while-
    writing), the image or the checksum given is wrong: the message says which it knows.
    """

    def __init__(self, algo: str, *, checked_before: bool = True) -> None:
        if checked_before:
            why = f"the image changed while it was read: it no longer matches its checksum ({algo})"
        else:
            why = f"the image does not match its checksum ({algo}): a wrong image, or checksum"
        super().__init__(errno.EIO, why)
        self.algo = algo


class Counterfeit(OSError):
    """The capacity probe found that the drive holds less than it claims (a destination
    failure, so an OSError like every other one)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TooSmall(OSError):
    """The image is larger than the drive: a write reached the drive's end (ENOSPC)."""

    def __init__(self, message: str = "image is larger than the drive") -> None:
        super().__init__(errno.ENOSPC, message)


class Stalled(OSError):
    """The drive made (almost) no progress for the stall timeout (ETIMEDOUT); given up on."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ETIMEDOUT, message)


class Rejected(OSError):
    """The drive works but is graded out (status ``rejected``): ``cause`` is the word of
    :class:`popsicle_py.events.Cause` (slow, capacity, surface); not written further."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(errno.ECANCELED, message)
        self.cause = cause
