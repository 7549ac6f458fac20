"""Per-drive values: ``{seq}``, ``{slot}``, ``{serial}``, ``{port}`` and the columns of that
drive's row of a CSV file, filled into the settings' templates.

Templates use Python's format syntax restricted to plain names (``{seq:02}``, ``{hostname}``;
``{{`` is a brace).  Rows are matched by the CSV's ``seq``, ``slot`` or ``serial`` column (the
first of these it has), else by order (row N for the Nth drive).  Everything here is pure: the
app layer reads the files and turns :class:`SettingsError` into a refusal.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from popsicle_py.records import record
from popsicle_py.settings.model import REDACTED, SECRET_KEYS, Settings, SettingsError, Wifi, check

__all__ = ["BUILTINS", "DriveContext", "Values", "check_templates", "duplicates",
           "fields_of", "parse_values", "resolve", "resolve_all"]

BUILTINS = ("seq", "slot", "serial", "port")
KEY_COLUMNS = ("seq", "slot", "serial")
_FORMATTER = string.Formatter()
#: The widest field and the longest precision a template may ask for: ``{seq:09999999999}``
#: would build a string of 10 GB.  No value needs more (a host name is at most 63).
WIDTH_LIMIT = 64
_NUMBERS = re.compile(r"\d+")


@record
class DriveContext:
    """What the run knows of one drive: its number in the run, its slot, serial and port."""

    seq: int
    #: A station's slot label (``A1``), else the same number as ``seq``.
    slot: int | str
    serial: str = ""
    port: str = ""

    @property
    def name(self) -> str:
        return f"drive {self.seq}" + (f" (serial {self.serial})" if self.serial else "")


@record
class Values:
    """A CSV file's rows, and the column they are matched by (None: by order)."""

    path: str
    columns: tuple[str, ...]
    rows: tuple[dict[str, str], ...]
    key: str | None
    #: Each row's columns whose cell had spaces at its start or end (dropped from ``rows``).
    padded: tuple[frozenset[str], ...] = ()

    def row_for(self, drive: DriveContext) -> dict[str, str] | None:
        if self.key is None:
            return self.rows[drive.seq - 1] if drive.seq <= len(self.rows) else None
        want = _norm(self.key, str(getattr(drive, self.key)))
        return next((row for row in self.rows if _norm(self.key, row[self.key]) == want), None)


def _norm(key: str, cell: str) -> str:
    """A key cell as compared: numbers without leading zeros (``07`` is seq 7)."""
    cell = cell.strip()
    return str(int(cell)) if key != "serial" and _number(cell) else cell


