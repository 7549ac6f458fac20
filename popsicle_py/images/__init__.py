"""Source images as people download them: raw or compressed, with optional checksums.

The package's modules, bottom up (each imports only those before it):

- files.py: ImageError and opening a file with one-line refusals;
- magic.py: what the first and last bytes say, strictly (as each format's own tool) or with a
  damaged header;
- sizes.py: an xz index, zstd frames and a zip directory read without decoding;
- decoders.py: the decompressing streams, strict about every way a stream can end badly;
- checksums.py: --sha256/--checksum, checksum files beside the image, hashing the download;
- formats.py: the format registry, one :class:`Format` record per kind of file, decoded or
  refused with advice;
- image.py: :class:`Image` and :func:`open_image`, which ask the registry, layer by layer;
- stdin.py: standard input as the image (``-``), read once.

Every name that was importable from the old single module ``popsicle_py.images`` still is.
"""

from popsicle_py.images.checksums import (
    Checksum,
    ChecksumCancelled,
    ChecksumTap,
    choose_sidecar,
    find_sidecar,
    new_hasher,
    parse_checksum_option,
    verify_checksum,
)
from popsicle_py.images.decoders import read_decoded
from popsicle_py.images.files import ImageError
from popsicle_py.images.formats import (
    FORMATS,
    REGISTRY,
    Format,
    by_name,
    by_suffix,
    damaged,
    detect,
    detect_format,
    judge,
    name_warning,
)
from popsicle_py.images.image import Image, decompress_to, open_image, open_stream, read_head
from popsicle_py.images.stdin import StdinImage, open_stdin

__all__ = [
    "FORMATS",
    "REGISTRY",
    "Checksum",
    "ChecksumCancelled",
    "ChecksumTap",
    "Format",
    "Image",
    "ImageError",
    "StdinImage",
    "by_name",
    "by_suffix",
    "choose_sidecar",
    "damaged",
    "decompress_to",
    "detect",
    "detect_format",
    "find_sidecar",
    "judge",
    "name_warning",
    "new_hasher",
    "open_image",
    "open_stdin",
    "open_stream",
    "parse_checksum_option",
    "read_decoded",
    "read_head",
    "verify_checksum",
]
