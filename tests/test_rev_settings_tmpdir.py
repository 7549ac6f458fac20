"""A full $TMPDIR (where mcopy's files and fsck.vfat's copy of the boot metadata go) is said
as $TMPDIR's, never as the drive's "no space left on the drive (it failed, or is smaller
than it claims)", which blames a good stick and hints it is fake."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pi_image
import pytest
from conftest import Loop, popsicle_cmd
from loopdev import tiny_tmpfs
from test_bootfs import FILES, on_loop
from test_customize import FILL, inputs, one_line

from popsicle_py.settings import BootFsError, write_boot_files

pytestmark = pytest.mark.root


def test_a_full_tmpdir_is_refused_at_load(tmp_path: Path,
                                          loop_factory: Callable[..., Loop]) -> None:
    image = pi_image.build(tmp_path)
    toml, values = inputs(tmp_path)
    loop = loop_factory(image.stat().st_size, fill=FILL)
    with tiny_tmpfs(tmp_path, "64k") as full:  # room for mcopy's files, not the FAT's copy
        done = subprocess.run([*popsicle_cmd(), "flash", str(image), loop.path, "--yes",
                               "--customize", str(toml), "--values", str(values)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "TMPDIR": str(full)})
    line = one_line(done)
    assert f"the temporary directory {full} ($TMPDIR): No space left on device" in line, line
    assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size


def test_a_tmpdir_that_fills_during_the_run_fails_the_step_as_its_own(
        tmp_path: Path, loop_factory: Callable[..., Loop],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, loop, boot = on_loop(tmp_path, loop_factory, "mbr")
    with tiny_tmpfs(tmp_path, "64k") as full:  # room for mcopy's files, not the FAT's copy
        monkeypatch.setattr(tempfile, "tempdir", str(full))
        fd = os.open(loop.path, os.O_RDWR | os.O_EXCL | os.O_DIRECT)
        try:
            with pytest.raises(BootFsError) as failed:
                write_boot_files(fd, boot.partition, FILES)
        finally:
            os.close(fd)
    assert failed.value.errno is None  # the engine says this line, not an errno's words
    assert str(failed.value) == (f"the temporary directory {full} ($TMPDIR): No space left "
                                 "on device")
