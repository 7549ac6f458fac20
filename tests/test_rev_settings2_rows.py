"""The values CSV's refusals, as said:

- keyed by serial, and a drive that reports none (a loop device, some card readers): "(serial ):
  1 rows", as if the serial were blank in the CSV; now the drive has none, so that no row can
  be its (and a serial is no longer said twice);
- saved by Excel as plain "CSV" (the Windows code page: "Müller" in cp1252): Python's "'utf-8'
  codec can't decode byte 0xfc in position 27: invalid start byte"; now the line, and how to
  save it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pi_image
import pytest

from popsicle_py.settings import (
    DriveContext,
    Settings,
    SettingsError,
    load_customization,
    parse_values,
    resolve,
)


def test_a_drive_without_a_serial_is_said_to_have_none() -> None:
    values = parse_values("serial,hostname\nABC123,pi-a\n", "class.csv")
    with pytest.raises(SettingsError) as info:
        resolve(Settings(hostname="{hostname}"), values, DriveContext(1, 1))
    assert str(info.value) == ("class.csv has no row for drive 1 (it reports no serial, so no "
                               "row can be its): 1 row")


def test_a_drive_whose_serial_has_no_row_is_named_by_it() -> None:
    values = parse_values("serial,hostname\nABC123,pi-a\nDEF456,pi-b\n", "class.csv")
    with pytest.raises(SettingsError) as info:
        resolve(Settings(hostname="{hostname}"), values, DriveContext(1, 1, serial="XYZ"))
    assert str(info.value) == "class.csv has no row for drive 1 (serial XYZ): 2 rows"


def test_a_csv_not_in_utf8_says_its_line_and_how_to_save_it(tmp_path: Path) -> None:
    image = pi_image.build(tmp_path, table="mbr")
    toml, values = tmp_path / "class.toml", tmp_path / "class.csv"
    toml.write_text('hostname = "{hostname}"\n')
    values.write_bytes("seq,hostname,name\n1,pi-01,Müller\n".encode("cp1252"))
    fd = os.open(image, os.O_RDONLY)
    try:
        with pytest.raises(SettingsError) as info:
            load_customization(str(toml), str(values), None,
                               lambda offset, length: os.pread(fd, length, offset))
    finally:
        os.close(fd)
    assert str(info.value) == f'{values}: not UTF-8 text (line 2): save it as "CSV UTF-8"'
