"""Names are anybody's: what a file name, a mount point or a folder holds reaches a person as text.

An image named with an escape sequence must not retitle the terminal or hide the list of
drives about to be overwritten; ``[/x]`` in a path is no Rich markup that fails the run with
"unexpected error"; a name that is not UTF-8 does not silence the output on a strict UTF-8
terminal; an error line stays one line.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd

MiB = 1 << 20
FILL = 0xA5

pytestmark = pytest.mark.root


def _image(path: Path, size: int = 2 * MiB) -> bytes:
    data = os.urandom(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _in_pty(args: list[str | bytes], answer: bytes | None = None) -> tuple[int, bytes]:
    """The command on a 120-column terminal; ``answer`` typed at the confirmation."""
    pexpect = pytest.importorskip("pexpect")
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(COLUMNS="120", LINES="40", TERM="xterm-256color")
    cmd = popsicle_cmd()
    child = pexpect.spawn(cmd[0], [*cmd[1:], *args], env=env, dimensions=(40, 120),
                          timeout=60)
    seen = b""
    if answer is not None:
        child.expect(rb"Continue\? \[y/N\]: ")
        seen = child.before + child.after
        child.send(answer)
    child.expect(pexpect.EOF)
    seen += child.before
    child.close()
    assert child.exitstatus is not None, f"killed by signal {child.signalstatus}"
    return child.exitstatus, seen


def test_an_image_in_a_folder_named_like_markup_is_written_not_an_unexpected_error(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """``d[/b]`` was read as a Rich closing tag: every flash of it on a terminal ended in
    "unexpected error: closing tag '[/b]' ... doesn't match any open tag", exit 1."""
    image = tmp_path / "d[" / "b]" / "image.img"
    data = _image(image)
    loop = loop_factory(4 * MiB, fill=FILL)
    status, seen = _in_pty(["flash", "--yes", str(image), loop.path])
    assert b"unexpected error" not in seen, seen.decode(errors="replace")[-2000:]
    assert status == 0
    assert str(image).encode() in seen  # the name shown as it is
    assert loop.read(len(data)) == data


def test_an_escape_sequence_in_the_image_name_is_shown_not_obeyed(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """An OSC (terminal title) and SGR 8 (conceal) in the image's name reached the terminal
    raw: the title changed and the question after the name was invisible."""
    name = "x\x1b]0;pwned\x07\x1b[8m.img"
    image = tmp_path / name
    _image(image)
    loop = loop_factory(4 * MiB, fill=FILL)
    status, seen = _in_pty(["flash", str(image), loop.path], answer=b"n\r")
    assert status == 2
    assert b"\x1b]0;" not in seen and b"\x1b[8m" not in seen and b"\x07" not in seen
    assert rb"x\x1b]0;pwned\x07\x1b[8m.img" in seen  # what the name holds, as text
    assert loop.path.encode() in seen
    assert b"cancelled at the confirmation: nothing was written" in seen
    assert loop.read() == bytes([FILL]) * loop.size


def test_list_shows_a_mount_point_named_like_markup(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A mount point ``m[/x]`` made ``list --all`` fail: "unexpected error", exit 1."""
    loop = loop_factory(8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", loop.path], check=True, capture_output=True)
    mountpoint = tmp_path / "m[" / "x]"
    mountpoint.mkdir(parents=True)
    subprocess.run(["mount", loop.path, str(mountpoint)], check=True, capture_output=True)
    try:
        done = subprocess.run([*popsicle_cmd(), "list", "--all"], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL,
                              env={**os.environ, "COLUMNS": "200"})
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    row = next(line for line in done.stdout.splitlines() if line.startswith(loop.path + " "))
    assert str(mountpoint) in row


def test_a_name_that_is_not_utf8_keeps_the_output_on_a_strict_utf8_terminal(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Under a UTF-8 locale Python writes strictly: the name's byte 0xff failed the first
    write, and every line after it (the results, the summary) was dropped."""
    image = Path(os.fsdecode(os.fsencode(tmp_path) + b"/n\xffx.img"))
    data = _image(image)
    loop = loop_factory(4 * MiB, fill=FILL)
    done = subprocess.run([*popsicle_cmd(), "flash", "--yes", str(image), loop.path],
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err
    assert "cannot write the output" not in err
    assert rb"n\xffx.img" in done.stdout
    assert f"{loop.path}: ok (" in out
    assert out.splitlines()[-1] == "done: 1 of 1 drives ok"
    assert loop.read(len(data)) == data


def test_an_error_naming_a_file_is_one_line_of_text(tmp_path: Path) -> None:
    """The name's escape sequence went to stderr raw: the rest of the line and the shell's
    prompt after it concealed."""
    missing = tmp_path / "x\x1b[8m\x1b]0;t\x07.img"
    done = subprocess.run([*popsicle_cmd(), "flash", "--yes", str(missing), "/dev/null"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"popsicle-py: {tmp_path}/x\\x1b[8m\\x1b]0;t\\x07.img does not exist"]


@pytest.mark.parametrize("as_json", [False, True])
def test_a_newline_in_a_name_forges_no_line_of_its_own(tmp_path: Path, as_json: bool) -> None:
    """A refusal was split at every newline, names' included: an image named
    ``x.img<newline>popsicle-py: all checks passed`` gave a line that said so, word for word,
    to a person and to a script reading stderr a line at a time."""
    forged = "popsicle-py: all checks passed"
    image = tmp_path / f"x.img\n{forged}"
    image.write_text("hello")
    args = ["flash", "--yes", *(["--json"] if as_json else []), str(image), "/dev/null"]
    done = subprocess.run([*popsicle_cmd(), *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert forged not in lines, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"popsicle-py: {tmp_path}/x.img\\n{forged} "), \
        done.stderr
    if as_json:
        # JSON keeps the name as it is, in one line of its own encoding
        errors = [json.loads(line) for line in done.stdout.splitlines()][:-1]
        assert [e["message"] for e in errors] == [
            lines[0].removeprefix("popsicle-py: ").replace("\\n", "\n")]


def test_a_name_the_locale_cannot_encode_keeps_the_output(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Under ISO-8859-1 a name in Chinese failed the first write: a log lost every line after
    it (the results, the summary), and on a terminal the run ended "unexpected error"."""
    image = tmp_path / "中.img"
    data = _image(image)
    loop = loop_factory(4 * MiB, fill=FILL)
    done = subprocess.run([*popsicle_cmd(), "flash", "--yes", str(image), loop.path],
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONIOENCODING": "latin-1"})
    out, err = done.stdout.decode("latin-1"), done.stderr.decode("latin-1")
    assert done.returncode == 0, err
    assert "cannot write the output" not in err
    assert "\\u4e2d.img" in out
    assert f"{loop.path}: ok (" in out
    assert out.splitlines()[-1] == "done: 1 of 1 drives ok"
    assert loop.read(len(data)) == data
