"""``popsicle-py probe``: each opened drive's real capacity, all at once, under one supervisor
as a flash's drives are (the probe itself is :mod:`popsicle_py.probe`)."""

from __future__ import annotations

from collections.abc import Sequence

from popsicle_py.blockdev import BlockDevice
from popsicle_py.errors import Cancelled
from popsicle_py.events import Cause, DriveInfo, Phase, Probed, Status, Step, Summary
from popsicle_py.flash import CancelCheck, Emit, _Job
from popsicle_py.messages import BusWriterMessage
from popsicle_py.probe import ProbeResult
from popsicle_py.records import record


class ProbeJob(_Job):
    """Probe each opened drive's real capacity (``popsicle-py probe``), all at once: one
    supervisor, as for a flash (each probe on its own thread, events from the calling thread,
    a drive that stops answering failed as stalled on time)."""

    verifies = False

    def __init__(self, devices: Sequence[BlockDevice], emit: Emit, cancel: CancelCheck,
                 stall_timeout: float | None = 60.0, infos: Sequence[DriveInfo] = ()) -> None:
        super().__init__(devices, emit, cancel, infos)
        self.stall_timeout = stall_timeout

    def run(self) -> Summary:
        from popsicle_py import probe as probe_mod
        from popsicle_py.engine.supervisor import Lane, Supervisor

        supervisor = Supervisor([d.device for d in self.drives], self._on_message, self.cancel,
                                stall_timeout=self.stall_timeout,
                                errored=BusWriterMessage.Errored, name="probe")

        def task(lane: Lane) -> None:
            lane.waiting = False
            lane.touch()
            result = probe_mod.probe_device(lane.dest, stopped=lambda: lane.stopped,
                                            answered=lane.answered,
                                            given_up=lambda: lane.abandoned)
            lane.post(_Probed(lane.id, result))

        for drive in self.drives:
            self.emit(Phase(drive.path, Step.PROBING))
        try:
            supervisor.run(task)
        except Cancelled:
            self._cancel_rest()
        finally:
            self._close_all()
        for drive in self._live():
            self._end(drive, Status.FAILED, f"{drive.path}: did not finish", cause=Cause.ERROR)
        return self._summary()

    def _on_message(self, msg: _Probed | BusWriterMessage.Errored) -> None:
        drive = self.drives[msg.id]
        if isinstance(msg, BusWriterMessage.Errored):
            self._fail(drive, msg.why)
            return
        result = msg.result
        if result.error is not None and self.cancel():  # stopped by the signal, not the drive
            return self._end(drive, Status.CANCELLED, "cancelled", cause=Cause.CANCELLED)
        self.emit(Probed(drive.path, result.claimed, result.real_estimate, result.ok,
                         result.message, result.elapsed))
        if result.ok:
            return self._end(drive, Status.OK)
        cause = Cause.IO_ERROR if result.error is not None else Cause.COUNTERFEIT
        self._end(drive, Status.FAILED, f"{drive.path}: {result.message}", cause=cause)


@record
class _Probed:
    id: int
    result: ProbeResult
