"""A CSV keyed by serial, and a drive that reports none (a loop device, some card readers): the
refusal said "(serial ): 1 rows", as if the serial were blank in the CSV; it now says the drive
has none, so that no row can be its (and a serial is no longer said twice)."""

from __future__ import annotations

import pytest

from popsicle_py.settings import DriveContext, Settings, SettingsError, parse_values, resolve


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
