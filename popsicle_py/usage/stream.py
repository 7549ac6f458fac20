"""What an image's file systems use, decided as the image goes by: the trim of a stream.

A compressed image is decoded once, in order, and cannot be read again by position, so the
parsers of this package cannot read ahead.  :class:`StreamSelector` is shown the decoded
stream in order (:meth:`~StreamSelector.saw`) and asked, before each run of bytes is read,
whether to write it (:meth:`~StreamSelector.decide`).  It runs the same parsers (partition
tables, ext descriptors and bitmaps, the FAT) against the bytes the stream has passed: a
parser that asks for bytes not yet decoded raises a private :class:`NotYet`, which records
the range wanted; only wanted bytes are kept (metadata, at most :data:`CAP`), and the parser
runs again once the stream has passed them.

Until something is known it is written: the image's head, the whole image until its table is
read (an MBR's logical partitions' boot records may come late), each partition until its file
system is read, and each ext group until its block bitmap went by (ext keeps its bitmaps ahead
of the data in usual layouts; a bitmap placed after data it governs leaves that data
written).  Bytes outside partitions, file systems not understood and metadata that contradicts
itself are written whole, with the notes :func:`popsicle_py.usage.image_usage` gives.  A
skip once carried out cannot be taken back: a group whose bitmap turns out wrong after earlier
groups were trimmed leaves the rest of its partition written whole, from there on (each
group's bitmap is checked on its own, its checksum and free count, before any byte of it is
skipped).
"""

from __future__ import annotations

import bisect
import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from popsicle_py.usage import Usage, ext, fat, partitions
from popsicle_py.usage.partitions import Partition
from popsicle_py.usage.ranges import ALIGN, Inconsistent, Range, ReadAt, Unsupported, normalize

#: The image's head (popsicle_py.engine.head.HEAD): always written, by the engine last.
HEAD = 1 << 20
#: Metadata kept from the stream at most; beyond, what it would have told is written whole.
CAP = 64 << 20
#: The size assumed for a stream whose decoded size is not known in advance.
UNKNOWN = 1 << 62

#: What a parser raises on metadata that makes no sense (see image_usage).
_BAD = (Inconsistent, Unsupported, struct.error, ValueError, IndexError, OverflowError)


class NotYet(Exception):
    """A parser asked for bytes the stream has not passed yet."""

    def __init__(self, offset: int, length: int) -> None:
        super().__init__(offset, length)
        self.offset = offset
        self.length = length


#: Given the wanted bytes, or why they cannot be had (passed already, or too many).
Handler = Callable[[bytes | str], None]


@dataclass
class _Want:
    start: int
    end: int
    handler: Handler
    data: bytearray = field(default_factory=bytearray)  # captured from start on


@dataclass
class _Part:
    """A partition being read: its skipped bytes, groups still undecided, free blocks."""

    part: Partition
    layout: ext.Layout | None = None
    pending: int = 0
    free: int = 0
    skipped: int = 0
    failed: bool = False


@dataclass
class _Region:
    """Bytes [start, end): ``used`` None while undecided (written as they pass), else the
    ranges written (sorted, merged)."""

    start: int
    end: int
    used: tuple[Range, ...] | None = None
    part: _Part | None = None


class _Store:
    """Bytes captured at their offsets, for a parser run again."""

    def __init__(self) -> None:
        self.pieces: dict[int, bytes] = {}

    def add(self, offset: int, data: bytes) -> None:
        self.pieces[offset] = data

    def get(self, offset: int, end: int) -> bytes | None:
        for start, data in self.pieces.items():
            if start <= offset and end <= start + len(data):
                return data[offset - start : end - start]
        return None

    @property
    def size(self) -> int:
        return sum(len(d) for d in self.pieces.values())


def _probe(read_at: ReadAt, part: Partition) -> ext.Layout | tuple[list[Range], str]:
    """An ext file system's layout, or a FAT volume's used ranges; Unsupported otherwise."""
    read_at(part.offset, min(part.length, 4096))  # in order: a stream passes by once
    if ext.is_ext(read_at, part.offset):
        return ext.layout(read_at, part.offset, part.length)
    if fat.is_fat(read_at, part.offset):
        return fat.used_ranges(read_at, part.offset, part.length)
    raise Unsupported("no ext2/3/4 or FAT file system")


