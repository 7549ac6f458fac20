"""What a certificate says, as plain data: built from a verified drive, read back for a check.

The device's SHA-256 is the proof (a signature covers the whole file); the per-chunk XXH3-128
digests are what lets a later check say *where* a drive differs without the image (the digests
the verify pass compared anyway, so they cost nothing to record).  Parsing is strict: a file
that is not exactly a certificate of this shape is refused with one line (exit 2).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import field
from typing import Any

from popsicle_py.errors import Refused
from popsicle_py.events import DriveInfo, JsonObject
from popsicle_py.records import record

FORMAT = "popsicle-py certificate"
VERSION = 1
#: The digest of each chunk: fast, to locate a difference; the SHA-256 is the proof.
CHUNK_DIGEST = "xxh3-128"
#: The ssh-keygen -Y namespace of a certificate's signature.
NAMESPACE = "popsicle-py"
#: A certificate larger than this is not one of ours (16 TB in 1 MiB chunks is ~1 GB of JSON).
MAX_BYTES = 256 << 20

_PLACE = "\0chunks\0"  # where the chunks go in the text (a string no JSON value here holds)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_XXH128 = re.compile(r"[0-9a-f]{32}")


class CertificateError(Refused):
    """A certificate that cannot be trusted or read (exit 2); one line saying why."""


@record
class Chunk:
    """One range of the image on the drive and its digest (hex)."""

    offset: int
    length: int
    digest: str

    @property
    def end(self) -> int:
        return self.offset + self.length


@record
class Certificate:
    """One drive's certificate: which image, what was read back, which drive, who, when."""

    image: str
    image_size: int
    device_sha256: str
    chunks: tuple[Chunk, ...]
    drive: DriveInfo
    device: str
    started: str
    finished: str
    tool_version: str
    image_sha256: str | None = None
    slot: str | None = None
    station: str | None = None
    batch: str | None = None
    operator: str | None = None
    #: Anything else a newer writer put in (kept, not interpreted).
    extra: JsonObject = field(default_factory=dict, compare=False)

    def to_json(self) -> JsonObject:
        return {
            "format": FORMAT, "version": VERSION,
            "image": {"name": self.image, "size": self.image_size,
                      "sha256": self.image_sha256},
            "device": {"sha256": self.device_sha256, "chunk_digest": CHUNK_DIGEST,
                       "chunks": [[c.offset, c.length, c.digest] for c in self.chunks]},
            "drive": {"device": self.device, "slot": self.slot, **self.drive.to_json()},
            "station": {"name": self.station, "batch": self.batch, "operator": self.operator},
            "times": {"started": self.started, "finished": self.finished},
            "tool": {"name": "popsicle-py", "version": self.tool_version},
        }

    def text(self) -> str:
        """The file's bytes as text: one key a line, and one line per chunk."""
        data = self.to_json()
        chunks = data["device"]["chunks"]
        data["device"]["chunks"] = _PLACE
        rows = ",\n   ".join(json.dumps(c) for c in chunks)
        return json.dumps(data, indent=1).replace(json.dumps(_PLACE), f"[\n   {rows}\n  ]") + "\n"


def chunks_from_digests(extents: Sequence[tuple[int, int]], digests: Sequence[bytes]
                        ) -> tuple[Chunk, ...]:
    """The engine's recorded (offset, length) extents and digests, in offset order."""
    pairs = sorted(zip(extents, digests, strict=True))
    return tuple(Chunk(o, n, d.hex()) for (o, n), d in pairs)


def first_bad(chunks: Sequence[Chunk], digests: Sequence[str]) -> Chunk | None:
    """The first chunk whose digest read from the drive (``digests``, in order) differs."""
    for chunk, got in zip(chunks, digests, strict=False):
        if chunk.digest != got:
            return chunk
    return None


