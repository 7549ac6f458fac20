"""``records`` reads a journal the user may read but not write (root's station, an operator's
export): the journal is opened read-only, so no write permission is asked for."""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import popsicle_py.app.station  # noqa: F401  (imported by records; nobody cannot read /work)
from popsicle_py.cli import main
from popsicle_py.station import journal

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory of root's that others may enter and read, not write (/tmp/pytest-of-root
    is closed to them)."""
    with tempfile.TemporaryDirectory(prefix="rev-diff-journal-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def _station_journal(path: Path) -> sqlite3.Connection:
    db = journal.connect(str(path), create=True)
    db.execute("INSERT INTO records (session, station, batch, slot, result, serial)"
                " VALUES ('s', 'st', 'b', '1', 'ok', 'SER42')")
    return db


def _as_nobody(path: Path) -> tuple[int, str]:
    """``records --csv --journal PATH`` run as nobody: its exit code and output."""
    runner = CliRunner()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            got = runner.invoke(main, ["records", "--csv", "--journal", str(path)])
            os.write(write, f"{got.exit_code}\n{got.output}".encode())
            code = 0
        except BaseException:
            os.write(write, f"70\n{traceback.format_exc()}".encode())
        finally:
            os._exit(code)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    status, _, output = b"".join(chunks).decode().partition("\n")
    return int(status), output


def test_a_closed_journal_the_user_may_only_read_is_exported(shared: Path) -> None:
    path = shared / "journal.sqlite"
    _station_journal(path).close()  # WAL mode, no -wal nor -shm left: the station stopped
    os.chmod(path, 0o644)
    before = path.read_bytes()
    status, output = _as_nobody(path)
    assert (status, output.splitlines()[1:]) == (0, ["1,s,st,b,,1,,,,,,SER42" + "," * 8
                                                     + "ok" + "," * 8]), output
    assert path.read_bytes() == before
    assert sorted(os.listdir(shared)) == ["journal.sqlite"]


def test_a_live_journal_the_user_may_only_read_is_exported(shared: Path) -> None:
    path = shared / "journal.sqlite"
    db = _station_journal(path)  # the station still has it open: -wal and -shm are there
    try:
        for suffix in ("", "-wal", "-shm"):
            os.chmod(f"{path}{suffix}", 0o644)
        status, output = _as_nobody(path)
    finally:
        db.close()
    assert status == 0, output
    assert "SER42" in output


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
