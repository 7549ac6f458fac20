"""The defaults every front end shows and every layer uses, in a module that imports nothing.

The CLI builds its options from these before it imports anything heavy (``--help`` and
``--version`` stay fast); the engine, the plan and the watch session use the same values.
"""

from __future__ import annotations

#: The ring: 4 buckets of 16 MiB (flash); watch gives each drive in flight 4 of 4 MiB.
DEFAULT_BUCKET_SIZE = 16 << 20
DEFAULT_BUCKETS = 4
WATCH_BUCKET_SIZE = 4 << 20
WATCH_BUCKETS = 4
#: --all-usb and watch skip drives larger than this (a USB disk with someone's backups).
DEFAULT_MAX_AUTO_SIZE = 128 * 2**30
#: A drive that makes no progress for this long fails as stalled.
DEFAULT_STALL_TIMEOUT = 60.0
#: Where a station serves its page and API.
DEFAULT_LISTEN = "127.0.0.1:8737"
#: Buckets that fail verification are rewritten this many times.
DEFAULT_REPAIR_ATTEMPTS = 1
