"""The image side of a request: open a file or a URL, find its checksum, judge what it is.

Everything here runs before any drive is opened; every problem is a :class:`Refused` (exit 2).
The HTTP client is imported only when the image is a URL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
import stat
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

from popsicle_py import events, sanity
from popsicle_py.app.requests import SourceOptions
from popsicle_py.bmap import Bmap, BmapError
from popsicle_py.bmap import load as load_bmap
from popsicle_py.bmap import sidecar as bmap_sidecar
from popsicle_py.errors import Refused
from popsicle_py.images import (
    Checksum,
    Image,
    ImageError,
    StdinImage,
    find_sidecar,
    open_image,
    open_stdin,
    parse_checksum_option,
    read_head,
    verify_checksum,
)
from popsicle_py.images.formats import Format, unchecked_note
from popsicle_py.images.sample import Sample, runnable
from popsicle_py.images.stdin import SAVED as STDIN_SAVED
from popsicle_py.images.stdin import SHOWN as STDIN_SHOWN
from popsicle_py.images.stillness import holding_still
from popsicle_py.protocols import Source
from popsicle_py.records import record
from popsicle_py.signals import Cancellation

if TYPE_CHECKING:
    from popsicle_py.cache import Cache

Emit = Callable[[events.WatchEvent], None]
T = TypeVar("T")


def remote() -> ModuleType:
    """The download code, imported on first use: urllib3 is needed only for URLs."""
    return importlib.import_module("popsicle_py.remote")


def download_cache(wanted: bool | None) -> Cache | None:
    """The cache of downloaded images, when used (imported for URLs only)."""
    from popsicle_py.cache import Cache, cache_wanted

    return Cache() if cache_wanted(wanted) else None


def is_url(text: str) -> bool:
    """http:// and https:// addresses (what flash, watch and verify download)."""
    return text[:8].lower().startswith(("http://", "https://"))


_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")


def refuse_other_schemes(text: str) -> None:
    """A URL of a scheme that is not downloaded (ftp://, file://, ...) is named as such,
    rather than looked for as a file that does not exist."""
    m = _SCHEME.match(text)
    if m and not is_url(text) and not os.path.exists(text):
        shown = remote().hidden_credentials(text)  # never a password
        raise ImageError(f"{shown}: {m[1]}:// URLs are not supported, only http:// and "
                         "https:// URLs (download the image and give the file)")


def shown_name(text: str) -> str:
    """The image as messages name it: a URL without its ``user:password@`` (never shown)."""
    return remote().without_credentials(text)[0] if is_url(text) else text


def is_stdin(text: str) -> bool:
    """``-``: the image comes from standard input."""
    return text == "-"


@record
class OpenedSource:
    """The image, the checksum to check before writing (None: none, or checked in the write
    pass), and notes to show (a signature that verified, a cached copy used)."""

    image: Source
    checksum: Checksum | None
    notes: tuple[str, ...] = ()
    #: Raises if the image file changed since it was opened (see :mod:`.images.stillness`).
    still: Callable[[], None] | None = None

    @property
    def local(self) -> bool:
        """A file on this machine (not a download)."""
        return isinstance(self.image, Image)


def open_source(options: SourceOptions) -> OpenedSource:
    """Open ``options.image``: a URL is probed (its published checksum found), a file opened
    and its checksum (given, or a sidecar) and signature found.

    For a URL the published checksum is checked by the download stream itself, in the write
    pass, so none is returned unless a cached copy is used.
    """
    given = [name for name, value in (("--sha256", options.sha256),
                                      ("--checksum", options.checksum)) if value]
    if options.no_checksum and given:
        raise Refused([f"--no-checksum and {given[0]} contradict each other; give one"])
    refuse_other_schemes(options.image)
    if is_stdin(options.image):
        if options.keyring is not None:
            raise ImageError("--keyring checks a published checksum file, and standard input "
                             "has none beside it")
        # Checked by the stream itself as it passes: it cannot be read a second time.
        return OpenedSource(open_stdin(parse_checksum_option(options.sha256,
                                                             options.checksum)), None)
    if is_url(options.image):
        opened = remote().open_url(options.image, sha256=options.sha256,
                                   checksum=options.checksum,
                                   no_checksum=options.no_checksum, keyring=options.keyring,
                                   cache=download_cache(options.use_cache))
        return OpenedSource(opened.image, opened.prepass, tuple(opened.notes), opened.still)
    try:
        img = open_image(options.image)
    except ImageError as exc:  # `simg2img X.gz (inside its gzip layer) ...` names no file
        raise ImageError(runnable(str(exc), os.path.abspath(options.image))) from None
    expected = parse_checksum_option(options.sha256, options.checksum)
    if expected is None and not options.no_checksum:
        expected = find_sidecar(img.path)
    notes = []
    if options.keyring is not None:
        if expected is None or expected.source.startswith("--"):
            raise ImageError("--keyring checks a published checksum file (SHA256SUMS, "
                             "IMAGE.sha256 ...) and none is used here")
        signature = remote().check_signature(expected.source, remote().read_local,
                                             options.keyring)
        notes.append(f"signature ok: {signature} (keyring {options.keyring})")
    return OpenedSource(img, expected, tuple(notes), holding_still(img.path))


