"""Odd settings files: arrays or tables nested a few hundred deep made tomllib recurse past
Python's limit ("unexpected error", exit 1; now one line, exit 2, nothing written); a file saved
with a byte order mark (Windows Notepad) was "not valid TOML" at line 1, column 1 (the CSV's BOM
was taken already).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pi_image
import pytest
from conftest import Loop
from test_customize import FILL, one_line, popsicle
from test_rev_settings2_secrets import flash, nothing_written

pytestmark = pytest.mark.root


@pytest.mark.parametrize("nested", ["[" * 3000 + "]" * 3000, "{a=" * 3000 + "1" + "}" * 3000])
def test_settings_nested_too_deeply_are_one_line(
        tmp_path: Path, loop_factory: Callable[..., Loop], nested: str) -> None:
    image = pi_image.build(tmp_path, table="mbr")
    toml = tmp_path / "settings.toml"
    toml.write_text(f"hostname = {nested}\n")
    loop = loop_factory(image.stat().st_size, fill=FILL)
    line = one_line(popsicle("flash", image, loop.path, "--yes", "--customize", toml))
    assert "nested too deeply" in line and str(toml) in line, line
    assert nothing_written(loop)


def test_a_settings_file_with_a_byte_order_mark_is_read(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    code, said, _ = flash(tmp_path, loop_factory,
                          b'\xef\xbb\xbfhostname = "pi-01"\nuser = "pi"\npassword = "p w"\n')
    assert code == 0, said
    assert "first-boot settings written (firstrun, hostname pi-01)" in said, said
