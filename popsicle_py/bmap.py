"""bmaptool's block maps: which ranges of a sparse image hold data, and their checksums.

Format versions 1.0-1.3 (optional ``sha1`` per range, ``BmapFileSHA1``) and 2.x, with 1.4
(``ChecksumType``, ``chksum`` per range, ``BmapFileChecksum``: bmap-tools 3.0 wrote the 2.0
format as 1.4, and bmaptool reads 1.4 as 2.0) are read.  Everything is checked before a byte is
written: a malformed map, a map whose own checksum is wrong, or one whose image size
disagrees with the image is refused with one line.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from popsicle_py.errors import Refused
from popsicle_py.records import record

if TYPE_CHECKING:  # parsed only when there is a block map: not before every first write
    import xml.etree.ElementTree as ET

#: Range checksums bmaptool writes, by format major version.
_ALGOS = ("sha1", "sha256")
#: The most of a block map read: bmaptool's for a large, fragmented image is a few MiB, and a
#: "map" without end (``--bmap /dev/zero``) must not take all memory.
MAX_SIZE = 64 << 20


class BmapError(Refused):
    """The block map cannot be used; ``str()`` is one line naming the file."""


@record
class Extent:
    """``length`` bytes of data at ``offset`` in the image (and on the drive)."""

    offset: int
    length: int
    checksum: str | None = None  # hex digest of these bytes, in the map's algorithm

    @property
    def end(self) -> int:
        return self.offset + self.length


@record
class Bmap:
    path: str
    version: str
    image_size: int
    block_size: int
    algo: str | None
    extents: tuple[Extent, ...]

    @property
    def mapped(self) -> int:
        return sum(e.length for e in self.extents)

    @property
    def unchecked(self) -> str | None:
        """Why its ranges are not checked as they are read (``bmaptool create --no-checksum``,
        format 1.0), or None: then a map of another image of the same size goes unnoticed, and
        that image's data in the map's holes is left unwritten."""
        missing = sum(1 for e in self.extents if e.checksum is None)
        if not missing:
            return None
        which = ("its ranges carry" if missing == len(self.extents)
                 else f"{missing} of its {len(self.extents)} ranges carry")
        return (f"block map {self.path}: {which} no checksum: nothing checks that it is "
                "this image's own (another image's map would leave data in its holes "
                "unwritten)")


def sidecar(image_path: str) -> str | None:
    """``IMAGE.bmap`` next to the image, also for ``IMAGE.xz`` -> ``IMAGE.bmap``."""
    candidates = [image_path + ".bmap"]
    stem, ext = os.path.splitext(image_path)
    if ext.lower() in (".gz", ".xz", ".bz2", ".zst", ".zip"):
        candidates.append(stem + ".bmap")
    return next((c for c in candidates if os.path.isfile(c)), None)


def _text(root: ET.Element, tag: str, path: str, required: bool = True) -> str | None:
    node = root.find(tag)
    if node is None or node.text is None or not node.text.strip():
        if required:
            raise BmapError(f"{path} is not a valid bmap: <{tag}> is missing")
        return None
    return node.text.strip()


def _int(root: ET.Element, tag: str, path: str) -> int:
    text = _text(root, tag, path)
    assert text is not None
    if not text.isdigit():
        raise BmapError(f"{path} is not a valid bmap: <{tag}> is not a number ({text!r})")
    return int(text)


def _check_file_checksum(raw: str, path: str, tag: str, algo: str) -> None:
    """The map's own checksum is computed with its value replaced by as many zeros."""
    match = re.search(rf"<{tag}>\s*([0-9a-fA-F]+)\s*</{tag}>", raw)
    if not match:
        return
    expected = match.group(1).lower()
    zeroed = raw[: match.start(1)] + "0" * len(match.group(1)) + raw[match.end(1) :]
    import hashlib

    actual = hashlib.new(algo, zeroed.encode()).hexdigest()
    if actual != expected:
        raise BmapError(f"{path} is corrupt: its own {algo} checksum does not match "
                        f"(expected {expected[:16]}..., got {actual[:16]}...)")


def parse(text: str, path: str = "bmap") -> Bmap:
    """Parse and check a block map's text."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise BmapError(f"{path} is not a valid bmap: {exc}") from None
    if root.tag != "bmap":
        raise BmapError(f"{path} is not a valid bmap: the root element is <{root.tag}>")
    version = root.get("version", "")
    major = version.split(".")[0]
    if major not in ("1", "2"):
        raise BmapError(f"{path}: bmap format version {version or '?'} is not supported "
                        "(1.x and 2.x are)")
    image_size = _int(root, "ImageSize", path)
    block_size = _int(root, "BlockSize", path)
    blocks = _int(root, "BlocksCount", path)
    if block_size <= 0:
        raise BmapError(f"{path} is not a valid bmap: <BlockSize> is 0")
    if blocks != -(-image_size // block_size):
        raise BmapError(f"{path} is not a valid bmap: {blocks} blocks of {block_size} bytes "
                        f"cannot hold {image_size} bytes")
    if major == "2" or version.strip() == "1.4":  # 1.4 is 2.0, as bmaptool reads it
        algo = (_text(root, "ChecksumType", path) or "").lower()
        if algo not in _ALGOS:
            raise BmapError(f"{path}: checksum type {algo!r} is not supported")
        _check_file_checksum(text, path, "BmapFileChecksum", algo)
        attr = "chksum"
    else:
        algo = "sha1"  # 1.x ranges may carry a sha1; 1.0 maps have none at all
        if root.find("BmapFileSHA1") is not None:
            _check_file_checksum(text, path, "BmapFileSHA1", "sha1")
        attr = "sha1"
    block_map = root.find("BlockMap")
    if block_map is None:
        raise BmapError(f"{path} is not a valid bmap: <BlockMap> is missing")
    extents: list[Extent] = []
    last_end = -1
    for node in block_map.findall("Range"):
        spec = (node.text or "").strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", spec)
        if not match:
            raise BmapError(f"{path} is not a valid bmap: bad range {spec!r}")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if last < first or first <= last_end or last >= blocks:
            raise BmapError(f"{path} is not a valid bmap: range {spec} is out of order or "
                            "past the image's end")
        last_end = last
        offset = first * block_size
        length = min((last + 1) * block_size, image_size) - offset
        checksum = node.get(attr)
        if checksum is not None and not re.fullmatch(r"[0-9a-fA-F]+", checksum):
            raise BmapError(f"{path} is not a valid bmap: bad checksum for range {spec}")
        extents.append(Extent(offset, length, checksum.lower() if checksum else None))
    return Bmap(path, version, image_size, block_size, algo, tuple(extents))


def load(path: str, image_size: int | None) -> Bmap:
    """Read, parse and check a block map against the image it is for."""
    try:
        with open(path, encoding="utf-8", newline="") as f:  # its checksum is of its bytes
            text = f.read(MAX_SIZE + 1)
    except FileNotFoundError:
        raise BmapError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BmapError(f"{path} cannot be read: {exc}") from None
    if len(text) > MAX_SIZE:
        raise BmapError(f"{path} is larger than {MAX_SIZE >> 20} MiB: not a block map")
    bmap = parse(text, path)
    if image_size is not None and bmap.image_size != image_size:
        raise BmapError(f"{path} is for an image of {bmap.image_size} bytes, but the image "
                        f"holds {image_size} bytes")
    return bmap
