"""``popsicle-py read DEVICE OUTPUT [DEVICE OUTPUT]...`` (issue 28): several drives read at
once into several files; every pair checked against the others before anything is read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Loop, needs_root, popsicle_cmd
from test_read import DECODERS, events_of, fat_drive, leftovers, popsicle, read_sectors

MiB = 1 << 20

pytestmark = needs_root


def test_two_drives_into_a_zst_and_an_img_in_one_run(loop_factory: Callable[..., Loop],
                                                     tmp_path: Path) -> None:
    a, b = fat_drive(loop_factory), fat_drive(loop_factory, 24 * MiB)
    out_a, out_b = tmp_path / "a.img.zst", tmp_path / "b.img"
    before = read_sectors(a), read_sectors(b)
    result = popsicle("read", a.path, out_a, b.path, out_b, "--json")
    assert result.returncode == 0, result.stderr
    assert (read_sectors(a) - before[0]) * 512 == a.size  # each read once
    assert (read_sectors(b) - before[1]) * 512 == b.size
    for drive, out in ((a, out_a), (b, out_b)):
        decoded = subprocess.run([*DECODERS[out.suffix], str(out)], capture_output=True,
                                 check=True).stdout
        assert decoded == drive.read()
        check = subprocess.run(["sha256sum", "-c", out.name + ".sha256"], cwd=tmp_path,
                               capture_output=True, text=True)
        assert check.returncode == 0, check
    evs = events_of(result.stdout)
    progressed = {e["device"] for e in evs if e["event"] == "progress"}
    assert progressed == {a.path, b.path}
    summary = evs[-1]
    assert summary["event"] == "summary"
    assert [(r["device"], r["status"]) for r in summary["results"]] == \
        [(a.path, "ok"), (b.path, "ok")]
    assert leftovers(tmp_path) == []


def _refused(args: list[str | Path], tmp_path: Path, *lines: str) -> None:
    listing = sorted(p.name for p in tmp_path.iterdir())
    result = popsicle("read", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    for line in lines:
        assert line in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == len(lines), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing written


def test_an_odd_number_of_arguments_is_refused(loop_factory: Callable[..., Loop],
                                               tmp_path: Path) -> None:
    a, b = loop_factory(4 * MiB), loop_factory(4 * MiB)
    _refused([a.path, tmp_path / "a.img", b.path], tmp_path,
             "read takes DEVICE OUTPUT pairs: 3 arguments given, the last OUTPUT missing")


def test_a_drive_named_twice_is_refused(loop_factory: Callable[..., Loop],
                                        tmp_path: Path) -> None:
    a = loop_factory(4 * MiB)
    _refused([a.path, tmp_path / "a.img", a.path, tmp_path / "b.img"], tmp_path,
             f"{a.path} is named twice ({a.path}, {a.path}): read each drive once")


def test_the_same_output_twice_is_refused_however_spelled(loop_factory: Callable[..., Loop],
                                                          tmp_path: Path) -> None:
    a, b = loop_factory(4 * MiB), loop_factory(4 * MiB)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "sub")
    one, two = tmp_path / "sub" / "x.img", tmp_path / "link" / "x.img"
    _refused([a.path, one, b.path, two], tmp_path,
             f"{two} would overwrite a file of {one}: give each pair its own OUTPUT")


def test_the_same_output_named_twice_is_refused(loop_factory: Callable[..., Loop],
                                               tmp_path: Path) -> None:
    """Both pairs read into one file: one drive's image would be lost while both said ok."""
    a, b = loop_factory(4 * MiB), loop_factory(4 * MiB)
    out = tmp_path / "x.img"
    _refused([a.path, out, b.path, out], tmp_path,
             f"{out} is the OUTPUT of two pairs ({a.path}, {b.path}): give each pair its own "
             "OUTPUT")


def test_an_output_on_another_pairs_sidecar_is_refused(loop_factory: Callable[..., Loop],
                                                       tmp_path: Path) -> None:
    a, b, c = loop_factory(4 * MiB), loop_factory(4 * MiB), loop_factory(4 * MiB)
    img = tmp_path / "x.img"
    _refused([a.path, img, b.path, tmp_path / "x.img.sha256"], tmp_path,
             f"{tmp_path}/x.img.sha256 would overwrite a file of {img}: give each pair its "
             "own OUTPUT")
    # with --bmap, x.img.zst and x.img.xz would both write x.img.bmap
    _refused([a.path, tmp_path / "x.img.zst", c.path, tmp_path / "x.img.xz", "--bmap"],
             tmp_path, f"{tmp_path}/x.img.xz (x.img.bmap) would overwrite a file of "
             f"{tmp_path}/x.img.zst: give each pair its own OUTPUT")


