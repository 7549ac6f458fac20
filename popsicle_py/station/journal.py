"""The station's journal: one SQLite row per drive, written when it starts and when it ends.

"What exactly went onto stick 37 last Tuesday?"  The standard library's sqlite3 in WAL mode
with ``synchronous=FULL``: a row is on disk when the call returns, so a crash or a power cut
loses no finished record.  A row starts ``in-flight``; the next start of a station marks the
rows a crash left in flight ``interrupted`` (counted failed).  The columns are the report's
(:data:`popsicle_py.report.FIELDS`) plus who, where and which batch.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from popsicle_py import files
from popsicle_py.events import JsonObject
from popsicle_py.report import FIELDS, csv_cell, iso

#: The result of a row whose drive is being written.
IN_FLIGHT = "in-flight"
#: A row left in flight by a station that died (SIGKILL, power cut): counted failed.
INTERRUPTED = "interrupted"
#: Who wrote it, where, in which batch; then the report's fields.
COLUMNS = ("id", "session", "station", "batch", "operator", "slot", *FIELDS)
_INTEGERS = {"id", "seq", "capacity", "bytes_written", "bytes_skipped", "write_speed",
             "verify_speed", "first_bad_offset", "link_speed"}



def _type(column: str) -> str:
    return "INTEGER" if column in _INTEGERS or column == "verified" else "TEXT"


_SCHEMA = ("CREATE TABLE IF NOT EXISTS records ("
           + ", ".join(f"{c} {_type(c)}" + (" PRIMARY KEY" if c == "id" else "")
                       for c in COLUMNS)
           + ")")


#: The columns every station's journal has had: a records table without them is another
#: program's, never to be added to nor read as ours.
CORE = frozenset({"id", "session", "station", "batch", "slot", "result"})


def _columns(db: sqlite3.Connection) -> set[str]:
    return {row[1] for row in db.execute("PRAGMA table_info(records)").fetchall()}


def _ours(db: sqlite3.Connection, path: str) -> set[str]:
    """The journal's columns; JournalError when the file is a database of another program
    (a --journal typed wrong must not get our table, our columns, our rows, or WAL mode)."""
    have = _columns(db)
    tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if (have or tables) and not CORE.issubset(have):
        raise JournalError(f"--journal {path}: not a station's journal (a database of "
                           "another program?); name a new file or a station's journal")
    return have


def _add_new_columns(db: sqlite3.Connection, have: set[str]) -> None:
    """A journal made by an older popsicle-py gets the columns added since (empty there)."""
    for column in COLUMNS:
        if have and column not in have:
            db.execute(f"ALTER TABLE records ADD COLUMN {column} {_type(column)}")


class JournalError(Exception):
    """The journal cannot be used; one line for the user (exit 2, nothing written)."""


def default_path() -> str:
    """/var/lib/popsicle-py for root, else $XDG_DATA_HOME/popsicle-py (~/.local/share)."""
    return os.path.join(data_dir(), "journal.sqlite")


def data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/popsicle-py"
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local", "share")
    return os.path.join(base, "popsicle-py")


def connect(path: str, *, create: bool) -> sqlite3.Connection:
    """A connection in WAL mode, every commit synced (``synchronous=FULL``)."""
    if not create and not os.path.exists(path):
        raise JournalError(f"--journal {path}: no such file")
    try:
        if create:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        files.check_regular(path, create=create, sidecars=("-wal", "-shm", "-journal"))
        db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        try:
            have = _ours(db, path)  # before anything is changed in it
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if create:
                db.execute(_SCHEMA)
            _add_new_columns(db, have)
            db.execute("SELECT count(*) FROM records").fetchone()
        except BaseException:
            db.close()
            raise
    except (OSError, sqlite3.Error) as exc:
        raise JournalError(f"--journal {path}: {getattr(exc, 'strerror', None) or exc}"
                           ) from None
    return db


def hold(path: str) -> int:
    """Lock the journal for a station's whole life; the descriptor (closing it unlocks).

    A second station on the same journal would take the first one's drives in flight for
    a crash's and mark them interrupted: it is refused instead.  A station killed outright
    leaves no lock behind (the kernel drops it with the process).  flock, not SQLite's
    POSIX locks, which it never meets on a local file system; the descriptor stays open
    until the station ends (closing another descriptor of the file would drop SQLite's).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise JournalError(f"--journal {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, BlockingIOError):
            raise JournalError(f"--journal {path}: another station is using this journal; "
                               "give each station its own --journal") from None
        raise JournalError(f"--journal {path}: {exc.strerror or exc}") from None
    return fd


def _row(cursor: sqlite3.Cursor, values: tuple[object, ...]) -> JsonObject:
    data = {d[0]: v for d, v in zip(cursor.description, values, strict=True)}
    if "verified" in data and data["verified"] is not None:
        data["verified"] = bool(data["verified"])
    return data


class Journal:
    """Rows written by the station's session thread; read by anyone (WAL: readers never wait)."""

    def __init__(self, path: str, *, station: str, session: str, batch: str = "",
                 operator: str = "", clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.db = connect(path, create=True)
        self.station, self.session = station, session
        self.batch, self.operator = batch, operator
        self.clock = clock

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def recover(self) -> int:
        """Mark the rows a dead station left in flight interrupted; how many there were."""
        with self._write() as db:
            cur = db.execute("UPDATE records SET result = ?, ended = ?, error = ? "
                             "WHERE result = ?",
                             (INTERRUPTED, iso(self.clock()),
                              "the station stopped while this drive was being written",
                              IN_FLIGHT))
        return cur.rowcount

    def start(self, slot: str, fields: JsonObject) -> int:
        """A drive starts: its row, in flight; returns the row's id."""
        data = {k: fields.get(k) for k in FIELDS}
        data.update(session=self.session, station=self.station, batch=self.batch,
                    operator=self.operator, slot=slot, result=IN_FLIGHT,
                    started=iso(self.clock()))
        names = list(data)
        with self._write() as db:
            cur = db.execute(f"INSERT INTO records ({', '.join(names)}) VALUES "
                             f"({', '.join('?' * len(names))})", [data[n] for n in names])
        return int(cur.lastrowid or 0)

    def finish(self, row: int, fields: JsonObject) -> None:
        """A drive ended: everything the report holds, over its row."""
        data = {k: json.dumps(fields[k], sort_keys=True) if isinstance(fields[k], dict)
                else fields[k] for k in FIELDS if k in fields and k != "started"}
        with self._write() as db:
            db.execute(f"UPDATE records SET {', '.join(f'{k} = ?' for k in data)} "
                       "WHERE id = ?", [*data.values(), row])


def counts(db: sqlite3.Connection, batch: str | None) -> dict[str, int]:
    """ok, failed (interrupted included) and total finished, of a batch (None: all)."""
    where, args = ("WHERE batch = ?", (batch,)) if batch is not None else ("", ())
    rows = db.execute(f"SELECT result, count(*) FROM records {where} GROUP BY result",
                      args).fetchall()
    ok = sum(n for r, n in rows if r == "ok")
    failed = sum(n for r, n in rows if r not in ("ok", IN_FLIGHT, "cancelled"))
    return {"ok": ok, "failed": failed, "total": ok + failed}


def last_seq(db: sqlite3.Connection, batch: str) -> int:
    """The highest seq a drive of the batch got (0: none yet): a station started again
    goes on numbering from there, so rows keyed by seq are never given twice."""
    row = db.execute("SELECT max(seq) FROM records WHERE batch = ?", (batch,)).fetchone()
    return int(row[0] or 0)


def records(db: sqlite3.Connection, batch: str | None = None,
            have: set[str] | None = None) -> list[JsonObject]:
    """Every row (of a batch), oldest first, as plain data; the columns a journal of an
    older popsicle-py lacks (``have``: the ones it has) are None."""
    where, args = ("WHERE batch = ?", (batch,)) if batch is not None else ("", ())
    columns = ", ".join(c if have is None or c in have else f"NULL AS {c}" for c in COLUMNS)
    cur = db.execute(f"SELECT {columns} FROM records {where} ORDER BY id", args)
    return [_row(cur, values) for values in cur.fetchall()]


def to_csv(found: list[JsonObject]) -> str:
    """Records as CSV with a header line (booleans as true/false, None as empty; a text a
    spreadsheet would run as a formula with a leading ``'``: see
    :func:`~popsicle_py.report.csv_cell`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in found:
        writer.writerow({k: "" if v is None else str(v).lower() if isinstance(v, bool)
                         else csv_cell(v) for k, v in row.items()})
    return buf.getvalue()


def read_records(path: str, batch: str | None = None) -> list[JsonObject]:
    """The journal's records; JournalError (one line) when it cannot be read.

    Opened read-only: an export changes nothing in the file (it made an empty file a
    database, put another program's database in WAL mode and added our columns to it)."""
    if not os.path.exists(path):
        raise JournalError(f"--journal {path}: no such file")
    try:
        files.check_regular(path, create=False, sidecars=("-wal", "-shm", "-journal"),
                            write=False)  # a journal the user may only read is exported
        if os.path.getsize(path) == 0:
            raise JournalError(f"--journal {path}: empty, not a station's journal")
    except (OSError, sqlite3.Error) as exc:
        raise JournalError(f"--journal {path}: {getattr(exc, 'strerror', None) or exc}"
                           ) from None
    try:
        return _read_only(path, batch, "mode=ro")
    except sqlite3.Error as exc:  # damaged, or replaced meanwhile
        if (getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_READONLY
                and not os.path.exists(f"{path}-wal")):
            # WAL mode, closed, in a directory the user may not write: SQLite cannot make the
            # -shm it reads through.  No -wal: no writer, all of it is in the file itself.
            with suppress(sqlite3.Error):
                return _read_only(path, batch, "mode=ro&immutable=1")
        raise JournalError(f"--journal {path}: {exc}") from None


def _read_only(path: str, batch: str | None, how: str) -> list[JsonObject]:
    """:func:`read_records` over a connection opened with the URI parameters ``how``."""
    db = sqlite3.connect(f"{Path(path).absolute().as_uri()}?{how}", uri=True, timeout=10,
                         check_same_thread=False)
    try:
        have = _ours(db, path)
        if not have:
            raise JournalError(f"--journal {path}: not a station's journal (no records)")
        return records(db, batch, have)
    finally:
        db.close()
