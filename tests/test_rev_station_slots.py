"""``popsicle-py slots`` where it cannot work, and its Ctrl-C: it says so, in its own words."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import popsicle_cmd

no_udevd = pytest.mark.skipif(os.path.exists("/run/udev/control"),
                              reason="needs a machine without a udev daemon (a container)")


@no_udevd
def test_slots_without_a_udev_daemon_says_no_stick_will_be_seen_and_ctrl_c_cancels(
        tmp_path: Path) -> None:
    """It waited for a stick in silence (none can ever be seen without udevd), and Ctrl-C
    said "stopping every drive" though it never opens one.  Now it says why no stick will
    come, and Ctrl-C says only that no map was written (130)."""
    target = tmp_path / "tower.toml"
    env = {k: v for k, v in os.environ.items() if k != "UMOCKDEV_DIR"}
    proc = subprocess.Popen([*popsicle_cmd(), "slots", str(target), "--count", "2"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("plug a stick into slot 1"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    text = "".join(lines) + out
    assert proc.returncode == 130, err
    assert "no udev daemon is running" in text, text
    assert text.index("no udev daemon") < text.index("plug a stick into slot 1")
    assert err == "cancelled: no slot map written\n", err
    assert not target.exists()
