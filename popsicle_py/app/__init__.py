"""The application layer: one request per use case, prepared (every check), then run.

Every front end (the CLI, a station's page and API, a GUI, a library user) goes through here::

    from popsicle_py import app
    from popsicle_py.view import PlainView
    from popsicle_py.signals import Cancellation

    request = app.FlashRequest(app.SourceOptions("disk.img"),
                               app.TargetOptions(devices=("/dev/sdb", "/dev/sdc")))
    with app.prepare_flash(request) as job:      # raises Refused (exit 2): nothing written
        print(job.confirmation.question)         # show job.confirmation, ask
        summary = job.run(PlainView(), Cancellation())
    print(summary.ok)

``prepare_*`` raises :class:`popsicle_py.errors.Refused` for every problem found before a
byte is written; ``run(view, cancel)`` emits events to the view (a
:class:`popsicle_py.protocols.View`) and returns the :class:`popsicle_py.events.Summary`.

The requests are imported at once (plain data, cheap); the use cases on first use, so that a
front end can build its options from this package without importing drives, images or the
engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from popsicle_py.app.requests import (
    CustomizeOptions,
    EngineOptions,
    FlashRequest,
    GradeOptions,
    ProbeRequest,
    SourceOptions,
    TargetOptions,
    VerifyRequest,
    WatchRequest,
    WriteOptions,
)

if TYPE_CHECKING:
    from popsicle_py.app.check import CheckRequest, PreparedCheck, prepare_check
    from popsicle_py.app.common import exit_status
    from popsicle_py.app.confirm import Confirmation, TargetRow
    from popsicle_py.app.erase import EraseRequest, PreparedErase, prepare_erase
    from popsicle_py.app.flash import PreparedFlash, prepare_flash
    from popsicle_py.app.listing import DriveListing, cache_entries, clean_cache, list_drives
    from popsicle_py.app.read import PreparedRead, ReadRequest, prepare_read
    from popsicle_py.app.verify import (
        PreparedProbe,
        PreparedVerify,
        prepare_probe,
        prepare_verify,
    )
    from popsicle_py.app.watch import PreparedWatch, prepare_watch

_LAZY = {
    "exit_status": "common",
    "CheckRequest": "check", "PreparedCheck": "check", "prepare_check": "check",
    "Confirmation": "confirm", "TargetRow": "confirm",
    "PreparedFlash": "flash", "prepare_flash": "flash",
    "DriveListing": "listing", "list_drives": "listing", "cache_entries": "listing",
    "clean_cache": "listing",
    "PreparedVerify": "verify", "prepare_verify": "verify",
    "PreparedProbe": "verify", "prepare_probe": "verify",
    "PreparedWatch": "watch", "prepare_watch": "watch",
    "ReadRequest": "read", "PreparedRead": "read", "prepare_read": "read",
    "EraseRequest": "erase", "PreparedErase": "erase", "prepare_erase": "erase",
}

__all__ = [
    "CheckRequest", "Confirmation", "CustomizeOptions", "DriveListing", "EngineOptions",
    "EraseRequest",
    "FlashRequest", "GradeOptions", "PreparedCheck", "PreparedErase", "PreparedFlash",
    "PreparedProbe", "PreparedRead", "PreparedVerify", "PreparedWatch", "ProbeRequest",
    "ReadRequest", "SourceOptions", "TargetOptions", "TargetRow", "VerifyRequest",
    "WatchRequest", "WriteOptions", "cache_entries", "clean_cache", "exit_status",
    "list_drives", "prepare_check", "prepare_erase", "prepare_flash", "prepare_probe",
    "prepare_read", "prepare_verify", "prepare_watch",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'popsicle_py.app' has no attribute {name!r}")
    return getattr(importlib.import_module(f"popsicle_py.app.{module}"), name)
