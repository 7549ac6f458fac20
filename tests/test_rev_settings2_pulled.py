"""A drive pulled during its boot-files step is said as removed, as anywhere else in a run: a
pulled USB stick's capacity reads 0 until udev drops its node, and mcopy then fails with "seek:
Invalid argument; init :: could not read boot sector; ...", which the old code gave as the
drive's error (cause "error") instead of "the drive was removed" (cause "removed").

The pull is played by the ``mcopy`` stand-in: it empties the loop device's backing file and has
the loop device re-read its size (0), then runs the real mcopy.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pi_image
import pytest
from conftest import Loop, popsicle_cmd
from test_customize import FILL, summary_of

pytestmark = pytest.mark.root


def test_a_drive_pulled_during_its_boot_files_is_said_removed(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image = pi_image.build(tmp_path, table="mbr")
    toml = tmp_path / "settings.toml"
    toml.write_text('hostname = "pi-01"\n')
    loop = loop_factory(image.stat().st_size, fill=FILL)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mcopy").write_text(f"#!/bin/sh\ntruncate -s 0 {loop.backing}\n"
                                f"losetup -c {loop.path}\nexec /usr/bin/mcopy \"$@\"\n")
    (fake / "mcopy").chmod(0o755)
    done = subprocess.run([*popsicle_cmd(), "flash", str(image), loop.path, "--yes", "--json",
                           "--customize", str(toml)], capture_output=True, text=True,
                          timeout=120, check=False,
                          env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert done.returncode == 1, done.stderr + done.stdout
    (result,) = summary_of(done.stdout)["results"]
    assert result["status"] == "failed" and result["cause"] == "removed", result
    assert result["error"] == f"{loop.path}: the drive was removed", result