def _need(data: JsonObject, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise CertificateError(f"{where}: not a certificate: no {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise CertificateError(f"{where}: not a certificate: {key!r} has the wrong type")
    return value


def _optional_str(data: JsonObject, key: str, where: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise CertificateError(f"{where}: not a certificate: {key!r} has the wrong type")
    return value


def _chunks(raw: list[object], size: int, where: str) -> tuple[Chunk, ...]:
    """Chunks that cover the image from byte 0 to its end, in order, without a gap."""
    chunks = []
    at = 0
    for item in raw:
        if (not isinstance(item, list) or len(item) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item[:2])
                or not isinstance(item[2], str) or not _XXH128.fullmatch(item[2])):
            raise CertificateError(f"{where}: not a certificate: a chunk is not "
                                   "[offset, length, xxh3-128 hex]")
        offset, length, digest = item
        if offset != at or length <= 0:
            raise CertificateError(f"{where}: the chunks do not cover the image in order "
                                   f"(byte {at} expected, chunk at {offset})")
        chunks.append(Chunk(offset, length, digest))
        at = offset + length
    if at != size:
        raise CertificateError(f"{where}: the chunks end at byte {at}, the image at {size}")
    return tuple(chunks)


def _drive(data: JsonObject, where: str) -> tuple[DriveInfo, str, str | None]:
    def text(key: str) -> str:
        value = data.get(key, "")
        return value if isinstance(value, str) else ""

    def number(key: str) -> int | None:
        value = data.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    device = _need(data, "device", str, where)
    info = DriveInfo(seq=number("seq"), port_path=_optional_str(data, "port_path", where),
                     vendor=text("vendor"), model=text("model"), serial=text("serial"),
                     size=number("size") or 0, link_speed=number("link_speed"))
    return info, device, _optional_str(data, "slot", where)


def parse(text: str, where: str) -> Certificate:
    """The certificate in ``text`` (from the file ``where``); raises CertificateError."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # nested too deep for the decoder, too
        raise CertificateError(f"{where}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CertificateError(f"{where}: not a popsicle-py certificate")
    version = data.get("version")
    if type(version) is not int or version != VERSION:  # JSON's true and 1.0 are no 1
        raise CertificateError(f"{where}: certificate version {data.get('version')!r} is not "
                               f"one this popsicle-py reads ({VERSION})")
    image = _need(data, "image", dict, where)
    size = _need(image, "size", int, where)
    if size <= 0:
        raise CertificateError(f"{where}: the image size is {size}")
    image_sha = _optional_str(image, "sha256", where)
    if image_sha is not None and not _SHA256.fullmatch(image_sha):
        raise CertificateError(f"{where}: the image's sha256 is not 64 lowercase hex digits")
    device = _need(data, "device", dict, where)
    device_sha = _need(device, "sha256", str, where)
    if not _SHA256.fullmatch(device_sha):
        raise CertificateError(f"{where}: the device's sha256 is not 64 lowercase hex digits")
    if device.get("chunk_digest") != CHUNK_DIGEST:
        raise CertificateError(f"{where}: chunk digests are not {CHUNK_DIGEST}")
    chunks = _chunks(_need(device, "chunks", list, where), size, where)
    info, path, slot = _drive(_need(data, "drive", dict, where), where)
    found = data.get("station")
    station: JsonObject = found if isinstance(found, dict) else {}
    times = _need(data, "times", dict, where)
    tool = _need(data, "tool", dict, where)
    known = {"format", "version", "image", "device", "drive", "station", "times", "tool"}
    return Certificate(
        image=_need(image, "name", str, where), image_size=size, device_sha256=device_sha,
        chunks=chunks, drive=info, device=path,
        started=_need(times, "started", str, where), finished=_need(times, "finished", str, where),
        tool_version=_need(tool, "version", str, where), image_sha256=image_sha, slot=slot,
        station=_optional_str(station, "name", where),
        batch=_optional_str(station, "batch", where),
        operator=_optional_str(station, "operator", where),
        extra={k: v for k, v in data.items() if k not in known})
