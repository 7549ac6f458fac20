"""The settings file (TOML): what each drive's first boot is told, checked before writing.

Loading checks the file's shape (known settings, right types, template syntax); values are
templates (see :mod:`popsicle_py.settings.values`), so each drive's values are checked again
once filled in (:func:`check`).  Every problem is a :class:`SettingsError`: one line, naming the
file and the setting.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import struct
import zoneinfo
from dataclasses import field, fields
from pathlib import Path

import tomllib

from popsicle_py.records import record
from popsicle_py.settings.countries import COUNTRIES

__all__ = ["INPUT_LIMIT", "REDACTED", "SECRET_KEYS", "Settings", "SettingsError", "Wifi",
           "check", "check_format", "load_settings", "parse_settings", "read_input", "redacted"]

REDACTED = "<redacted>"
#: Settings never written in clear text anywhere but the drive's own Wi-Fi file (passphrase).
SECRET_KEYS = frozenset({"password", "password_hash", "passphrase"})


class SettingsError(ValueError):
    """A settings or values file that cannot be used: one line for the user."""


@record
class Wifi:
    ssid: str
    passphrase: str = field(default="", repr=False)  # never in a log or a traceback
    country: str = ""
    hidden: bool = False


@record
class Settings:
    """One drive's first-boot settings (templates until :func:`values.resolve` fills them)."""

    hostname: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log or a traceback
    #: Already hashed (``$6$...``), for files that should not hold a clear password.
    password_hash: str | None = field(default=None, repr=False)
    ssh: bool | None = None  # None: on when keys are given
    ssh_password_auth: bool = False
    ssh_authorized_keys: tuple[str, ...] = ()
    wifi: Wifi | None = None
    timezone: str | None = None
    keyboard: str | None = None
    locale: str | None = None
    #: Name in the boot partition -> content (read when the file is loaded).
    files: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)

    @property
    def ssh_enabled(self) -> bool:
        return self.ssh if self.ssh is not None else bool(self.ssh_authorized_keys)


_TOP = {f.name for f in fields(Settings)}
_WIFI = {f.name for f in fields(Wifi)}
_STRINGS = ("hostname", "user", "password", "password_hash", "timezone", "keyboard", "locale")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
              "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
              "sk-ecdsa-sha2-nistp256@openssh.com")
_TIMEZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*")
_KEYBOARD = re.compile(r"[a-z]{2,8}")
#: A language's locale, or C (C.UTF-8, Debian's default) or POSIX.
_LOCALE = re.compile(r"(C|POSIX|[a-z]{2,3}(_[A-Z]{2})?)(\.[A-Za-z0-9-]+)?(@[a-z]+)?")
_BOOT_NAME = re.compile(r"[A-Za-z0-9._-]{0,63}[A-Za-z0-9_-]")  # FAT drops a final "."
#: Names DOS (and so FAT drivers and mtools) take for devices, whatever the extension.
_DEVICES = frozenset({"con", "prn", "aux", "nul", *(f"com{n}" for n in range(1, 10)),
                      *(f"lpt{n}" for n in range(1, 10))})
#: C0 and C1 controls, DEL, and Unicode's line and paragraph separators: no value is more
#: than one line (a key's second line would be an unchecked key; YAML readers refuse some).
_NOT_ONE_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: crypt(3) (libxcrypt) refuses longer passwords: a longer one could never log in.
PASSWORD_BYTES = 511
_SHA512_HASH = re.compile(r"\$6\$(rounds=\d+\$)?[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{86}")
#: Names the formats write themselves: an extra file may not replace them.
RESERVED_NAMES = frozenset({"user-data", "meta-data", "network-config", "firstrun.sh",
                            "cmdline.txt"})
