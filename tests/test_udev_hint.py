"""`watch` without a udev daemon says that no drive will be seen, instead of waiting silently.

The end-to-end cases run the command in a private mount namespace with a tmpfs on /run, with
and without udevd's control socket, so they do not depend on what this machine runs.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import popsicle_cmd
from loopdev import DROP_OTHER_TESTS_MOUNTS, new_mount_namespace

from popsicle_py.drives import NO_UDEV_NOTE, udev_note


def test_udev_note_only_when_no_daemon_and_no_testbed() -> None:
    assert udev_note(control_exists=False, testbed=False) == NO_UDEV_NOTE
    assert udev_note(control_exists=True, testbed=False) is None
    assert udev_note(control_exists=False, testbed=True) is None  # umockdev sends the events
    assert "no plugged-in drive will be seen" in NO_UDEV_NOTE


def _watch_events(tmp_path: Path, with_control: bool) -> list[dict[str, object]]:
    """Run `watch --json` until it listens, stop it with SIGINT; its JSON events."""
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(1 << 20))
    setup = "mount -t tmpfs install-udev-hint /run"
    if with_control:
        setup += " && mkdir /run/udev && touch /run/udev/control"
    command = " ".join(f"'{c}'" for c in popsicle_cmd())
    env = {k: v for k, v in os.environ.items() if k != "UMOCKDEV_DIR"}
    proc = subprocess.Popen(
        [*new_mount_namespace(), "sh", "-c",
         f"{DROP_OTHER_TESTS_MOUNTS}{setup} && exec {command} watch --yes --json '{image}'"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while not any('"watching"' in line for line in lines):
            assert time.monotonic() < deadline, lines
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                line = proc.stdout.readline()
                assert line, f"watch ended early: {proc.stderr.read() if proc.stderr else ''}"
                lines.append(line)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err  # nothing was being written: the normal way to end
    events = [json.loads(line) for line in [*lines, *out.splitlines()]]
    # Another test's loop device made while this one prepared is announced, never eligible.
    return [e for e in events if not (e["event"] == "drive_added" and not e["eligible"])]


@pytest.mark.root
def test_watch_says_no_drive_will_be_seen_without_udevd(tmp_path: Path) -> None:
    events = _watch_events(tmp_path, with_control=False)
    assert events[0] == {"event": "note", "text": _not_a_disk_image(tmp_path)}
    assert events[1] == {"event": "note", "text": NO_UDEV_NOTE}
    assert [e["event"] for e in events[2:]] == ["watching", "summary"]


@pytest.mark.root
def test_watch_says_nothing_of_udev_when_udevd_listens(tmp_path: Path) -> None:
    events = _watch_events(tmp_path, with_control=True)
    assert events[0] == {"event": "note", "text": _not_a_disk_image(tmp_path)}
    assert [e["event"] for e in events[1:]] == ["watching", "summary"]


def _not_a_disk_image(tmp_path: Path) -> str:
    """The confirmation's note on the test's random image: with --yes and --json, nothing
    else says it to the script (it came only at the question, which --yes skips)."""
    return (f"{tmp_path / 'image.img'} has no partition table, ISO 9660 or file system "
            "signature at its start: make sure it is a disk image")


