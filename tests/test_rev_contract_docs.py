"""What README says of the JSON stream is what the commands print.

``probe --json`` has no ``start`` event, like ``read`` and ``erase``; README named only those
two, so a script waiting for ``start`` before its first drive from probe waited for nothing.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd

MiB = 1 << 20
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.root
def test_the_commands_without_a_start_event_are_the_ones_readme_names(
        loop_factory: Callable[..., Loop]) -> None:
    loop = loop_factory(16 * MiB)
    done = subprocess.run([*popsicle_cmd(), "probe", "--json", "--yes", loop.path],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    kinds = [json.loads(line)["event"] for line in done.stdout.splitlines()]
    assert "start" not in kinds and kinds[-1] == "summary"
    text = " ".join(README.read_text().split())
    assert "`probe`, `read` and `erase` have no `start` event" in text


def test_readme_says_when_the_summary_is_not_last() -> None:
    """A second signal quits at once (README's "What happens when"): no summary then."""
    text = " ".join(README.read_text().split())
    assert "only a second signal, which quits at once, leaves the output where it was" in text