#: The largest extra file: it is held in memory (and must fit in the boot partition, checked
#: once the image's is known; Raspberry Pi OS's is 512 MiB, mostly firmware).
FILE_LIMIT = 256 << 20
#: The most [files]: mcopy makes a short name for each long one by trying ``NAME~1``,
#: ``NAME~2``... against the whole directory, which takes 0.1 s for 250 such names, 20 s for
#: 800 and over a minute for 1000, on each drive after its write (it then fails as stalled).
FILES_MOST = 256
#: The largest settings or values file: each is read whole (a class's CSV is a few KiB).
INPUT_LIMIT = 16 << 20
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def _str(where: str, key: str, value: object) -> str:
    if not isinstance(value, str):
        raise SettingsError(f"{where}: {key} must be a string")
    return value


def _bool(where: str, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{where}: {key} must be true or false")
    return value


def parse_settings(data: dict[str, object], where: str, base: Path) -> Settings:
    """The settings in a parsed TOML table; extra files are read relative to ``base``."""
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise SettingsError(f"{where}: unknown setting {unknown[0]!r} "
                            f"(known: {', '.join(sorted(_TOP))})")
    values: dict[str, object] = {k: _str(where, k, data[k]) for k in _STRINGS if k in data}
    for key in ("ssh", "ssh_password_auth"):
        if key in data:
            values[key] = _bool(where, key, data[key])
    keys = data.get("ssh_authorized_keys", [])
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list):
        raise SettingsError(f"{where}: ssh_authorized_keys must be a list of strings")
    values["ssh_authorized_keys"] = tuple(_str(where, "ssh_authorized_keys", k) for k in keys)
    if "wifi" in data:
        values["wifi"] = _wifi(data["wifi"], where)
    if "files" in data:
        values["files"] = _files(data["files"], where, base)
    if "password" in values and "password_hash" in values:
        raise SettingsError(f"{where}: give password or password_hash, not both")
    return Settings(**values)  # type: ignore[arg-type]


def _wifi(table: object, where: str) -> Wifi:
    if not isinstance(table, dict):
        raise SettingsError(f"{where}: [wifi] must be a table")
    unknown = sorted(set(table) - _WIFI)
    if unknown:
        raise SettingsError(f"{where}: unknown setting 'wifi.{unknown[0]}' "
                            f"(known: {', '.join(sorted(_WIFI))})")
    if "ssid" not in table:
        raise SettingsError(f"{where}: [wifi] needs an ssid")
    return Wifi(ssid=_str(where, "wifi.ssid", table["ssid"]),
                passphrase=_str(where, "wifi.passphrase", table.get("passphrase", "")),
                country=_str(where, "wifi.country", table.get("country", "")),
                hidden=_bool(where, "wifi.hidden", table.get("hidden", False)))


def _files(table: object, where: str, base: Path) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(table, dict):
        raise SettingsError(f"{where}: [files] must be a table of NAME = \"LOCAL PATH\"")
    out = []
    seen: dict[str, str] = {}
    if len(table) > FILES_MOST:
        raise SettingsError(f"{where}: [files] names {len(table)} files; at most {FILES_MOST} "
                            "(mcopy takes minutes for a thousand, on every drive after its "
                            "write: give an archive instead)")
    for name in sorted(table):  # every name first: a missing file hides no bad name
        _boot_name(name, seen, where)
    left = FILE_LIMIT  # for them all: memory holds every one of them at once
    for name, path in sorted(table.items()):
        local = base / _str(where, f"[files] {name!r}", path)
        if "\0" in str(local):  # os.open would raise ValueError
            raise SettingsError(f"{where}: [files] {name!r}: the path holds a NUL character")
        try:
            data = _read_file(local, f"{where}: [files] {name!r}: {local}", left)
            left -= len(data)
            out.append((name, data))
        except OSError as exc:
            raise SettingsError(f"{where}: [files] {name!r}: {local}: "
                                f"{exc.strerror or exc}") from None
    return tuple(out)


