"""The station's journal keeps each drive's first-boot settings record, also in a journal made
before the column existed; a station started again goes on with its batch's rows."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pi_image
import pytest
from conftest import popsicle_cmd
from station_rig import Rig, slot_map
from test_watch import Stick, needs_testbed

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


@needs_testbed
@pytest.mark.umockdev
def test_a_station_started_again_goes_on_with_its_batchs_rows(tmp_path: Path) -> None:
    """Rows keyed by seq, the same --batch and journal, the station started twice (a restart
    mid-batch): the second start's first stick gets the next row, never the first one again."""
    image = pi_image.build(tmp_path, table="mbr")
    toml, values = tmp_path / "lab.toml", tmp_path / "lab.csv"
    toml.write_text('hostname = "{name}"\n')
    values.write_text("seq,name\n1,pi-01\n2,pi-02\n3,pi-03\n")
    slots = slot_map(tmp_path / "slots.toml", {"A1": 3, "A2": 5})
    journal = tmp_path / "j.sqlite"
    args = [str(image), "--yes", "--slots", str(slots), "--journal", str(journal), "--batch",
            "class-3b", "--listen", "127.0.0.1:0", "--no-power-off", "--count", "1",
            "--customize", str(toml), "--values", str(values), "--customize-format",
            "cloud-init"]
    with Rig(tmp_path / "rig") as rig:
        for stick, hostname in ((Stick("c", 3), "pi-01"), (Stick("d", 5), "pi-02")):
            rig.start(args)
            rig.add(stick.description)
            result = rig.wait(event="result", device=stick.dev)
            assert result["status"] == "ok", result
            assert result["customized"]["values"]["hostname"] == hostname
            assert rig.wait_exit() == 0
            written = tmp_path / f"{stick.letter}.img"
            written.write_bytes(rig.read(stick.dev) or b"")
            user_data = subprocess.run(["mtype", "-i", f"{written}@@{4 << 20}",
                                        "::/user-data"], capture_output=True, check=True).stdout
            assert f'hostname: "{hostname}"'.encode() in user_data
        notes = [e["text"] for e in rig.events() if e.get("event") == "note"]
        assert "journal: batch class-3b goes on: the next drive is seq 2" in notes
    done = subprocess.run([*popsicle_cmd(), "records", "--journal", str(journal), "--json"],
                          capture_output=True, text=True, check=True)
    assert [(r["seq"], json.loads(r["customized"])["values"]["hostname"])
            for r in json.loads(done.stdout)] == [(1, "pi-01"), (2, "pi-02")]