def watched_checks(checks: Callable[[], T], image: str, stall_timeout: float | None) -> T:
    """``checks()`` (opening and judging the image) on a thread of its own: a file on a hung
    disk or network share holds that thread, not the command.  Ctrl-C is heard at once, and a
    read that does not return for ``stall_timeout`` refuses the image (a download is left to
    its own timeouts)."""
    from popsicle_py.engine.watched import WorkStalled, watched_calls
    from popsicle_py.failures import hung_check

    local = not is_url(image)  # a download's socket dies with the process: no note for it
    # Nor a pipe: a read of it ends with the process.
    note = (hung_check(image, "a read of the image to check it")
            if local and not is_stdin(image) else None)
    try:
        return watched_calls(checks, stall_timeout=stall_timeout if local else None,
                             name="image-checks", hung_note=note)
    except WorkStalled as exc:
        if is_stdin(image):  # a pipe: its writer is what stopped, no disk
            raise ImageError(f"{STDIN_SHOWN} gave nothing for {exc.limit:g} s while its start "
                             "was read to judge it (is the program feeding the pipe stuck, or "
                             "waiting for input itself?)") from None
        raise ImageError(f"{image} stopped answering while it was opened and checked: no "
                         f"answer for {exc.limit:g} s (is the disk or network share it is on "
                         "hung?)") from None