def _read_file(local: Path | str, where: str, limit: int = FILE_LIMIT,
               too_big: str = f"at most {FILE_LIMIT >> 20} MiB for all the [files] together"
               ) -> bytes:
    """A regular file's bytes, at most ``limit`` (what FILE_LIMIT leaves of the [files]
    read before it), judged by what was opened (not by its
    path, which can change between a check and a read): never a device read to its end
    (``/dev/zero``, a drive), never a FIFO waited on (opened without blocking)."""
    fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((k for test, k in _KINDS if test(info.st_mode)), "not a file")
            raise SettingsError(f"{where}: not a regular file ({kind})")
        if info.st_size > limit:
            raise SettingsError(f"{where}: {info.st_size} bytes; {too_big}")
        with open(fd, "rb", closefd=False) as handle:
            data = handle.read(info.st_size + 1)
        if len(data) > info.st_size:
            raise SettingsError(f"{where}: grew while it was read")
        return data
    finally:
        os.close(fd)


def _boot_name(name: str, seen: dict[str, str], where: str) -> None:
    """A name FAT holds as given, not one the formats write, not one given already: FAT
    ignores case (``A.txt`` is ``a.txt``) and drops a final dot, DOS names devices."""
    where = f"{where}: [files] {name!r}"
    if not _BOOT_NAME.fullmatch(name):
        raise SettingsError(f"{where}: not a file name the boot partition can take (letters, "
                            "digits, . _ -, at most 64, not ending in .)")
    if name.lower() in RESERVED_NAMES:
        raise SettingsError(f"{where}: popsicle-py writes {name.lower()} from the settings")
    if name.split(".")[0].lower() in _DEVICES:
        raise SettingsError(f"{where}: {name.split('.')[0].upper()} is a DOS device name, "
                            "which FAT cannot hold as a file")
    if name.lower() in seen:
        raise SettingsError(f"{where}: the same name as {seen[name.lower()]} "
                            "(FAT ignores case)")
    seen[name.lower()] = name


def read_input(path: str) -> bytes:
    """A settings or values file's bytes: a regular file of at most INPUT_LIMIT (a device,
    a FIFO or a huge file is refused, not read until memory runs out); raises
    :class:`SettingsError`."""
    if "\0" in path:
        raise SettingsError(f"{path!r}: the path holds a NUL character")
    try:
        return _read_file(path, path, INPUT_LIMIT, f"at most {INPUT_LIMIT >> 20} MiB")
    except OSError as exc:
        raise SettingsError(f"{path}: {exc.strerror or exc}") from None


def load_settings(path: str) -> Settings:
    """Read and check a settings file; raises :class:`SettingsError`."""
    raw = read_input(path)
    try:
        data = tomllib.loads(raw.decode("utf-8").removeprefix("\ufeff"))  # Notepad's BOM
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib's parser recurses for each array or table in another
        raise SettingsError(f"{path}: not valid TOML here: arrays or tables nested too "
                            "deeply") from None
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SettingsError(f"{path}: not UTF-8 text (line {line})") from None
    return parse_settings(data, path, Path(path).parent)


