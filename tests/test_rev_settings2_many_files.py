"""A [files] table of a thousand long names (welcome-student-0001.txt ...): mcopy makes each a
short name by trying NAME~1, NAME~2... against the whole directory, which took over a minute
per drive, after the drive's whole write: each drive then failed "stalled: ... (a dying or fake
drive?)".  Now refused at once (more than 256 files), one line, exit 2, nothing written; 256 are
taken and written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pi_image
import pytest
from conftest import Loop
from test_customize import FILL, mtype, one_line, popsicle

pytestmark = pytest.mark.root


def settings_with_files(tmp_path: Path, count: int) -> Path:
    (tmp_path / "welcome.txt").write_text("welcome\n")
    toml = tmp_path / "settings.toml"
    toml.write_text('hostname = "pi-01"\n[files]\n' + "".join(
        f'"welcome-student-{n:04d}.txt" = "welcome.txt"\n' for n in range(count)))
    return toml


def test_a_thousand_files_are_refused_before_writing(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image = pi_image.build(tmp_path, table="mbr")
    toml = settings_with_files(tmp_path, 1000)
    loop = loop_factory(image.stat().st_size, fill=FILL)
    line = one_line(popsicle("flash", image, loop.path, "--yes", "--stall-timeout", "10",
                             "--customize", toml))
    assert "[files] names 1000 files; at most 256" in line and str(toml) in line, line
    assert Path(loop.backing).read_bytes()[:1 << 20] == bytes([FILL]) * (1 << 20)


def test_256_files_are_written(tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image = pi_image.build(tmp_path, table="mbr")
    toml = settings_with_files(tmp_path, 256)
    loop = loop_factory(image.stat().st_size, fill=FILL)
    done = popsicle("flash", image, loop.path, "--yes", "--customize", toml)
    assert done.returncode == 0, done.stderr + done.stdout
    assert mtype(loop, 4 << 20, "welcome-student-0255.txt") == b"welcome\n"
