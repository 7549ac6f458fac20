"""list, records and cache list with --json print one JSON array, or nothing when refused.

Their output is one document, not events: on a usage error or a refusal they printed an
``error`` event and an empty summary, which a script parsing the array took for a malformed
answer (or, with ``jq '.[]'``, iterated as if it were one).  Now stdout stays empty: the line
on stderr and the exit status (2) say it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import popsicle_cmd


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *args], stdin=subprocess.DEVNULL, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("args", [
    ["list", "--json", "--bogus"],
    ["list", "--json", "extra"],
    ["cache", "list", "--json", "--bogus"],
    ["records", "--json", "--csv"],
    ["records", "--json", "--journal", "/nonexistent/journal.sqlite"],
])
def test_a_refused_json_listing_prints_nothing_on_stdout(args: list[str]) -> None:
    done = _run(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("popsicle-py: ") and done.stderr.count("\n") == 1, done.stderr


def test_an_event_command_still_ends_a_refusal_with_a_summary() -> None:
    done = _run("verify", "--json", "--bogus")
    assert done.returncode == 2
    assert json.loads(done.stdout.splitlines()[-1])["event"] == "summary"


def test_a_json_listing_is_one_array(tmp_path: Path) -> None:
    done = _run("cache", "list", "--json", env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
