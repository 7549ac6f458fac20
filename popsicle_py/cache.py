"""Downloaded images kept for the next flash: one file per URL and server version.

An entry is keyed by the URL and the server's validator (ETag, else Last-Modified), so a file
that changed on the server is never served from an old copy.  Entries appear only complete:
the bytes go to a file without a name (else ``KEY.*.part``) that becomes ``KEY.img`` once the
whole body arrived (and matched its published checksum, when there is one), so that a run cut
short leaves nothing behind; ``KEY.json`` says what the entry is, with
the SHA-256 of its bytes as they arrived, so that a copy damaged since is never written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from popsicle_py import files
from popsicle_py.records import record

__all__ = ["Cache", "CacheEntry", "CacheWriter", "cache_root", "cache_wanted"]

#: Set to 1 (or yes/true/on) to use the cache without --cache.
ENV_CACHE = "POPSICLE_PY_CACHE"


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """$XDG_CACHE_HOME/popsicle-py, else ~/.cache/popsicle-py (the XDG base directory rule)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):  # the spec says relative values are to be ignored
        base = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return Path(base) / "popsicle-py"


def cache_wanted(flag: bool | None, env: Mapping[str, str] | None = None) -> bool:
    """--cache / --no-cache when given, else the POPSICLE_PY_CACHE default (off)."""
    if flag is not None:
        return flag
    env = os.environ if env is None else env
    return env.get(ENV_CACHE, "").strip().lower() in ("1", "yes", "true", "on")


def cache_key(url: str, validator: str) -> str:
    """The file name of an entry: the same URL at another server version gets another key."""
    import hashlib

    return hashlib.sha256(f"{url}\0{validator}".encode()).hexdigest()[:32]


@record
class CacheEntry:
    """One complete download."""

    key: str
    url: str
    validator: str
    size: int
    path: Path
    created: float
    sha256: str | None = None  # of the bytes as they arrived (None: an older entry)


class CacheWriter:
    """Receives the bytes of one download; commit() makes the entry, abort() forgets them.

    The bytes go to a file without a name (O_TMPFILE) that commit() links into the cache: a
    run that ends without either (Ctrl-C while the download is read, a kill) leaves nothing
    behind, and two runs of one URL never write into each other's file.  Where the file
    system cannot (no O_TMPFILE), a ``.part`` file of this writer's own is used.
    """

    def __init__(self, cache: Cache, url: str, validator: str) -> None:
        self.cache = cache
        self.url = url
        self.validator = validator
        self.key = cache_key(url, validator)
        self.where = str(cache.root)
        cache.root.mkdir(parents=True, exist_ok=True)
        self.part: Path | None = None  # a named file, where O_TMPFILE is not available
        self._file = self._unnamed() or self._named()  # closed by commit() or abort()
        self._linked: Path | None = None  # the name commit() gave the file, until renamed
        self._placed = False  # commit() put the data file in place (abort() removes it)
        self._meta: Path | None = None  # the description, until renamed
        self.size = 0

    def _unnamed(self) -> BinaryIO | None:
        flag = getattr(os, "O_TMPFILE", 0)
        if not flag or not os.path.isdir("/proc/self/fd"):
            return None
        try:
            fd = os.open(self.cache.root, flag | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return None  # this file system cannot: a named file instead
            raise
        return os.fdopen(fd, "wb")

    def _named(self) -> BinaryIO:
        self.part = self.cache.root / f"{self.key}.{os.getpid()}-{secrets.token_hex(4)}.part"
        return files.create_regular(self.part, exclusive=True)

    @property
    def path(self) -> Path:
        return self.cache.root / f"{self.key}.img"

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self.size += len(data)

    def commit(self, sha256: str | None = None) -> Path:
        """Make the entry visible: data first, then the description that lookup() requires
        (with ``sha256``, the digest of the bytes written)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.part is None:  # give the unnamed file a name of its own, then the entry's
            name = f"{self.key}.{secrets.token_hex(4)}.part"
            folder = os.open(self.cache.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:  # a directory descriptor makes it linkat(), which follows /proc's link
                os.link(f"/proc/self/fd/{self._file.fileno()}", name, dst_dir_fd=folder,
                        follow_symlinks=True)
            finally:
                os.close(folder)
            self._linked = self.cache.root / name
        self._file.close()
        named = self._linked or self.part
        assert named is not None
        os.replace(named, self.path)
        self._linked = self.part = None
        self._placed = True
        meta = {"url": self.url, "validator": self.validator, "size": self.size,
                "created": time.time(), "sha256": sha256}
        self._meta = self.cache.root / f"{self.key}.{secrets.token_hex(4)}.json.part"
        with files.create_regular(self._meta, exclusive=True) as f:
            f.write(json.dumps(meta).encode())
        os.replace(self._meta, self.cache.root / f"{self.key}.json")
        self._meta = None
        return self.path

    def abort(self) -> None:
        """Forget the bytes (also after a failed commit: its data file goes too)."""
        with contextlib.suppress(OSError):
            self._file.close()
        leftovers = [self.part, self._linked, self._meta]
        if self._placed:
            leftovers.append(self.path)
        for leftover in leftovers:
            if leftover is not None:
                with contextlib.suppress(OSError):
                    leftover.unlink()


class Cache:
    """The cache directory; every method tolerates entries damaged or removed behind its back."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root()

    def lookup(self, url: str, validator: str) -> CacheEntry | None:
        """The complete entry for this URL at this server version, if there is one."""
        entry = self._read(cache_key(url, validator))
        if entry is None or entry.url != url or entry.validator != validator:
            return None
        return entry

    def writer(self, url: str, validator: str) -> CacheWriter:
        return CacheWriter(self, url, validator)

    def entries(self) -> list[CacheEntry]:
        if not self.root.is_dir():
            return []
        found = [self._read(p.stem) for p in sorted(self.root.glob("*.json"))]
        return sorted((e for e in found if e is not None), key=lambda e: e.created)

    def clean(self) -> tuple[int, int]:
        """Remove every entry and leftover partial download; (entries removed, bytes freed)."""
        count = freed = 0
        if not self.root.is_dir():
            return 0, 0
        for path in self.root.iterdir():
            if path.suffix not in (".img", ".json", ".part"):
                continue  # not ours: leave it
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                path.unlink()
                freed += size
                count += path.suffix == ".img"
        return count, freed

    def _read(self, key: str) -> CacheEntry | None:
        try:
            meta = json.loads((self.root / f"{key}.json").read_text())
            path = self.root / f"{key}.img"
            size = path.stat().st_size
            digest = meta.get("sha256")
            entry = CacheEntry(key, str(meta["url"]), str(meta["validator"]), int(meta["size"]),
                               path, float(meta["created"]),
                               digest if isinstance(digest, str) else None)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return entry if entry.size == size else None
