"""Row sets for the layout table test: every kind of column, at every width.

``python tests/layout_cases.py OLD_ROWS_PY > tests/fixtures/layout_rows.json`` records what a
``rows.py`` lays out at each width (a digest per width); test_view.py checks today's against it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
WIDTHS = range(10, 201)


def cases(rows: Any) -> dict[str, list[Any]]:
    """Named row sets built with the given ``rows`` module (old or new)."""
    Row = rows.Row
    why = "no space left on device (it failed, or is smaller than it claims)"
    stalled = ("stalled: no write finished for 30 s; the stick may be dying, or its port may "
               "be loose; pull it and try another port, then run verify on it")
    return {
        "sample": [
            Row("/dev/loop12", "writing", port="1-1.2", label="SanDisk Cruzer Blade",
                fraction=0.58, done=34 * MiB, total=58 * MiB, speed="23.4 MB/s", eta="0:12"),
            Row("/dev/loop3", "failed", port="2-2", fraction=0.07, done=4 * MiB,
                total=58 * MiB, detail=why, style="red"),
            Row("/dev/sdb", "verifying", fraction=0.91, done=50 * MiB, total=58 * MiB,
                speed="103.1 MB/s", eta="0:01"),
            Row("/dev/sdc", "done", fraction=1.0, done=58 * MiB, total=58 * MiB,
                speed="19.0 MB/s", eta="avg", style="green"),
        ],
        "one-unknown-size": [
            Row("/dev/sdb", "writing", fraction=None, done=21 * MiB, pulse=7),
        ],
        "one-bare": [Row("sdb", "waiting")],
        "long-everything": [
            Row("/dev/disk/by-id/usb-SanDisk_Cruzer_Blade_4C5300", "writing",
                port="1-1.2.3.4.1", label="Kingston DataTraveler 3.0 USB Device",
                fraction=0.333, done=3 * GiB, total=9 * GiB, speed="1.2 GB/s",
                eta=">99h"),
            Row("/dev/sdaa", "failed", port="3-10.4", label="Generic Flash Disk",
                fraction=0.5, done=GiB, total=2 * GiB, detail=stalled,
                long="failed (stalled)", style="red"),
            Row("/dev/sdab", "verifying", port="3-10.5", fraction=0.999, done=2 * GiB - 1,
                total=2 * GiB, speed="999.9 MB/s", eta="1:02:03", style="yellow"),
        ],
        "image-and-waiting": [
            Row("image", "reading", fraction=None, done=300 * MiB, speed="80.0 MB/s", pulse=3),
            Row("/dev/sdb", "waiting", port="1-2", bar=False, style="dim"),
            Row("/dev/sdc", "ignored", port="1-3", bar=False, detail="not removable",
                style="dim"),
        ],
        "details-only": [
            Row("/dev/loop0", "failed", fraction=0.0, total=8 * MiB, detail="read-only",
                style="red"),
            Row("/dev/loop1", "failed", fraction=0.01, done=80 * 1024, total=8 * MiB,
                detail=why + "; " + why, style="red"),
            Row("/dev/loop2", "done", fraction=1.0, done=8 * MiB, total=8 * MiB,
                label="x", speed="5.0 MB/s", eta="avg"),
        ],
        "empty": [],
    }


def render(blocks: Sequence[Sequence[Sequence[Any]]]) -> str:
    return json.dumps([[[[p.text, p.style] for p in line] for line in block]
                       for block in blocks], ensure_ascii=False)


def digest(blocks: Sequence[Sequence[Sequence[Any]]]) -> str:
    return hashlib.sha256(render(blocks).encode()).hexdigest()[:12]


def record(rows: Any, layout_rows: Callable[..., Any]) -> dict[str, str]:
    """Per row set, the digests of the layout at each width in ``WIDTHS``, space-separated."""
    return {name: " ".join(digest(layout_rows(case, width)) for width in WIDTHS)
            for name, case in cases(rows).items()}


if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("old_rows", sys.argv[1])
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_rows"] = old
    spec.loader.exec_module(old)
    data = {"widths": [WIDTHS.start, WIDTHS.stop - 1], **record(old, old.layout_rows)}
    print("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in data.items())
          + "\n}")
