"""Record the guest's real udev and sysfs trees with ``umockdev-record``.

``tests/vm/run --record`` boots the guest and writes tests/fixtures/vm-*.umockdev: a plain
stick, a stick behind a hub, the two-LUN card reader, the SATA disk and the virtio disk, as
the real kernel and systemd-udevd present them.  The fast unit tests run on these files.
"""

from __future__ import annotations

import re
from pathlib import Path

from loopdev import merge_descriptions as merge

from .guest import Guest

__all__ = ["RECORDINGS", "merge", "record_all"]

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

#: Fixture name -> the drives (ids of tests/vm/guest.default_topology) it holds.
RECORDINGS = {"vm-usb-stick": ("stick",), "vm-usb-stick-hub": ("hubstick",),
              "vm-usb-reader-2lun": ("lun0", "lun1"), "vm-sata": ("sata",),
              "vm-virtio": ("virtio",)}

#: Attributes whose values change from boot to boot or second to second; dropped so the
#: recordings stay the same between runs and diffs show what matters.
VOLATILE = re.compile(r"^(A: (stat|inflight|diskseq|uevent)=|E: (USEC_INITIALIZED|SEQNUM)=|"
                      r"A: power/.*_time=|A: .*/(stat|inflight)=)")


def clean(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not VOLATILE.match(line)) + "\n"


def record_all(guest: Guest, where: dict[str, str]) -> dict[str, str]:
    """Fixture name -> umockdev description, recorded in the guest now."""
    out: dict[str, str] = {}
    # One run per fixture: a single umockdev-record of all six drives took over 300 s here,
    # against about 60 s for the five runs.
    for name, disks in RECORDINGS.items():
        nodes = [where[d] for d in disks]
        out[name] = clean(guest.sh("umockdev-record " + " ".join(nodes), timeout=120))
    return out


def main() -> None:
    from test_vm import guest_drives  # tests/ is on sys.path when run through tests/vm/run

    from .guest import booted

    with booted() as guest:
        guest.settle()
        for name, text in record_all(guest, guest_drives(guest)).items():
            (FIXTURES / f"{name}.umockdev").write_text(text)
            print(f"wrote {FIXTURES / name}.umockdev ({len(text.splitlines())} lines)")


if __name__ == "__main__":
    main()