def check_key(key: str) -> None:
    """An OpenSSH public key line: a known type, base64 of a whole key of that type (a key
    cut short where its base64 still decodes, as a pasted line cut at a multiple of four
    characters is, would be written and never let anyone in)."""
    parts = key.split()
    if len(parts) < 2 or parts[0] not in _KEY_TYPES:
        raise SettingsError(f"malformed SSH key {key[:40]!r}: expected "
                            "'TYPE BASE64 [comment]' with TYPE one of ssh-ed25519, ssh-rsa, "
                            "ecdsa-sha2-*")
    try:
        blob = base64.b64decode(parts[1], validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        named = blob[4:4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise SettingsError(f"malformed SSH key {key[:40]!r}: its key is not valid "
                            "base64 of an OpenSSH key") from None
    if named != parts[0]:
        raise SettingsError(f"malformed SSH key {key[:40]!r}: says {parts[0]} but holds "
                            f"{named or 'something else'}")
    why = _key_fault(named, blob)
    if why is not None:
        raise SettingsError(f"malformed SSH key {key[:40]!r}: {why} (cut short?)")


#: Bytes of an uncompressed point (0x04, x, y) of each ECDSA curve.
_POINT = {"nistp256": 65, "nistp384": 97, "nistp521": 133}
#: The smallest RSA modulus OpenSSH takes, in bits.
_RSA_BITS = 1024


def _strings(blob: bytes) -> list[bytes] | None:
    """The SSH wire strings (uint32 length, bytes) the blob is made of; None: not whole."""
    out, at = [], 0
    while at < len(blob):
        if at + 4 > len(blob):
            return None
        (length,) = struct.unpack_from(">I", blob, at)
        if at + 4 + length > len(blob):
            return None
        out.append(blob[at + 4:at + 4 + length])
        at += 4 + length
    return out


def _key_fault(kind: str, blob: bytes) -> str | None:
    """What is wrong with a public key blob of ``kind`` (as ``ssh-keygen -l`` would refuse
    it), or None."""
    fields = _strings(blob)
    if fields is None:
        return "its key ends inside a field"
    core = kind.removeprefix("sk-").removesuffix("@openssh.com")
    want = {"ssh-ed25519": 2, "ssh-rsa": 3}.get(core, 3) + (kind != core)
    if len(fields) != want:
        return f"its key has {len(fields)} fields, not the {want} of {kind}"
    if core == "ssh-ed25519" and len(fields[1]) != 32:
        return f"its ed25519 key is {len(fields[1])} bytes, not 32"
    if core == "ssh-rsa":
        bits = int.from_bytes(fields[2], "big").bit_length()
        if bits < _RSA_BITS:
            return f"its RSA modulus is {bits} bits, under the {_RSA_BITS} OpenSSH takes"
    if core.startswith("ecdsa-sha2-"):
        curve = core.removeprefix("ecdsa-sha2-")
        if fields[1] != curve.encode() or len(fields[2]) != _POINT[curve] \
                or fields[2][:1] != b"\x04":
            return f"its key is not a {curve} point"
    return None


def _known_timezone(name: str) -> bool:
    zones = zoneinfo.available_timezones()
    return not zones or name in zones  # no tz database here: the form is all we can check


def _one_line(settings: Settings, drive: str) -> None:
    """Every text value is one line of printable text (no control character)."""
    wifi = settings.wifi
    texts = [*((k, getattr(settings, k)) for k in _STRINGS),
             *(("ssh_authorized_keys", k) for k in settings.ssh_authorized_keys),
             *((f"wifi.{k}", getattr(wifi, k)) for k in ("ssid", "passphrase", "country")
               if wifi is not None)]
    for name, text in texts:
        bad = _NOT_ONE_LINE.search(text) if text is not None else None
        if bad is not None:
            raise SettingsError(f"{drive}: {name} holds a control character or line break "
                                f"(U+{ord(bad.group()):04X}); each value is one line of text"
                                + (" (give each key as its own string)"
                                   if name == "ssh_authorized_keys"
                                   and bad.group() in "\n\r\x85\u2028\u2029" else ""))


def check(settings: Settings, drive: str) -> None:
    """One drive's filled-in settings, value by value; raises :class:`SettingsError`."""
    s = settings
    _one_line(s, drive)
    if s.hostname is not None and not _HOSTNAME.fullmatch(s.hostname):
        raise SettingsError(f"{drive}: hostname {s.hostname!r} is not a valid host name "
                            "(letters, digits and -, at most 63)")
    if s.user is not None and (not _USER.fullmatch(s.user) or s.user == "root"):
        raise SettingsError(f"{drive}: user {s.user!r} is not a valid user name "
                            "(lower case letters, digits, _ and -; not root)")
    if (s.password is not None or s.password_hash is not None) and s.user is None:
        raise SettingsError(f"{drive}: a password needs a user")
    if s.password == "":  # an empty cell of the CSV: a login (and sudo) with no password
        raise SettingsError(f"{drive}: password is empty: user {s.user!r} would log in with "
                            "no password at all (leave password out for a user cloud-init "
                            "locks)")
    if s.password is not None and len(s.password.encode()) > PASSWORD_BYTES:
        raise SettingsError(f"{drive}: password is {len(s.password.encode())} bytes; at most "
                            f"{PASSWORD_BYTES} (crypt() refuses longer ones: no one could log "
                            "in)")
    if s.password_hash is not None and not _SHA512_HASH.fullmatch(s.password_hash):
        raise SettingsError(f"{drive}: password_hash is not a SHA-512 crypt hash ($6$...)")
    for key in s.ssh_authorized_keys:
        try:
            check_key(key)
        except SettingsError as exc:
            raise SettingsError(f"{drive}: {exc}") from None
    if s.ssh_authorized_keys and s.user is None:
        raise SettingsError(f"{drive}: ssh_authorized_keys need a user")
    if s.ssh is False and s.ssh_authorized_keys:  # firstrun and cloud-init differed here
        raise SettingsError(f"{drive}: ssh = false with ssh_authorized_keys: keys for an SSH "
                            "that is off; remove one of them")
    if s.ssh and not s.ssh_authorized_keys and not s.ssh_password_auth:
        raise SettingsError(f"{drive}: ssh = true without ssh_authorized_keys needs "
                            "ssh_password_auth = true (else no one can log in over SSH)")
    if s.wifi is not None:
        _check_wifi(s.wifi, drive)
    if s.timezone is not None and not (_TIMEZONE.fullmatch(s.timezone)
                                       and _known_timezone(s.timezone)):
        raise SettingsError(f"{drive}: unknown timezone {s.timezone!r} (e.g. Europe/Berlin)")
    if s.keyboard is not None and not _KEYBOARD.fullmatch(s.keyboard):
        raise SettingsError(f"{drive}: keyboard {s.keyboard!r} is not a layout (e.g. us, de)")
    if s.locale is not None and not _LOCALE.fullmatch(s.locale):
        raise SettingsError(f"{drive}: locale {s.locale!r} is not a locale "
                            "(e.g. en_GB.UTF-8)")


def check_format(settings: Settings, fmt: str, where: str) -> None:
    """What one format cannot do; raises :class:`SettingsError`.

    The first-run script makes the user by renaming the image's first user (``userconf``,
    as Raspberry Pi Imager does), which needs its password: without one the user would be
    dropped.  cloud-init makes a user without a password locked (key login only)."""
    if fmt == "firstrun" and settings.user is not None and settings.password is None \
            and settings.password_hash is None:
        raise SettingsError(f"{where}: the firstrun format needs a password or password_hash "
                            f"for user {settings.user!r} (it renames the image's first user "
                            "and sets its password; cloud-init can make a locked user)")


def _check_wifi(wifi: Wifi, drive: str) -> None:
    if not 1 <= len(wifi.ssid.encode()) <= 32:
        raise SettingsError(f"{drive}: wifi.ssid must be 1 to 32 bytes")
    # Bytes of UTF-8, as wpa_supplicant, NetworkManager and hostapd count them (and as the
    # PSK is derived): "ééééé" is a passphrase of 10, 40 "é" one of 80 no access point takes.
    if wifi.passphrase and not (8 <= len(wifi.passphrase.encode()) <= 63
                                or re.fullmatch(r"[0-9A-Fa-f]{64}", wifi.passphrase)):
        raise SettingsError(f"{drive}: wifi.passphrase must be 8 to 63 bytes (or 64 hex "
                            f"digits), not {len(wifi.passphrase.encode())}")
    if wifi.country not in COUNTRIES:
        raise SettingsError(f"{drive}: wifi.country {wifi.country!r} is not an ISO 3166 "
                            "alpha-2 code (e.g. DE, GB, US)")


def redacted(settings: Settings) -> dict[str, object]:
    """The values for a record: secrets replaced, extra files by name and size."""
    out: dict[str, object] = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if value is None or value == () or (f.name == "ssh_password_auth" and not value):
            continue
        if f.name in SECRET_KEYS:
            value = REDACTED
        elif isinstance(value, Wifi):
            value = {"ssid": value.ssid, "country": value.country, "hidden": value.hidden,
                     **({"passphrase": REDACTED} if value.passphrase else {})}
        elif f.name == "files":
            value = {name: len(data) for name, data in value}
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out
