"""--certificate DIR on a file system that is full: refused before any drive is written
(it was found only at each drive's end: every drive written, none certified, exit 0), and
a directory that fills up mid-run is named in each drive's note."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from popsicle_py import events
from tests.conftest import popsicle_cmd
from tests.loopdev import Loop, fill_up, tiny_tmpfs

pytestmark = pytest.mark.root
MiB = 1 << 20


def test_a_full_certificate_directory_is_refused_before_writing(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 * MiB))
    loop = loop_factory(2 * MiB, fill=0x5A)
    before = loop.read(2 * MiB)
    with tiny_tmpfs(tmp_path, "256k") as mnt:
        (mnt / "certs").mkdir()
        fill_up(mnt)
        done = subprocess.run([*popsicle_cmd(), "flash", str(image), loop.path, "--yes",
                               "--certificate", str(mnt / "certs")],
                              capture_output=True, text=True, timeout=60)
        left = sorted(p.name for p in (mnt / "certs").iterdir())
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == (f"popsicle-py: --certificate {mnt / 'certs'}: cannot write "
                                   "a certificate there: No space left on device"), done.stderr
    assert loop.read(2 * MiB) == before
    assert left == []


def test_a_directory_that_fills_up_is_named_in_the_failure(tmp_path: Path) -> None:
    from popsicle_py.certify.writer import CertificateWriter

    with tiny_tmpfs(tmp_path, "256k") as mnt:
        writer = CertificateWriter(str(mnt), None, "disk.img", None)
        try:
            fill_up(mnt)
            result = events.DriveResult("/dev/sdb", events.Status.OK, 1 * MiB, verified=True,
                                        device_sha256="ab" * 32)
            with pytest.raises(OSError) as failed:
                writer.certify(result, [((0, 1 * MiB), bytes(16))], 0.0)
        finally:
            writer.close()
        assert str(failed.value) == f"{mnt}: No space left on device"
        assert sorted(p.name for p in mnt.iterdir()) == ["filler"]
