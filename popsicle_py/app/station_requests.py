"""What a station front end asks for: plain data, cheap to import (the CLI builds these)."""

from __future__ import annotations

from popsicle_py.app.requests import WatchRequest
from popsicle_py.defaults import DEFAULT_LISTEN
from popsicle_py.records import record


@record
class StationRequest:
    """A duplicator station: ``watch``'s session, plus slots, a page, an API and a journal."""

    watch: WatchRequest
    #: The slot map (TOML): only its ports are written.  None: every eligible drive, each
    #: drive's slot labelled by its USB port path.
    slots: str | None = None
    #: HOST:PORT; port 0 picks a free one.
    listen: str = DEFAULT_LISTEN
    #: The bearer token every POST needs (created 0600 when missing).  None: beside the journal.
    token_file: str | None = None
    #: The SQLite journal.  None: /var/lib/popsicle-py (root) or ~/.local/share/popsicle-py.
    journal: str | None = None
    batch: str = ""
    operator: str = ""
    #: The station's name in records and on the page (None: the host name).
    name: str | None = None
    #: A command run for each drive that ends (its slot and result in the environment).
    hook: str | None = None


@record
class LearnRequest:
    """Make a slot map: a stick plugged into each slot in turn, the labels in this order."""

    path: str
    labels: tuple[str, ...]
