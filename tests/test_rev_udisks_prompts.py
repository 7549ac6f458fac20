"""Without root, once polkit refuses one drive the run is refused: the next drives' passwords
are not asked for in vain (tests/udisks_harness.py's real udisks2 and polkit, pkttyagent on a
terminal)."""

from __future__ import annotations

import io
import os
import re

import pytest
import udisks_harness as harness
from conftest import popsicle_cmd
from test_udisks import IMAGE_SIZE, PATTERN, SIZE, Loop, _fake, _loops, why_not


@pytest.mark.parametrize("command", ["flash", "read"])
def test_no_password_is_asked_after_a_drive_was_refused(command: str) -> None:
    """sdb's password given, sdc's refused: exit 2 on that refusal, sdd never asked for, and
    nothing written to any (nor read).  (Before, sdd's password was asked for too, then
    nothing was written anyway.)"""
    import pexpect

    if why_not is not None:
        pytest.skip(why_not)
    with _loops(3) as (b, c, d):
        for loop in (b, c, d):
            loop.fill()
        drives = [_fake("sdb", b, True), _fake("sdc", c, False), _fake("sdd", d, True)]
        with harness.running(drives, extra_rule=harness.AUTH_SELF_FOR_STICKS) as stack:
            image = stack.work / "image.img"
            image.write_bytes(os.urandom(IMAGE_SIZE))
            image.chmod(0o644)
            home = stack.work / "home"
            args = {"flash": ["flash", str(image), "/dev/sdb", "/dev/sdc", "/dev/sdd", "--yes",
                              "--no-probe"],
                    "read": ["read", *(str(a) for name in "bcd"
                                       for a in (f"/dev/sd{name}", home / f"{name}.img"))]}
            argv = stack.command([*popsicle_cmd(), *args[command]])
            child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=60,
                                  cwd=str(stack.work))
            child.logfile_read = io.StringIO()
            asked = []
            try:
                for answer in (harness.PASSWORD, "not the password", harness.PASSWORD):
                    if child.expect([r"\((/dev/sd.)\)", pexpect.EOF]) == 1:
                        break
                    asked.append(child.match.group(1))
                    child.expect("Password:")
                    child.sendline(answer)
                else:
                    child.expect(pexpect.EOF)
            finally:
                child.close(force=True)
            said = re.sub(r"\x1b\[[0-9;]*m", "", child.logfile_read.getvalue())
            assert child.exitstatus == 2, said + stack.logs()
            assert asked == ["/dev/sdb", "/dev/sdc"], said
            assert said.splitlines()[-1] == (
                "popsicle-py: not authorized to open /dev/sdc (polkit refused)")
            for loop in (b, c, d):
                assert _untouched(loop)
            assert not list(home.iterdir()), "an OUTPUT was made"


def _untouched(loop: Loop) -> bool:
    return loop.read(SIZE) == bytes([PATTERN]) * SIZE
