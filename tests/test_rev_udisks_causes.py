"""The cause a program reads (JSON events, reports) for a drive udisks2 could not open.

Every failure udisks2 worded was "permission", a hung udisks2 and a lost system bus too, so a
station's log sent its operator to polkit's rules for a daemon that had stopped.
"""

from __future__ import annotations

import errno

import pytest

from popsicle_py import failures, udisks
from popsicle_py.events import Cause


@pytest.mark.parametrize(("code", "line", "cause"), [
    (errno.EACCES, "not authorized to open /dev/sdb (polkit refused)", Cause.PERMISSION),
    (errno.ETIMEDOUT, "/dev/sdb: udisks2 stopped answering (nothing for 25 s): restart it, "
                      "or run with sudo", Cause.ERROR),
    (errno.ECONNRESET, "/dev/sdb: the connection to udisks2 was lost (the system bus went "
                       "away: Connection reset by peer)", Cause.ERROR),
    (errno.ENOENT, "udisks2 is not running (Message recipient disconnected from message bus "
                   "without replying)", Cause.ERROR),
    (errno.ENXIO, "/dev/sdb: udisks2 opened another device than the one selected; nothing "
                  "was written to it", Cause.CHANGED),
    (errno.EBUSY, "/dev/sdb: busy: Device is busy", Cause.BUSY),
    (errno.EINTR, "/dev/sdb: cancelled", Cause.CANCELLED),
])
def test_a_udisks_failure_keeps_its_words_and_gets_its_own_cause(code: int, line: str,
                                                                 cause: Cause) -> None:
    said = failures.failure(udisks.UdisksError(code, line), "/dev/sdb")
    assert (said.cause, said.text) == (cause, line)
