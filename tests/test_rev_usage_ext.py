"""An ext block bitmap that calls the file system's own metadata free (its counts made to
agree) is not believed: the partition is written whole, as for any bitmap that contradicts
the group descriptors."""

from __future__ import annotations

import re
from pathlib import Path

from tests.fs_images import MiB, garbage, needs_fs_tools, run, usage_of

pytestmark = needs_fs_tools


def test_a_bitmap_that_frees_the_inode_table_is_not_believed(tmp_path: Path) -> None:
    image = tmp_path / "ext.img"
    garbage(image, 64 * MiB)
    run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-E", "nodiscard", str(image))
    assert usage_of(image).notes == ()
    out = run("dumpe2fs", str(image)).stdout
    table = int(re.search(r"Inode table at (\d+)-", out).group(1))  # type: ignore[union-attr]
    free = int(re.search(r"(\d+) free blocks,", out).group(1))  # type: ignore[union-attr]
    # Group 0's inode table's first 64 blocks (the root directory's inode among them) marked
    # free, and the group's free count and checksum made to agree: only the bitmap lies.
    run("debugfs", "-w", "-f", "-", str(image),
        input=f"freeb {table} 64\nset_bg 0 free_blocks_count {free + 64}\n"
              "set_bg 0 checksum calc\n")
    usage = usage_of(image)
    assert usage.ranges == ((0, 64 * MiB),)
    assert usage.notes == (f"the image: group 0's block bitmap marks its own metadata (block "
                           f"{table} on) free: written whole",)