def _number(cell: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes ``²``, which int() refuses."""
    return cell.isascii() and cell.isdigit()


def parse_values(text: str, path: str) -> Values:
    """The rows of a CSV file with a header line; raises :class:`SettingsError`."""
    reader = csv.DictReader(io.StringIO(text))
    try:
        columns = tuple(c.strip() for c in (reader.fieldnames or ()))
    except csv.Error as exc:
        raise SettingsError(f"{path}: line {reader.reader.line_num}: {exc}") from None
    if not columns or any(not c for c in columns):
        raise SettingsError(f"{path}: the first line must name every column")
    if len(set(columns)) != len(columns):
        raise SettingsError(f"{path}: a column is named twice")
    rows, padded = [], []
    try:
        for number, raw in enumerate(reader, 2):
            if None in raw or any(v is None for v in raw.values()):
                raise SettingsError(f"{path}: line {number} has not {len(columns)} fields")
            rows.append({k.strip(): v.strip() for k, v in raw.items() if k is not None})
            padded.append(frozenset(k.strip() for k, v in raw.items() if v != v.strip()))
    except csv.Error as exc:  # a field over 128 KiB, a NUL
        raise SettingsError(f"{path}: line {reader.reader.line_num}: {exc}") from None
    key = next((c for c in KEY_COLUMNS if c in columns), None)
    if key is not None:
        seen: set[str] = set()
        for number, row in enumerate(rows, 2):
            cell = row[key]
            if not cell or (key == "seq" and not _number(cell)):
                raise SettingsError(f"{path}: line {number}: {key} {cell!r} is not a number"
                                    if cell else f"{path}: line {number}: no {key}")
            norm = _norm(key, cell)
            if norm in seen:
                raise SettingsError(f"{path}: line {number}: {key} {cell} appears twice")
            seen.add(norm)
    return Values(path, columns, tuple(rows), key, tuple(padded))


def _templates(settings: Settings) -> Iterable[tuple[str, str]]:
    """(setting name, template) of every string value."""
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if isinstance(value, str):
            yield f.name, value
        elif f.name == "ssh_authorized_keys":
            for item in value:
                yield f.name, item
        elif isinstance(value, Wifi):
            for sub in ("ssid", "passphrase", "country"):
                yield f"wifi.{sub}", getattr(value, sub)


def _over_limit(digits: str) -> bool:
    """A run of digits worth more than WIDTH_LIMIT (int() refuses over 4300 digits)."""
    digits = digits.lstrip("0")
    return len(digits) > 3 or (digits != "" and int(digits) > WIDTH_LIMIT)


#: What a refusal of a secret's template says: a brace in a password is most likely the
#: password's own, which no message may show.
BRACES = "a literal { or } is written {{ or }}"


def secret(setting: str) -> bool:
    """A setting whose value is never shown (a password, a passphrase, a hash)."""
    return setting.split(".")[-1] in SECRET_KEYS


def fields_of(template: str, setting: str) -> set[str]:
    """The names a template uses; only plain names are allowed.  A refusal shows neither a
    secret's template nor its fields (a password that holds a brace)."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        shown = f"{REDACTED} ({BRACES})" if secret(setting) else repr(template)
        raise SettingsError(f"{setting}: bad template {shown}: {exc}") from None
    names = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        field = f"{{{name}}}" if not secret(setting) else f"{REDACTED} ({BRACES})"
        if not name.isidentifier() or conversion or "{" in (spec or ""):
            raise SettingsError(f"{setting}: bad template {field}: use a plain column "
                                "name, as {hostname} or {seq:02}")
        # Only a width, a precision and a fill character hold digits, and a fill is one.
        if any(_over_limit(n) for n in _NUMBERS.findall(spec or "")):
            shown = f"{{{name}:{(spec or '')[:20]}}}" if not secret(setting) else field
            raise SettingsError(f"{setting}: bad template {shown}: a "
                                f"width or precision over {WIDTH_LIMIT}")
        names.add(name)
    return names


def check_templates(settings: Settings, values: Values | None, where: str) -> None:
    """Every name a template uses is a builtin or a column of the CSV."""
    columns = set(values.columns) if values is not None else set()
    for setting, template in _templates(settings):
        try:
            names = fields_of(template, setting)
        except SettingsError as exc:
            raise SettingsError(f"{where}: {exc}") from None
        for name in sorted(names):
            if name not in BUILTINS and name not in columns:
                source = f"no column of {values.path}" if values is not None else \
                    "no built-in value and no --values file is given"
                if secret(setting):  # its name may be a piece of the password itself
                    raise SettingsError(f"{where}: {setting} uses a template field that names "
                                        f"{source} ({BRACES})")
                raise SettingsError(f"{where}: {setting} uses {{{name}}}, which names "
                                    f"{source} (built-in: {', '.join(BUILTINS)})")


def _fill(template: str, setting: str, mapping: Mapping[str, object], drive: str) -> str:
    fields_of(template, setting)  # a field too wide is refused before it is built
    try:
        return _FORMATTER.vformat(template, (), mapping)
    except (ValueError, KeyError, IndexError) as exc:
        if secret(setting):  # what format says quotes the template (a spec, a field name)
            raise SettingsError(f"{drive}: {setting} {REDACTED}: cannot be filled in "
                                f"({BRACES})") from None
        raise SettingsError(f"{drive}: {setting} {template!r}: {exc}") from None


def resolve(settings: Settings, values: Values | None, drive: DriveContext) -> Settings:
    """One drive's settings, templates filled and every value checked.

    Raises :class:`SettingsError` when the CSV has no row for the drive or a value is bad.
    """
    mapping: dict[str, object] = {"seq": drive.seq, "slot": drive.slot,
                                  "serial": drive.serial, "port": drive.port}
    if values is not None:
        row = values.row_for(drive)
        if row is None:
            key = str(getattr(drive, values.key)) if values.key else ""
            how = (f" ({values.key} {key})" if key else f" (it reports no {values.key}, so "
                   "no row can be its)") if values.key else f" (row {drive.seq})"
            if values.key == "serial" and key:
                how = ""  # the drive's name says it
            rows = len(values.rows)
            raise SettingsError(f"{values.path} has no row for {drive.name}{how}: "
                                f"{rows} row{'' if rows == 1 else 's'}")
        mapping.update({k: v for k, v in row.items() if k not in BUILTINS})
        _no_padded_secret(settings, values, row, drive)

    def fill(setting: str, value: str | None) -> str | None:
        return None if value is None else _fill(value, setting, mapping, drive.name)

    wifi = settings.wifi
    if wifi is not None:
        wifi = dataclasses.replace(
            wifi, ssid=fill("wifi.ssid", wifi.ssid) or "",
            passphrase=fill("wifi.passphrase", wifi.passphrase) or "",
            country=(fill("wifi.country", wifi.country) or "").upper())
        if settings.wifi is not None and settings.wifi.passphrase and not wifi.passphrase:
            raise SettingsError(f"{drive.name}: wifi.passphrase {settings.wifi.passphrase!r} "
                                "is empty for this drive (an empty cell): an open network is "
                                "passphrase = \"\" in the settings, not an empty value")
    strings: dict[str, Any] = {
        name: fill(name, getattr(settings, name)) for name in
        ("hostname", "user", "password", "password_hash", "timezone", "keyboard", "locale")}
    filled = dataclasses.replace(
        settings, **strings,
        ssh_authorized_keys=tuple(k for k in (
            fill("ssh_authorized_keys", key) or "" for key in settings.ssh_authorized_keys)
            if k.strip()),
        wifi=wifi)
    check(filled, drive.name)
    return filled


def _no_padded_secret(settings: Settings, values: Values, row: dict[str, str],
                      drive: DriveContext) -> None:
    """A password or passphrase is not taken from a cell with spaces at its ends: they are
    dropped (as every cell's are), and a secret that had them would be another secret, with
    nothing to show it (no one could log in, the board would not join the Wi-Fi)."""
    index = next(i for i, r in enumerate(values.rows) if r is row)
    padded = values.padded[index] if index < len(values.padded) else frozenset()
    for setting, template in _templates(settings):
        if setting not in ("password", "wifi.passphrase"):  # a hash has no spaces to lose
            continue
        for name in sorted(fields_of(template, setting) & padded)[:1]:
            raise SettingsError(f"{drive.name}: {setting} comes from the column {name!r} of "
                                f"{values.path}, whose cell has spaces at its start or end, "
                                "which are dropped: write the cell without them (a secret "
                                "cannot begin or end with a space here)")


def duplicates(resolved: Sequence[Settings]) -> str | None:
    """The first host name given to two drives of a batch, or None."""
    seen: set[str] = set()
    for settings in resolved:
        name = (settings.hostname or "").lower()
        if name and name in seen:
            return settings.hostname
        seen.add(name)
    return None


def resolve_all(settings: Settings, values: Values | None,
                drives: Sequence[DriveContext]) -> tuple[Settings, ...]:
    """Every drive of a batch, and no host name twice; raises :class:`SettingsError`."""
    if values is not None and values.key is None and len(values.rows) < len(drives):
        raise SettingsError(f"{values.path} has {len(values.rows)} rows for "
                            f"{len(drives)} drives")
    resolved = tuple(resolve(settings, values, d) for d in drives)
    dup = duplicates(resolved)
    if dup is not None:
        raise SettingsError(f"hostname {dup!r} would be given to two drives")
    return resolved
