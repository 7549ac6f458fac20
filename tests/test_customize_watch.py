"""watch --customize under umockdev: each stick plugged in gets the next row's settings, and
once the rows ran out a stick is announced and left alone, the session going on."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pi_image
import pytest
from test_watch import WATCHING, C, D, needs_testbed, result_of, watch

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK7y7UxIbBf10hjkkKaoDhFxSFdfZG1ZjTmXCUdxf9Rz a@x"


@needs_testbed
@pytest.mark.umockdev
def test_watch_stops_taking_drives_when_the_rows_run_out(tmp_path: Path) -> None:
    image = pi_image.build(tmp_path, table="mbr", boot_mib=40, root_mib=8)
    toml, values = tmp_path / "class.toml", tmp_path / "class.csv"
    toml.write_text('hostname = "{hostname}"\nuser = "student"\n'
                    'ssh_authorized_keys = ["{ssh_key}"]\n')
    values.write_text(f"seq,hostname,ssh_key\n1,pi-01,{KEY}\n")
    run = watch(tmp_path, [str(image), "--yes", "--customize", str(toml), "--values",
                           str(values), "--customize-format", "cloud-init"],
                [WATCHING, {"add": C.description}, result_of(C),
                 {"wait": {"event": "phase", "device": C.dev, "detail": "powered off"}},
                 {"add": D.description},
                 {"wait": {"event": "drive_added", "device": D.dev}},
                 {"signal": int(signal.SIGTERM)}],
                read=(C.dev, D.dev), timeout=60)
    (added,) = run.of("drive_added", device=D.dev)
    assert added["eligible"] is False
    assert "has no row for drive 2" in added["reason"]
    result = run.results()[C.dev]
    assert result["status"] == "ok", result
    assert result["customized"]["values"]["hostname"] == "pi-01"
    assert run.files[D.dev] == b""  # never written
    written = tmp_path / "c.img"
    written.write_bytes(run.files[C.dev] or b"")
    user_data = subprocess.run(["mtype", "-i", f"{written}@@{4 << 20}", "::/user-data"],
                               capture_output=True, check=True).stdout
    assert b'hostname: "pi-01"' in user_data and KEY.encode() in user_data
    assert run.rc == 0, run.stderr


@needs_testbed
@pytest.mark.umockdev
def test_watch_refuses_a_second_stick_for_a_host_name_taken_in_flight(tmp_path: Path) -> None:
    """Two sticks whose settings give one host name, both taken as the session starts (as
    two plugged in together): the second is refused as it arrives, before a byte is written,
    not failed at its boot files after the image.  (Present at the start, the two are
    admitted one after the other before the first is written: no race with its end.)"""
    image = pi_image.build(tmp_path, table="mbr", boot_mib=40, root_mib=8)
    toml = tmp_path / "one.toml"
    toml.write_text('hostname = "pi"\nuser = "student"\n')
    run = watch(tmp_path, [str(image), "--yes", "--include-present", "--customize", str(toml),
                           "--customize-format", "cloud-init"],
                [{"wait": {"event": "drive_added", "device": D.dev}}, result_of(C),
                 {"signal": int(signal.SIGTERM)}],
                present=(C.description, D.description), read=(C.dev, D.dev), timeout=60)
    (added,) = run.of("drive_added", device=D.dev)
    assert added["eligible"] is False, added
    assert "hostname 'pi' was given to a drive already" in added["reason"]
    assert run.files[D.dev] == b""  # never written
    result = run.results()[C.dev]
    assert result["status"] == "ok", result
    assert result["customized"]["values"]["hostname"] == "pi"
    assert D.dev not in run.results()
    assert run.rc == 0, run.stderr
