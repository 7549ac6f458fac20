"""--customize for a user who may not open the drive's node: udisks2 opens it for them, but the
boot-files step opens the drive again (mcopy through /dev/fd/N, the read-back through
/proc/self/fd/N), which the kernel checks against the node.  Each drive then failed with
"[Errno 13] Permission denied: '/proc/self/fd/3'" after its whole write; now the run is refused
before anything is written (flash), or the drive is not taken (watch), in one line.

Without udisks2 here, the user is played by a child that drops to ``nobody`` once the modules
are imported; it asks the app layer exactly what the prepared flash and watch ask.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pi_image
import pytest
from conftest import Loop

pytestmark = pytest.mark.root

AS_NOBODY = """
import os, sys
from popsicle_py import events, settings
from popsicle_py.app import customize
from popsicle_py.app.requests import CustomizeOptions
from popsicle_py.drives import Drive
from popsicle_py.errors import Refused
from popsicle_py.images.image import open_image

image, toml, path, which = sys.argv[1:]
opened, options = open_image(image), CustomizeOptions(toml)
watching = customize.for_watch(options, opened)  # the image read, as a station starts
drive = Drive(path=path, name=os.path.basename(path), devnum=os.stat(path).st_rdev, vendor="",
              model="", serial="", size=64 << 20, logical_block_size=512, bus="usb",
              removable=True, read_only=False, has_media=True, partitions=(), mountpoints=(),
              swap=False, eligible=True, reason=None, system=False)
os.setgid(65534)
os.setuid(65534)
if which == "flash":
    try:
        customize.for_flash(options, opened, [path], [events.DriveInfo(seq=1)])
    except Refused as exc:
        print("refused:", *exc.lines)
else:
    assert watching is not None
    print("admit:", watching.admit(drive, 1))
"""


@pytest.mark.parametrize("which", ["flash", "watch"])
def test_customize_for_a_user_who_cannot_open_the_drive_again_is_refused_before_writing(
        tmp_path: Path, loop_factory: Callable[..., Loop], which: str) -> None:
    built = pi_image.build(tmp_path, table="mbr")
    mine = Path(tempfile.mkdtemp(prefix="popsicle-user-", dir="/dev/shm"))
    try:  # the user's own files, which the user may read (pytest's tmp_path is root's only)
        mine.chmod(0o755)
        image, toml = mine / "pi.img", mine / "settings.toml"
        shutil.copyfile(built, image)
        toml.write_text('hostname = "pi-01"\n')
        loop = loop_factory(image.stat().st_size, fill=0x5A)  # brw------- root: as a stick
        done = subprocess.run([sys.executable, "-c", AS_NOBODY, str(image), str(toml),
                               loop.path, which], capture_output=True, text=True, timeout=60,
                              check=False)
    finally:
        shutil.rmtree(mine)
    assert done.returncode == 0, done.stderr
    said = done.stdout.strip()
    assert "\n" not in said, said
    assert said.startswith({"flash": "refused: ", "watch": "admit: not written: "}[which]), said
    assert f"--customize needs to open {loop.path} again itself" in said and "sudo" in said
    assert Path(loop.backing).read_bytes()[:1 << 20] == b"\x5a" * (1 << 20)
