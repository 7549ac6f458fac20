"""``read --bmap`` of a GPT drive (review of the reading commands): the zeros of a GPT's entry
arrays were left out of the map, so a copy made with it onto a used stick (``bmaptool copy``,
``flash``) kept that stick's old bytes there, and its GPTs failed their checksums."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import Loop, needs_root, popsicle_cmd

MiB = 1 << 20

pytestmark = needs_root


def popsicle(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=False)


def gpt_problems(path: str | Path) -> str:
    """What sfdisk says of the disk's GPTs ("" when both are sound)."""
    run = subprocess.run(["sfdisk", "--dump", str(path)], capture_output=True, text=True)
    return run.stderr.strip() if "gpt" in run.stdout else f"no GPT: {run.stderr.strip()}"


def test_a_gpt_copied_with_the_block_map_onto_a_used_stick_is_sound(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    drive = loop_factory(16 * MiB)
    subprocess.run(["sfdisk", "-q", drive.path], input="label: gpt\n,8M\n", text=True,
                   check=True, capture_output=True)
    assert gpt_problems(drive.path) == ""
    out = tmp_path / "stick.img"
    result = popsicle("read", drive.path, out, "--bmap")
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "copy.img"
    copy.write_bytes(bytes([0x5A]) * drive.size)  # a used stick: old bytes everywhere
    run = subprocess.run(["bmaptool", "copy", str(out), str(copy)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert gpt_problems(copy) == ""
    target = loop_factory(drive.size, fill=0x5A)
    result = popsicle("flash", out, target.path, "--yes")
    assert result.returncode == 0, result.stderr
    assert gpt_problems(target.path) == ""
