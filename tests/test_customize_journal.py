"""The station's journal keeps each drive's first-boot settings record, also in a journal made
before the column existed."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from popsicle_py.station.journal import COLUMNS, Journal


def test_an_old_journal_gets_the_column_and_the_record_is_json(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE records (" + ", ".join(
        "id INTEGER PRIMARY KEY" if c == "id" else f"{c} TEXT"
        for c in COLUMNS if c != "customized") + ")")
    old.commit()
    old.close()
    journal = Journal(str(path), station="s", session="x")
    row = journal.start("A1", {"seq": 1, "device": "/dev/sdb"})
    record = {"format": "cloud-init", "values": {"hostname": "pi-01", "password": "<redacted>"},
              "files": ["meta-data", "user-data"], "files_sha256": "0" * 64}
    journal.finish(row, {"result": "ok", "customized": record})
    journal.close()
    (stored,) = sqlite3.connect(path).execute("SELECT customized FROM records").fetchone()
    assert json.loads(stored) == record
