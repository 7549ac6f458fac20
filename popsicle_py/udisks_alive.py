"""Are udisks2, and polkit which it waits on, still there while a call waits for a password?

A call that polkit may turn into a password prompt has no time limit: the user may take
minutes.  But a daemon that stopped answering (its process stopped or wedged) looks the same
from here, and would hold the run for good: a station has nobody to press Ctrl-C, and
``--stall-timeout`` does not reach a drive that was never opened.  So while such a call waits,
each daemon is asked for one of its properties now and then, a question answered by its main
loop without polkit or the user: one not answered within the time limit means that daemon
hung, and the call is given up.  Any answer counts, an error too (a daemon not on the bus
cannot hold the call: the bus answers for it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from popsicle_py.records import record

if TYPE_CHECKING:
    from jeepney import Message


@record
class Probe:
    """One cheap question to one daemon (a property of its main object)."""

    daemon: str  # as the user reads it
    bus_name: str
    path: str
    interface: str
    name: str


PROBES = (
    Probe("udisks2", "org.freedesktop.UDisks2", "/org/freedesktop/UDisks2/Manager",
          "org.freedesktop.UDisks2.Manager", "Version"),
    Probe("polkit", "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
          "org.freedesktop.PolicyKit1.Authority", "BackendName"),
)


def question(probe: Probe) -> Message:
    """Properties.Get of the probe's property."""
    from jeepney import DBusAddress, new_method_call

    address = DBusAddress(probe.path, probe.bus_name, "org.freedesktop.DBus.Properties")
    return new_method_call(address, "Get", "ss", (probe.interface, probe.name))


class Heartbeat:
    """Asks every :data:`PROBES` daemon a question each ``every`` seconds (one round at a
    time); :meth:`hung` names the first that has not answered within ``limit`` seconds.

    ``send(message)`` sends and returns the serial; ``answered(serial)`` takes the reply when
    it has come; ``drop(serial)`` forgets a question given up.
    """

    def __init__(self, send: Callable[[Message], int], answered: Callable[[int], bool],
                 drop: Callable[[int], None], *, every: float, limit: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._send = send
        self._answered = answered
        self._drop = drop
        self._every = every
        self._limit = limit
        self._clock = clock
        self._waiting: dict[int, tuple[Probe, float]] = {}
        self._next = clock() + every

    def hung(self) -> str | None:
        """The daemon that has not answered in time, or None (a new round asked when due)."""
        now = self._clock()
        for serial, (probe, asked) in tuple(self._waiting.items()):
            if self._answered(serial):
                del self._waiting[serial]
            elif now - asked > self._limit:
                return probe.daemon
        if not self._waiting and now >= self._next:
            for probe in PROBES:
                self._waiting[self._send(question(probe))] = (probe, now)
            self._next = now + self._every
        return None

    def close(self) -> None:
        """Forget the questions still out (their late answers are dropped)."""
        for serial in self._waiting:
            self._drop(serial)
        self._waiting.clear()
