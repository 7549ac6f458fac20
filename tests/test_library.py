"""The README's library examples, run as written (paths swapped for loop devices and files).

A library user copies these; if they stop working, the README lies.  The application-layer
example must write and verify real block devices, and refuse (nothing written) as the CLI does.
"""

from __future__ import annotations

import lzma
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from loopdev import Loop, python_env

from popsicle_py.app.requests import EngineOptions, available_memory, ring_refusal

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20

pytestmark = pytest.mark.root


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def _app_example() -> str:
    blocks = [b for b in _python_blocks() if "prepare_flash" in b]
    assert len(blocks) == 1, "README has one application-layer example"
    return blocks[0]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=python_env(),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _image(tmp_path: Path) -> bytes:
    data = os.urandom(3 * MiB)
    (tmp_path / "raspios.img.xz").write_bytes(lzma.compress(data, preset=0))
    return data


def test_the_app_example_writes_and_verifies_each_drive(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    data = _image(tmp_path)
    a, b = loop_factory(8 * MiB, fill=0x5A), loop_factory(8 * MiB, fill=0x5A)
    code = _app_example().replace('"/dev/sdb"', repr(a.path)).replace('"/dev/sdc"', repr(b.path))
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    for loop in (a, b):
        assert f"writing {loop.path}" in done.stdout
        assert f"{loop.path} ok" in done.stdout  # the example's own result lines
        with open(loop.path, "rb") as f:
            assert f.read(len(data)) == data


def test_the_app_example_refuses_before_writing(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    _image(tmp_path)
    a = loop_factory(8 * MiB, fill=0x5A)
    code = _app_example().replace('"/dev/sdb"', repr(a.path)).replace('"/dev/sdc"', repr(a.path))
    done = _run(code, tmp_path)
    assert done.returncode == 1  # SystemExit with the refusal's lines
    assert "same drive" in done.stderr
    assert "Traceback" not in done.stderr
    assert "writing" not in done.stdout
    assert a.backing.read_bytes() == b"\x5a" * (8 * MiB)


@pytest.mark.skipif((available_memory() or 0) >= 128 << 30,
                    reason="64 GiB is less than half of memory here")
def test_the_app_example_refuses_a_ring_larger_than_memory_allows(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """A library's request is checked as the CLI's is (the check lives in prepare_flash):
    --buckets 64 of 1 GiB on a machine with less than 128 GiB to spare."""
    _image(tmp_path)
    a, b = loop_factory(8 * MiB, fill=0x5A), loop_factory(8 * MiB, fill=0x5A)
    code = _app_example().replace('"/dev/sdb"', repr(a.path)).replace('"/dev/sdc"', repr(b.path))
    code = code.replace("app.TargetOptions(devices=", "engine=app.EngineOptions(1 << 30, 64), "
                        "targets=app.TargetOptions(devices=")
    assert "EngineOptions" in code
    done = _run(code, tmp_path)
    assert done.returncode == 1, done.stderr  # SystemExit with the refusal's lines
    assert "a ring of 64 GiB (64 x 1 GiB) is more than half the memory available" in done.stderr
    assert "Traceback" not in done.stderr and "writing" not in done.stdout
    for loop in (a, b):
        assert loop.backing.read_bytes() == b"\x5a" * (8 * MiB)


def test_the_engine_example_writes_and_verifies_files(tmp_path: Path) -> None:
    blocks = [b for b in _python_blocks() if "BusWriter(source, drives" in b]
    assert len(blocks) == 1, "README has one engine example"
    data = os.urandom(2 * MiB)
    (tmp_path / "image.iso").write_bytes(data)
    for name in ("a.img", "b.img"):
        (tmp_path / name).write_bytes(bytes(3 * MiB))
    code = blocks[0].replace("/tmp/", f"{tmp_path}/") + "\nprint('verified', ok)\n"
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "verified [True, True]" in done.stdout
    for name in ("a.img", "b.img"):
        assert (tmp_path / name).read_bytes()[:len(data)] == data


def test_the_drives_own_buffers_count_with_the_ring() -> None:
    """Each drive holds a read-back buffer of its own (4 MiB by default): a ring that fits
    with one drive may not with 32 of them."""
    engine = EngineOptions(256 << 20, 4)  # a ring of 1 GiB
    available = (2 << 30) + (64 << 20)  # half: 1 GiB + 32 MiB
    assert ring_refusal(engine, available, drives=1) is None
    assert ring_refusal(engine, available, drives=8) is None
    assert ring_refusal(engine, available, drives=32) == (
        "a ring of 1 GiB (4 x 256 MiB) and 4 MiB per drive for 32 drives is more than half the "
        "memory available (2.1 GiB): use a smaller --bucket-size or fewer --buckets")
    assert ring_refusal(EngineOptions(), 64 << 20, drives=32) is None  # the default: never