def is_drive(path: str) -> bool:
    """A block device named as the image: a master drive, read once as a whole."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def source_check(source: OpenedSource) -> Callable[[], None] | None:
    """What the engine calls once the image is read, before any drive gets its head: a
    master drive was not written, an image file not changed, meanwhile (None: a download or
    a pipe, read once and checked by its own checksum, if any)."""
    if is_drive(source.image.path):
        from popsicle_py.master import Stillness  # imported for a master drive only

        return Stillness(source.image.path).check
    return source.still


def require_still(path: str) -> None:
    """A master drive must hold still while it is read, and be read as it is: refuse it
    mounted (its cached blocks may differ from the drive's, even read-only), stacked under
    another device or open for writing (see :mod:`popsicle_py.master`)."""
    if not is_drive(path):
        return
    from popsicle_py import master  # imported for a master drive only

    if lines := master.refusals(path, cached=True):
        raise Refused(lines)


def open_for_reading(image: str) -> Source:
    """The image ``verify`` compares with: streamed once like a flash, no checksum."""
    refuse_other_schemes(image)
    if is_stdin(image):
        return open_stdin()
    if is_url(image):
        image_: Source = remote().open_url(image, no_checksum=True,
                                           cache=download_cache(None)).image
        return image_
    return open_image(image)


def sanity_note(source: OpenedSource, shown: str, force: bool) -> str | None:
    """Refuse an image that is not a disk image (a failed download) unless ``force``; else a
    note for an image that is unusual but may be right.

    A file is judged by its decoded head; a download or standard input by the start read and
    decoded before any drive is opened (its ``sample``), with the same rules and words; a zip
    at a URL once it is downloaded (:func:`download_first`'s ``judged``, still before any
    drive).  A head
    that cannot be decoded is left to the job, which fails every drive naming the image and
    the offset (as for damage further in), exactly as without this check.
    """
    shown = shown_name(shown)
    notes = [_judged(source, shown, force), _unchecked(source, shown)]
    return "; ".join(note for note in notes if note) or None


def _judged(source: OpenedSource, shown: str, force: bool) -> str | None:
    img = source.image
    if isinstance(img, Image):
        return _judge_file(img, shown, force)
    warning: str | None = getattr(img, "warning", None)
    if img.kind.needs_whole_file:  # judged once downloaded: download_first(judged=...)
        return None
    sample = getattr(img, "sample", None)  # read up front (images/sample.py)
    if not isinstance(sample, Sample) or sample.head is None:
        return None
    return _verdict(sample.head, len(sample.head) if sample.complete else None, img.kind,
                    warning, (), STDIN_SHOWN if is_stdin(shown) else shown, force)


def _unchecked(source: OpenedSource, shown: str) -> str | None:
    """A note for a file without an integrity check of its own (xz --check=none, zstd
    --no-check, .lzma) when no checksum is checked either: damage to it would be written,
    and every drive would read back right."""
    img = source.image
    how: str | None = getattr(img, "unchecked", None)
    if how is None or source.checksum is not None or getattr(img, "checksum", None) is not None:
        return None
    if is_stdin(shown):
        return unchecked_note(how, STDIN_SHOWN, beside=False)
    return unchecked_note(how, shown)


def _judge_file(img: Image, shown: str, force: bool) -> str | None:
    try:
        head = read_head(img, sanity.HEAD_SIZE)
        if sanity.needs_more(head):  # an ISO without a boot record: what does it hold?
            head = read_head(img, sanity.ISO_SCAN)
    except ImageError:
        return None
    return _verdict(head, img.size, img.kind, img.warning, img.layers, shown, force)


def _verdict(head: bytes, size: int | None, kind: Format, warning: str | None,
             layers: tuple[str, ...], shown: str, force: bool) -> str | None:
    if warning is not None and not kind.decoded and sanity.signature(head) is None:
        # Named .xz (or .gz ...) and neither that nor a disk image: a damaged download.
        raise ImageError(f"{warning.split(';')[0]}, and no disk image signature either: "
                         "it looks damaged; download it again (not written, even with --force)")
    notes = [warning] if warning else []
    if layers:
        notes.append(f"{shown}: decoding {len(layers) + 1} layers: "
                     f"{', then '.join((kind.name, *layers))}")
    verdict = sanity.check(head, size, shown)
    if verdict.refusal is None:
        return "; ".join([*notes, verdict.note] if verdict.note else notes) or None
    if not force:
        raise Refused([f"{verdict.refusal}; --force writes it anyway"])
    return "; ".join([*notes, f"{verdict.refusal}; writing it anyway (--force)"])


def block_map(image: Source, given: str | None, ignore: bool) -> Bmap | None:
    """The block map named, or the one next to the image; checked against the image."""
    if ignore:
        if given is not None:
            raise Refused([f"--bmap {given} and --no-bmap contradict each other; give one"])
        return None
    if is_url(image.path) or isinstance(image, StdinImage):
        if given:
            raise BmapError("--bmap cannot be used with a URL or standard input yet; save "
                            "the image to a file first")
        return None
    path = given or bmap_sidecar(image.path)
    return None if path is None else load_bmap(path, image.size)


def attach(image: Source, emit: Callable[[events.Event], None], cancel: Cancellation) -> None:
    """Download news of a URL's image to ``emit`` (nothing to do for a local image)."""
    if not isinstance(image, Image):
        remote().attach(image, emit, cancel)


def download_first(image: Source, emit: Emit, cancel: Cancellation, tmpdir: str,
                   stack: contextlib.ExitStack, judged: tuple[str, bool] | None = None,
                   stall_timeout: float | None = None) -> Image | None:
    """A URL (or standard input) read from start to end into a file before writing (watch,
    zip); None if cancelled.  The copy is removed when ``stack`` closes.

    ``judged`` (the name shown, --force): a zip at a URL, which :func:`sanity_note` could not
    judge from its start, is judged now, as a file is, before any drive is opened.
    ``stall_timeout``: the run's, for the download's stall rule (default 60 s)."""
    if isinstance(image, Image):
        return image
    if isinstance(image, StdinImage):  # read once, into a private file removed at the end
        path = image.save(tmpdir)
        stack.callback(os.unlink, path)
        try:  # named as the user gave it: the private copy is no name of theirs
            return open_image(path, STDIN_SHOWN)
        except ImageError as exc:
            raise ImageError(runnable(str(exc), STDIN_SHOWN, STDIN_SAVED)) from None
    local, cleanup = remote().materialize(image, emit, cancel, tmpdir, stall_timeout)
    stack.callback(cleanup)
    if local is not None and judged is not None and image.kind.needs_whole_file:
        copy = dataclasses.replace(local, warning=getattr(image, "warning", None))
        if (note := _judge_file(copy, shown_name(judged[0]), judged[1])) is not None:
            emit(events.Note(note))
    return local  # type: ignore[no-any-return]


def check_checksum(image: Source, checksum: Checksum, emit: Emit, cancel: Cancellation,
                   stall_timeout: float | None) -> None:
    """Read the whole file once against its checksum, before anything is written (an image
    that stops answering for ``stall_timeout`` is refused)."""
    emit(events.Phase(None, events.Step.CHECKSUM, checksum.source))

    def progress(done: int, total: int) -> None:
        emit(events.Progress(None, events.Step.CHECKSUM, done, total))

    verify_checksum(image.path, checksum, progress, cancel,
                    image.format if image.compressed else None, stall_timeout)
    emit(events.Note(f"checksum ok ({checksum.algo} from {checksum.source})"))
