"""popsicle_py.files: every file the tool writes is a regular file reached without a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from popsicle_py.files import NotRegular, create_regular, open_regular

APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT


def test_a_new_file_and_an_existing_regular_one_are_opened(tmp_path: Path) -> None:
    new = tmp_path / "new.csv"
    os.close(open_regular(new, APPEND))
    assert new.is_file()
    old = tmp_path / "old.csv"
    old.write_text("kept\n")
    fd = open_regular(old, APPEND)
    try:
        os.write(fd, b"more\n")
        assert os.get_blocking(fd)  # O_NONBLOCK was for the open only
    finally:
        os.close(fd)
    assert old.read_text() == "kept\nmore\n"


@pytest.mark.parametrize("kind", ["to a file", "dangling"])
def test_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "target"
    if kind == "to a file":
        target.write_text("keep me\n")
    link = tmp_path / "run.csv"
    link.symlink_to(target)
    with pytest.raises(NotRegular, match="is a symbolic link; name the file itself"):
        open_regular(link, APPEND)
    with pytest.raises(NotRegular):
        create_regular(link)
    if kind == "to a file":
        assert target.read_text() == "keep me\n"
    else:
        assert not target.exists()  # O_CREAT through a dangling link would have made it


def test_a_fifo_and_a_directory_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    with pytest.raises(NotRegular, match="is a pipe, not a regular file"):
        open_regular(fifo, APPEND)  # nobody reads it: no hang
    with pytest.raises(IsADirectoryError):
        open_regular(tmp_path, APPEND)


def test_create_regular_empties_only_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "cache.part"
    path.write_bytes(b"old bytes")
    with create_regular(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(FileExistsError):
        create_regular(path, exclusive=True)