def test_an_output_on_another_drive_being_read_is_refused(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    a, b = loop_factory(4 * MiB), loop_factory(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", b.path], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "ro", b.path, str(mnt)], check=True)
    try:
        _refused([a.path, mnt / "a.img", b.path, tmp_path / "b.img"], tmp_path,
                 f"{mnt}/a.img is on {b.path}, a drive being read; write it elsewhere")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_each_pairs_own_refusals_are_all_said(loop_factory: Callable[..., Loop],
                                              tmp_path: Path) -> None:
    a, b = loop_factory(4 * MiB), loop_factory(4 * MiB)
    (tmp_path / "a.img").write_bytes(b"precious")
    (tmp_path / "b.img").write_bytes(b"precious")
    _refused([a.path, tmp_path / "a.img", b.path, tmp_path / "b.img"], tmp_path,
             f"{tmp_path}/a.img exists; --force replaces it",
             f"{tmp_path}/b.img exists; --force replaces it")


def test_ctrl_c_leaves_neither_output(loop_factory: Callable[..., Loop],
                                      throttle: Callable[..., Any], tmp_path: Path) -> None:
    a, b = fat_drive(loop_factory, 32 * MiB), fat_drive(loop_factory, 32 * MiB)
    add = throttle((a, 4 * MiB), (b, 4 * MiB))
    proc = subprocess.Popen([*popsicle_cmd(), "read", a.path, str(tmp_path / "a.img.zst"),
                             b.path, str(tmp_path / "b.img"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None
    moving: set[str] = set()
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress":
            moving.add(event["device"])
            if moving == {a.path, b.path}:
                proc.send_signal(signal.SIGINT)
                break
    out_text, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    results = json.loads(out_text.splitlines()[-1])["results"]
    assert [r["status"] for r in results] == ["cancelled", "cancelled"], results
    assert list(tmp_path.iterdir()) == []


def test_room_is_needed_for_every_raw_output_together(loop_factory: Callable[..., Loop],
                                                      tmp_path: Path) -> None:
    a, b = loop_factory(4 * MiB), loop_factory(4 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(mnt)], check=True)
    try:
        result = popsicle("read", a.path, mnt / "a.img", b.path, mnt / "b.img")
        assert result.returncode == 2, result.stderr
        assert result.stderr == (f"popsicle-py: not enough room for {mnt}/a.img, {mnt}/b.img: "
                                 f"8 MiB needed, 6 MiB free in {mnt}\n")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_one_drive_failing_does_not_stop_the_other(loop_factory: Callable[..., Loop],
                                                   tmp_path: Path) -> None:
    a, b = loop_factory(16 * MiB), fat_drive(loop_factory)
    with open(a.backing, "r+b") as f:
        f.write(os.urandom(16 * MiB))  # incompressible: its .gz cannot fit
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mnt)], check=True)
    try:
        result = popsicle("read", a.path, mnt / "a.img.gz", b.path, tmp_path / "b.img",
                          "--json")
        assert result.returncode == 1, result.stderr
        results = events_of(result.stdout)[-1]["results"]
        assert [(r["device"], r["status"]) for r in results] == \
            [(a.path, "failed"), (b.path, "ok")]
        assert results[0]["cause"] == "no-space"
        assert list(mnt.iterdir()) == []
        assert (tmp_path / "b.img").read_bytes() == b.read()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_file_where_flash_looks_for_another_pairs_map_is_refused(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """x.img.zst.gz's map, x.img.zst.bmap, is the first name flash tries for x.img.zst's."""
    a, b = loop_factory(4 * MiB), loop_factory(4 * MiB)
    zst, gz = tmp_path / "x.img.zst", tmp_path / "x.img.zst.gz"
    _refused([a.path, zst, b.path, gz, "--bmap"], tmp_path,
             f"{gz} (x.img.zst.bmap) would be where flash looks for the block map of {zst}: "
             "give each pair its own OUTPUT")


def test_an_unwritable_output_directory_refuses_every_pair_before_any_is_read(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    a, b = fat_drive(loop_factory), fat_drive(loop_factory)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64M", "tmpfs", str(mnt)], check=True)
    try:
        _refused([a.path, tmp_path / "a.img", b.path, mnt / "b.img"], tmp_path,
                 f"{mnt}/b.img cannot be written: Read-only file system")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
