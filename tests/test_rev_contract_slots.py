"""``slots FILE`` and ``records``: bad input refused at once (one line, exit 2).

The map is written only once a stick was plugged into every slot in turn; a FILE in a
directory that does not exist was found out only then (the person's work lost), and until
then the command waited for sticks.  Bad input: one line, exit 2, at once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import popsicle_cmd


def test_slots_refuses_a_file_in_a_missing_directory_at_once(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "slots.toml"
    done = subprocess.run([*popsicle_cmd(), "slots", str(target), "--count", "2"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=20, check=False)
    assert done.returncode == 2
    assert done.stderr == (f"popsicle-py: {target}: its directory {target.parent} is not a "
                           "writable directory\n")
    assert "plug" not in done.stdout


def test_records_refuses_json_and_csv_together() -> None:
    """``records --json --csv`` printed JSON, the --csv dropped without a word."""
    done = subprocess.run([*popsicle_cmd(), "records", "--csv", "--json"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=20, check=False)
    assert done.returncode == 2
    assert "popsicle-py: --json and --csv contradict each other; give one\n" in done.stderr
