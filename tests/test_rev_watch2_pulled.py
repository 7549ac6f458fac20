"""A stick pulled between its arrival and its job's open, its "remove" uevent not read yet:
its node is gone.  It is a drive pulled before it was finished, and says so as the others do
("the drive was removed", cause ``removed``), not as an error to look into.  (Staged as a
stick whose node never appears: the session sees the same as when the pull wins the race.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_watch import WATCHING, D, MiB, image_file, needs_testbed, result_of, watch


@needs_testbed
@pytest.mark.umockdev
def test_a_stick_whose_node_is_gone_when_its_job_opens_it_ends_removed(tmp_path: Path) -> None:
    image, _ = image_file(tmp_path, 1 * MiB)
    without_node = D.description.replace("\nN: sdd\n", "\n")
    assert without_node != D.description
    run = watch(tmp_path, [str(image), "--yes", "--count", "1"],
                [WATCHING, {"add": without_node}, result_of(D)])
    assert run.rc == 1, run.stderr
    (result,) = run.summary["results"]
    assert (result["status"], result["error"], result["cause"]) == (
        "failed", f"{D.dev}: the drive was removed", "removed"), result
    assert run.of("phase", device=D.dev, phase="failed", detail=f"{D.dev}: the drive was removed")
