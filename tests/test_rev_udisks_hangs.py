"""Without root, a daemon that stops answering while a drive is opened gives the shell back.

udisks2's OpenDevice may wait for a password as long as the user takes, so it has no time
limit of its own; but udisksd or polkitd frozen (SIGSTOP, wedged) while the call waits must
not hold the run for good: a station has nobody to press Ctrl-C.  The real stack of
tests/udisks_harness.py; a test's polkit rule holds the open (in polkit.spawn) until the test
has frozen the daemon.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import udisks_harness as harness
from conftest import popsicle_cmd
from test_udisks import _setup, _untouched

from popsicle_py import udisks

#: Generous: the liveness questions go out every 5 s and each has 25 s to be answered.
GIVE_UP = 60.0


def _hold_the_open(marks: Path) -> str:
    """A rule that, when /dev/sdb is opened, says so (``asked``) and waits for ``go``."""
    script = (f"touch {marks}/asked; n=0; while [ ! -e {marks}/go ] && [ $n -lt 180 ]; "
              "do sleep 0.05; n=$((n+1)); done")
    return ("\npolkit.addRule(function(action, subject) {\n"
            '    if (action.id.indexOf("org.freedesktop.udisks2.open-device") === 0 &&\n'
            '        action.lookup("device") === "/dev/sdb") {\n'
            f'        polkit.spawn(["/bin/sh", "-c", "{script}"]);\n'
            "    }\n"
            "    return polkit.Result.NOT_HANDLED;\n"
            "});\n")


def _pid(stack: harness.Udisks, name: str) -> int:
    found = subprocess.run(["pgrep", "-g", str(stack.process.pid), "-x", name],
                           capture_output=True, text=True, check=True).stdout.split()
    assert len(found) == 1, found
    return int(found[0])


@contextlib.contextmanager
def _marks() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="popsicle-udisks-marks-") as made:
        os.chmod(made, 0o777)
        yield Path(made)


def _wait_for(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never came"
        time.sleep(0.05)


def _finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=GIVE_UP)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"still waiting for the drive's open {GIVE_UP:g} s on")
    return process.returncode, out, err


def test_udisksd_frozen_during_the_open_fails_the_run_on_time() -> None:
    """udisksd got OpenDevice and froze: exit 2 with one line naming it, nothing written.
    (Before, the run waited forever: the open had no time limit, for the password's sake.)"""
    with _marks() as marks, _setup(extra_rule=_hold_the_open(marks)) as setup:
        setup.stick.fill()
        argv = setup.stack.command([*popsicle_cmd(), "flash", str(setup.image), "/dev/sdb",
                                    "--yes", "--no-probe", "--stall-timeout", "3"])
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        udisksd = _pid(setup.stack, "udisksd")
        try:
            _wait_for(marks / "asked", process)
            os.kill(udisksd, signal.SIGSTOP)
            (marks / "go").touch()
            status, out, err = _finish(process)
        finally:
            os.kill(udisksd, signal.SIGCONT)
        assert status == 2, out + err
        assert err.splitlines() == [
            "popsicle-py: /dev/sdb: udisks2 stopped answering (nothing for 3 s): restart it, "
            "or run with sudo"]
        assert _untouched(setup.stick)


def test_polkitd_frozen_fails_the_run_on_time() -> None:
    """udisksd waits on polkit, which is frozen: the same, polkit named, after
    --stall-timeout's 3 s (before: D-Bus' 25 s whatever --stall-timeout said)."""
    with _setup() as setup:
        setup.stick.fill()
        polkitd = _pid(setup.stack, "polkitd")
        os.kill(polkitd, signal.SIGSTOP)
        try:
            started = time.monotonic()
            try:
                result = setup.stack.run([*popsicle_cmd(), "flash", str(setup.image),
                                          "/dev/sdb", "--yes", "--no-probe",
                                          "--stall-timeout", "3"], timeout=GIVE_UP)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still waiting for polkit {time.monotonic() - started:.0f} s on")
        finally:
            os.kill(polkitd, signal.SIGCONT)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.splitlines() == [
            "popsicle-py: /dev/sdb: polkit stopped answering (nothing for 3 s): restart it, "
            "or run with sudo"]
        assert time.monotonic() - started < 20  # 3 s twice, and the process's own start
        assert _untouched(setup.stick)



def test_the_system_bus_gone_during_the_open_is_said_so() -> None:
    """dbus-daemon dies while the stick's open waits: one line saying the bus went away, not
    the drive's fault.  (Before: "/dev/sdb: Connection reset by peer", as if the stick had.)"""
    with _marks() as marks, _setup(extra_rule=_hold_the_open(marks)) as setup:
        setup.stick.fill()
        argv = setup.stack.command([*popsicle_cmd(), "flash", str(setup.image), "/dev/sdb",
                                    "--yes", "--no-probe"])
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        _wait_for(marks / "asked", process)
        os.kill(_pid(setup.stack, "dbus-daemon"), signal.SIGKILL)
        (marks / "go").touch()
        status, out, err = _finish(process)
        assert status == 2, out + err
        lines = err.splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("popsicle-py: /dev/sdb: the connection to udisks2 was lost "
                                   "(the system bus went away: "), err
        assert _untouched(setup.stick)


def test_after_the_bus_went_away_the_line_says_so_not_install_udisks2() -> None:
    """A drive opened after the bus was lost (the next of a run, a later stick in a watch
    session) is refused with that reason, not "install udisks2"."""
    lost = udisks.Unavailable("no system bus", words=udisks.LOST)
    assert udisks.unavailable_words(lost, writing=True) == (
        "the system bus went away during the run, so this user's drives cannot be opened "
        "through udisks2: run with sudo, or try again once it is back")
    assert udisks.unavailable_words(udisks.Unavailable("no system bus"), writing=False) == (
        udisks.NEEDS_ROOT_TO_READ)


def test_a_frozen_system_bus_is_named_not_told_to_install_udisks2() -> None:
    """dbus-daemon stopped: one line says the bus did not answer, exit 2, nothing written.
    (Before: "install udisks2", which is installed and was never reached.)"""
    with _setup() as setup:
        setup.stick.fill()
        bus = _pid(setup.stack, "dbus-daemon")
        os.kill(bus, signal.SIGSTOP)
        try:
            result = setup.stack.run([*popsicle_cmd(), "flash", str(setup.image), "/dev/sdb",
                                      "--yes", "--no-probe"], timeout=GIVE_UP)
        finally:
            os.kill(bus, signal.SIGCONT)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.splitlines() == [
            "popsicle-py: the system bus (dbus-daemon) did not answer, so this user's drives "
            "cannot be opened through udisks2: run with sudo, or restart it"]
        assert _untouched(setup.stick)