def _clip(ranges: list[Range], start: int, end: int, size: int) -> tuple[Range, ...]:
    """``ranges`` normalized (4 KiB, small gaps merged) and clipped to [start, end)."""
    out = []
    for offset, length in normalize(ranges, size):
        a, b = max(offset, start), min(offset + length, end)
        if a < b:
            out.append((a, b - a))
    return tuple(out)


class StreamSelector:
    """Which bytes of a stream of ``size`` bytes (None: not known) to write; see the module.

    Not thread-safe: the reader's thread alone calls :meth:`decide` and :meth:`saw`;
    :attr:`skipped` may be read from any thread.
    """

    def __init__(self, size: int | None, cap: int = CAP) -> None:
        self.size = size or UNKNOWN
        self.cap = cap
        self.skipped = 0  # bytes decided against and passed
        self.found: list[str] = []
        self.notes: list[str] = []
        self.pos = 0
        self._regions = [_Region(0, self.size)]
        self._starts = [0]
        self._wants: list[_Want] = []
        self._held = 0  # bytes wanted or captured, against the cap
        self._chunk: tuple[int, memoryview] | None = None
        self._ready: list[tuple[Handler, bytes | str]] = []
        self._skip: tuple[int, int, _Part | None] = (0, 0, None)  # the last skip decided
        self._job(partitions_or_whole(self.size), self._table, "the partition table")
        self._drain()

    # ------------------------------------------------------------------------------------
    # The reader's side.

    def decide(self, offset: int, limit: int) -> tuple[bool, int]:
        """(write it, length): the longest run from ``offset`` (at most ``limit``) with one
        decision.  Runs begin and end on 4 KiB boundaries (but at the image's end)."""
        if limit >= ALIGN:
            limit -= limit % ALIGN
        if offset < self.size:
            limit = min(limit, self.size - offset)
        if offset < HEAD:
            return True, min(limit, HEAD - offset)
        index = bisect.bisect_right(self._starts, offset) - 1
        region = self._regions[index] if index >= 0 else None
        if region is None or offset >= region.end:
            return True, limit
        if region.used is None:
            ends = [w.end for w in self._wants if w.end > offset]
            end = min([region.end, *ends])
            return True, min(limit, self._up(end) - offset)
        for start, length in region.used:
            if start <= offset < start + length:
                return True, min(limit, self._up(start + length) - offset)
        end = self._free_until(index, offset, offset + limit)
        end -= end % ALIGN
        if end <= offset:  # a free piece shorter than a block: written
            return True, min(limit, ALIGN)
        length = end - offset
        self._skip = (offset, offset + length, region.part)
        return False, length

    def _free_until(self, index: int, offset: int, most: int) -> int:
        """Where the free bytes from ``offset`` (in region ``index``) end, across regions
        (a free run split by a group's boundary is one), at most ``most``."""
        regions = self._regions
        while index < len(regions) and offset < most:
            region = regions[index]
            if region.used is None:
                return offset
            for start, length in region.used:
                if start + length > offset:
                    return min(most, max(start, offset))
            offset = region.end
            index += 1
        return min(most, offset)

    def saw(self, offset: int, data: memoryview | bytes) -> None:
        """The next bytes of the stream, at ``offset`` (always where the last ones ended)."""
        if offset != self.pos:
            raise ValueError(f"the stream is shown in order: {offset} after {self.pos}")
        end = offset + len(data)
        first, last, part = self._skip
        a, b = max(offset, first), min(end, last)
        if a < b:
            self.skipped += b - a
            if part is not None:
                part.skipped += b - a
        view = memoryview(data)
        for want in self._wants:
            if want.start >= end:
                break
            at = want.start + len(want.data)
            if at < end:
                want.data += view[at - offset : min(end, want.end) - offset]
        self.pos = end
        self._chunk = (offset, view)
        try:
            done = [w for w in self._wants if w.end <= end]
            if done:  # handlers add only wants that end later (or answer at once)
                self._wants = [w for w in self._wants if w.end > end]
                for want in done:
                    self._held -= want.end - want.start
                    self._ready.append((want.handler, bytes(want.data)))
            self._drain()
        finally:
            self._chunk = None

    @property
    def kept(self) -> int:
        """Bytes passed and written so far."""
        return self.pos - self.skipped

    # ------------------------------------------------------------------------------------
    # Wanting bytes.

    def _up(self, end: int) -> int:
        return min(self.size, -(-end // ALIGN) * ALIGN)

    def _drain(self) -> None:
        while self._ready:
            handler, data = self._ready.pop(0)
            handler(data)

    def _want(self, start: int, end: int, handler: Handler) -> None:
        """Call ``handler`` with bytes [start, end) once the stream has passed them."""
        end = min(end, self.size)
        chunk = self._chunk
        have = bytearray()
        if start < self.pos:
            if chunk is None or start < chunk[0]:
                self._ready.append((handler, "was passed before what locates it was read"))
                return
            have += chunk[1][start - chunk[0] : min(end, self.pos) - chunk[0]]
            if end <= self.pos:
                self._ready.append((handler, bytes(have)))
                return
        if self._held + end - start > self.cap:
            self._ready.append((handler, f"is more than the {self.cap >> 20} MiB of metadata "
                                         "kept"))
            return
        self._held += end - start
        want = _Want(start, end, handler, have)
        keys = [(w.start, w.end) for w in self._wants]
        self._wants.insert(bisect.bisect_right(keys, (start, end)), want)

    def _job(self, parse: Callable[[ReadAt], object],
             done: Callable[[object], None], what: str) -> None:
        """Run ``parse(read_at)`` now and again each time the bytes it wanted have passed;
        ``done`` gets its result, or the exception that ended it (a str: bytes missed)."""
        store = _Store()

        def read_at(offset: int, length: int) -> bytes:
            end = min(offset + length, self.size)
            if end <= offset:
                return b""
            got = store.get(offset, end)
            if got is None:
                raise NotYet(offset, end - offset)
            return got

        def run() -> None:
            try:
                result = parse(read_at)
            except NotYet as wanted:
                start = wanted.offset

                def arrived(data: bytes | str) -> None:
                    if isinstance(data, str):
                        self._held -= store.size
                        done(f"{what} {data}")
                        return
                    store.add(start, data)
                    self._held += len(data)
                    run()
                self._want(start, start + wanted.length, arrived)
                return
            except _BAD as exc:
                result = exc
            self._held -= store.size
            store.pieces.clear()
            done(result)

        run()

    # ------------------------------------------------------------------------------------
    # What was found.

    def _region(self, offset: int) -> int:
        return bisect.bisect_right(self._starts, offset) - 1

    def _split(self, start: int, end: int, new: list[_Region]) -> None:
        """The undecided region holding [start, end) gets ``new`` there (sorted, covering)."""
        index = self._region(start)
        old = self._regions[index]
        pieces = []
        if old.start < start:
            pieces.append(_Region(old.start, start, None, old.part))
        pieces.extend(new)
        if end < old.end:
            pieces.append(_Region(end, old.end, None, old.part))
        self._regions[index : index + 1] = pieces
        self._starts = [r.start for r in self._regions]

    def _whole(self, start: int, end: int, part: _Part | None = None) -> _Region:
        return _Region(start, end, ((start, end - start),), part)

    def _table(self, result: object) -> None:
        if isinstance(result, Usage):
            self.notes.extend(result.notes)
            self._split(0, self.size, [self._whole(0, self.size)])
            return
        if not isinstance(result, list):
            why = result if isinstance(result, str) else f"the partition table: {result}"
            self.notes.append(f"{why}: written whole")
            self._split(0, self.size, [self._whole(0, self.size)])
            return
        parts: list[Partition] = result
        regions: list[_Region] = []
        position = 0
        for part in parts:
            if position < part.offset:
                regions.append(self._whole(position, part.offset))  # between partitions
            regions.append(_Region(part.offset, part.end, None, _Part(part)))
            position = part.end
        if position < self.size:
            regions.append(self._whole(position, self.size))
        self._split(0, self.size, regions)
        for region in regions:
            if region.part is not None:
                self._read_part(region.part)

    def _read_part(self, state: _Part) -> None:
        part = state.part

        def done(result: object) -> None:
            if isinstance(result, ext.Layout):
                self._ext(state, result)
            elif isinstance(result, tuple):
                ranges, what = result
                if any(n < 0 or o < part.offset or o + n > part.end for o, n in ranges):
                    self._fail(state, "its allocation points outside its partition")
                    return
                self._decide(part.offset, part.end, _clip(ranges, part.offset, part.end,
                                                          self.size), state)
                self.found.append(f"{part.name}: {what}")
            elif isinstance(result, (struct.error, ValueError, IndexError, OverflowError)):
                self._fail(state, f"its metadata makes no sense ({result})")
            else:
                self._fail(state, str(result))

        self._job(lambda read_at: _probe(read_at, part), done, "its metadata")

    def _fail(self, state: _Part, why: str) -> None:
        """Every byte of the partition not yet passed written, decided or not (those skipped
        stay skipped: a decision once carried out cannot be taken back)."""
        state.failed = True
        part = state.part
        rest = " from here on" if state.skipped else ""
        self.notes.append(f"{part.name}: {why}: written whole{rest}")
        for region in self._regions:
            if region.part is state and region.end > self.pos:
                region.used = ((region.start, region.end - region.start),)

    def _decide(self, start: int, end: int, used: tuple[Range, ...], state: _Part) -> None:
        index = self._region(start)
        region = self._regions[index]
        if region.start == start and region.end == end and region.used is None:
            region.used = used
        else:
            self._split(start, end, [_Region(start, end, used, state)])

    def _ext(self, state: _Part, lay: ext.Layout) -> None:
        """Each group undecided until its bitmap went by (BLOCK_UNINIT ones decided now)."""
        part = state.part
        state.layout = lay
        tail = lay.fixed[1]
        first = lay.span(0)[0]
        regions = []
        if part.offset < first:
            regions.append(self._whole(part.offset, first, state))
        for index in range(len(lay.groups)):
            start, length = lay.span(index)
            regions.append(_Region(start, start + length, None, state))
        if tail[1] > 0:
            regions.append(self._whole(tail[0], tail[0] + tail[1], state))
        self._split(part.offset, part.end, regions)
        state.pending = len(lay.groups)
        for index in range(len(lay.groups)):
            try:
                where = lay.bitmap(index)
            except _BAD as exc:
                self._fail(state, str(exc))
                return
            if where is None:
                self._group(state, index, None)
            else:
                self._want(where[0], where[0] + where[1],
                           functools.partial(self._group, state, index))
            if state.failed:
                return

    def _group(self, state: _Part, index: int, bitmap: bytes | str | None) -> None:
        lay = state.layout
        if state.failed or lay is None:
            return
        part = state.part
        start, length = lay.span(index)
        state.pending -= 1
        if isinstance(bitmap, str):  # passed before its descriptor was read: written
            self.notes.append(f"{part.name}: group {index}'s block bitmap {bitmap}: that "
                              "group written whole")
            self._decide(start, start + length, ((start, length),), state)
        else:
            try:
                used, free = lay.used(index, bitmap)
            except _BAD as exc:
                self._fail(state, str(exc))
                return
            if any(n < 0 or o < part.offset or o + n > part.end for o, n in used):
                self._fail(state, "its allocation points outside its partition")
                return
            state.free += free
            self._decide(start, start + length,
                         _clip([*used, lay.fixed[0]], start, start + length, self.size), state)
        if state.pending == 0:
            self.found.append(f"{part.name}: {ext.describe(lay, state.free)}")


def partitions_or_whole(size: int) -> Callable[[ReadAt], list[Partition] | Usage]:
    """The table's parser as :class:`StreamSelector` runs it."""
    def parse(read_at: ReadAt) -> list[Partition] | Usage:
        read_at(0, 64 << 10)  # in order: the table, GPT entries, ISO 9660 descriptors
        return partitions(read_at, size)
    return parse
