"""The library's contract: README's example runs as written, and a request the engine cannot
run is refused by ``prepare_flash`` (``Refused``, exit status 2), nothing written.

A library builds its ``EngineOptions`` by hand, past the CLI's option checks: a bucket size of
0 passed every check and failed the run with "ValueError: range() arg 3 must not be zero",
the drive opened (and, in that process, held: the next prepare found it "in use").
"""

from __future__ import annotations

import io
import lzma
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop

from popsicle_py import app
from popsicle_py.errors import Refused
from popsicle_py.signals import Cancellation
from popsicle_py.view_json import JsonView

MiB = 1 << 20
README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.root


@pytest.mark.parametrize("engine", [app.EngineOptions(bucket_size=0),
                                    app.EngineOptions(bucket_size=1000),
                                    app.EngineOptions(buckets=0),
                                    app.EngineOptions(stall_timeout=float("nan"))])
def test_an_engine_that_cannot_run_is_refused_before_writing(
        engine: app.EngineOptions, tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    loop = loop_factory(8 * MiB, fill=0x5A)
    request = app.FlashRequest(app.SourceOptions(str(image)),
                               app.TargetOptions(devices=(loop.path,)), engine)
    with pytest.raises(Refused) as refused, app.prepare_flash(request) as job:
        job.run(JsonView(io.StringIO()), Cancellation())
    assert refused.value.exit_code == 2
    assert loop.read(8 * MiB) == bytes([0x5A]) * (8 * MiB)
    os.close(os.open(loop.path, os.O_RDONLY | os.O_EXCL))  # not held


def test_readme_library_example_runs_as_written(tmp_path: Path,
                                                loop_factory: Callable[..., Loop]) -> None:
    text = README.read_text()
    library = text[text.index("\n## Library"):]
    code = re.search(r"```python\n(.*?)```", library, re.S)
    assert code is not None
    data = os.urandom(2 * MiB)
    (tmp_path / "raspios.img.xz").write_bytes(lzma.compress(data, preset=0))
    drives = [loop_factory(8 * MiB), loop_factory(8 * MiB)]
    script = code.group(1).replace('("/dev/sdb", "/dev/sdc")',
                                   f'("{drives[0].path}", "{drives[1].path}")')
    assert script != code.group(1)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for drive in drives:
        assert f"{drive.path} ok" in [line.strip() for line in done.stdout.splitlines()]
        assert drive.read(len(data)) == data
