"""Re-reading drives against a certificate or a published SHA-256, without the image.

Each drive is read from byte 0 to the image's end on its own thread (one supervisor, as for a
flash: a drive that stops answering is failed as stalled, a signal stops them all), hashed with
SHA-256, and with a certificate also chunk by chunk, so that a drive that differs is stopped at
its first bad chunk and the result says which bytes.  Nothing is ever written.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence

import xxhash

from popsicle_py import failures
from popsicle_py.blockdev import BlockDevice, read_at
from popsicle_py.buffers import aligned_buffer
from popsicle_py.certify.model import Chunk
from popsicle_py.engine.checks import reading_back
from popsicle_py.engine.config import CHUNK
from popsicle_py.engine.supervisor import Lane, Supervisor
from popsicle_py.errors import Cancelled
from popsicle_py.events import (
    Cause,
    DriveInfo,
    DriveResult,
    Event,
    Note,
    Phase,
    Progress,
    Result,
    Started,
    Status,
    Step,
    Summary,
)
from popsicle_py.records import record

Emit = Callable[[Event], None]


@record
class Expected:
    """What each drive must hold: ``size`` bytes with this SHA-256 (and these chunks)."""

    name: str  # what it is compared with, for the start event: a certificate, a digest
    kind: str  # "certificate" or "sha256"
    size: int
    sha256: str
    chunks: tuple[Chunk, ...] = ()


@record
class _Read:
    id: int
    done: int


@record
class _Done:
    id: int
    sha256: str


@record
class _Differs:
    id: int
    chunk: Chunk
    index: int


@record
class _Ended:
    id: int
    offset: int


@record
class _Errored:
    id: int
    why: OSError


def read_range(lane: Lane, size: int, chunks: Sequence[Chunk]) -> None:
    """Read ``lane.dest`` from 0 to ``size``, post what it found (one of the messages above)."""
    lane.waiting = False
    lane.touch()
    scratch = memoryview(aligned_buffer(CHUNK))
    whole = hashlib.sha256()
    part = xxhash.xxh3_128()
    index = 0
    offset = 0
    while offset < size:
        if lane.stopped:
            return
        want = min(len(scratch), size - offset, lane.pacer.size())
        if chunks:
            want = min(want, chunks[index].end - offset)
        with reading_back(offset, want):
            got = read_at(lane.dest, offset, scratch[:want], pacer=lane.pacer)
        if got == 0:
            lane.post(_Ended(lane.id, offset))
            return
        data = scratch[:got]
        whole.update(data)
        part.update(data)
        offset += got
        lane.advance(got)
        lane.post(_Read(lane.id, offset))
        if chunks and offset == chunks[index].end:
            if part.hexdigest() != chunks[index].digest:
                lane.post(_Differs(lane.id, chunks[index], index))
                return
            part.reset()
            index += 1
    lane.post(_Done(lane.id, whole.hexdigest()))


def _other_sha256(path: str, expected: Expected, digest: str) -> str:
    """Why a drive whose SHA-256 is not the expected one is invalid, with what was hashed:
    a wrong ``--size`` (GB for GiB) read as "differs" without the number of bytes read; and
    a certificate whose every chunk matched but whose SHA-256 did not contradicts itself."""
    if expected.chunks:
        return (f"{path}: every chunk matches the certificate, but its {expected.size} bytes "
                f"read back with SHA-256 {digest}, not the certificate's {expected.sha256}: "
                "the certificate contradicts itself (edited?)")
    return (f"{path}: its first {expected.size} bytes (--size) read back with SHA-256 "
            f"{digest}, not {expected.sha256}")


class CheckJob:
    """Read every opened drive against ``expected``; each ends ok (it matches), invalid (it
    differs, or is shorter) or failed (it could not be read)."""

    def __init__(self, expected: Expected, devices: Sequence[BlockDevice], emit: Emit,
                 cancel: Callable[[], bool], stall_timeout: float | None,
                 infos: Sequence[DriveInfo] = ()) -> None:
        self.expected = expected
        self.devices = list(devices)
        self._emit = emit
        self.cancel = cancel
        self.stall_timeout = stall_timeout
        self.infos = tuple(infos) + (None,) * (len(self.devices) - len(infos))
        self.results: list[DriveResult | None] = [None] * len(self.devices)
        self.cancelled = False
        self.started = time.monotonic()

    def _end(self, index: int, status: Status, error: str | None = None,
             offset: int | None = None, cause: Cause | None = None,
             sha256: str | None = None) -> None:
        if self.results[index] is not None:
            return
        path = self.devices[index].path
        result = DriveResult(path, status, 0, error, offset, cause=cause,
                             elapsed=time.monotonic() - self.started,
                             verified=status is Status.OK, drive=self.infos[index],
                             device_sha256=sha256)
        self.results[index] = result
        self._emit(Phase(path, Step.DONE if status is Status.OK else Step.FAILED,
                         error or status.value, cause))
        self._emit(Result(result))

    def _on_message(self, msg: object) -> None:
        expected = self.expected
        match msg:
            case _Read(id=i, done=n):
                self._emit(Progress(self.devices[i].path, Step.VERIFYING, n, expected.size))
            case _Done(id=i, sha256=digest) if digest == expected.sha256:
                self._end(i, Status.OK, sha256=digest)
            case _Done(id=i, sha256=digest):
                self._end(i, Status.INVALID, _other_sha256(self.devices[i].path, expected,
                                                           digest),
                          cause=Cause.MISMATCH, sha256=digest)
            case _Differs(id=i, chunk=chunk, index=k):
                self._end(i, Status.INVALID, f"{self.devices[i].path}: differs from the "
                          f"certificate in bytes {chunk.offset}-{chunk.end - 1} (chunk {k + 1} "
                          f"of {len(expected.chunks)})", chunk.offset, Cause.MISMATCH)
            case _Ended(id=i, offset=offset):
                self._end(i, Status.INVALID, f"{self.devices[i].path}: the drive ends at byte "
                          f"{offset}, before the image ({expected.size} bytes) does", offset,
                          Cause.TOO_SMALL)
            case _Errored(id=i, why=why):
                failed = failures.failure(why, self.devices[i].path)
                self._end(i, Status.FAILED, failed.text, cause=failed.cause)

    def run(self) -> Summary:
        expected = self.expected
        paths = tuple(d.path for d in self.devices)
        self.started = time.monotonic()
        self._emit(Started(expected.name, expected.kind, expected.size, paths,
                           drives=tuple(i for i in self.infos if i is not None)))
        for path in paths:
            self._emit(Phase(path, Step.VERIFYING))
        supervisor = Supervisor(self.devices, self._on_message, self.cancel,
                                stall_timeout=self.stall_timeout, errored=_Errored,
                                name="check")
        try:
            supervisor.run(lambda lane: read_range(lane, expected.size, expected.chunks))
        except Cancelled:
            self.cancelled = True
        finally:
            for device in self.devices:
                with contextlib.suppress(OSError):
                    device.close()
                if (line := failures.call_not_returned(device.path, device)) is not None:
                    self._emit(Note(line))  # as flash says it: the exit waits for that call
        for i in range(len(self.devices)):
            if self.cancelled:
                self._end(i, Status.CANCELLED, "cancelled", cause=Cause.CANCELLED)
            else:
                self._end(i, Status.FAILED, f"{paths[i]}: did not finish", cause=Cause.ERROR)
        summary = Summary(tuple(r for r in self.results if r is not None), self.cancelled)
        self._emit(summary)
        return summary
