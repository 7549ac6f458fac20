"""The words a person reads when something is off: each says what happened and what to do.

Issue 32's list, one test each: every refusal is one line, exit 2, and nothing is written.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd
from webserver import Served, WebServer, serving

from popsicle_py.remote import HttpSettings, open_url
from popsicle_py.signals import stopping_words

MiB = 1 << 20
PATTERN = 0x5A
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def web() -> Iterator[WebServer]:
    with serving() as server:
        yield server


def _flash(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), "flash", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def _image(tmp_path: Path, size: int = 1 * MiB) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


def _untouched(loop: Loop) -> bool:
    return loop.backing.read_bytes() == bytes([PATTERN]) * loop.size


def test_each_signal_names_its_own_way_to_quit_at_once() -> None:
    assert stopping_words(signal.SIGINT) == (
        "SIGINT: stopping every drive (Ctrl-C again to quit at once)")
    assert stopping_words(signal.SIGTERM) == (
        "SIGTERM: stopping every drive (another SIGTERM to quit at once)")
    assert stopping_words(signal.SIGINT, idle=True) == (
        "SIGINT: ending the session (no drive is being written)")


@pytest.mark.root
@pytest.mark.parametrize("given", [("--sha256", "0" * 64), ("--checksum", "sha1:" + "0" * 40)])
def test_no_checksum_with_a_checksum_contradicts(
        tmp_path: Path, loop_factory: Callable[..., Loop], given: tuple[str, str]) -> None:
    image, _ = _image(tmp_path)
    loop = loop_factory(4 * MiB, fill=PATTERN)
    done = _flash(str(image), loop.path, "--yes", "--no-checksum", *given)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"popsicle-py: --no-checksum and {given[0]} contradict each other; give one"]
    assert _untouched(loop)


@pytest.mark.root
def test_a_missing_keyring_is_named_as_missing_not_the_signature(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image, data = _image(tmp_path)
    (tmp_path / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  disk.img\n")
    loop = loop_factory(4 * MiB, fill=PATTERN)
    done = _flash(str(image), loop.path, "--yes", "--keyring", str(tmp_path / "nope.gpg"))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"popsicle-py: --keyring {tmp_path}/nope.gpg: no such file"]
    assert _untouched(loop)


def test_https_to_a_plain_http_port_says_so(web: WebServer) -> None:
    web.add("/plain.img", Served(b"x" * 4096))
    url = web.url("/plain.img").replace("http://", "https://")
    with pytest.raises(Exception) as caught:
        open_url(url, settings=HttpSettings(connect_timeout=2, read_timeout=2, retries=0,
                                            outage=0))
    text = str(caught.value)
    assert "does not answer with TLS on that port" in text and "try http://" in text
    assert "WRONG_VERSION_NUMBER" not in text and "SSL" not in text


def test_an_empty_206_past_the_end_is_not_more_data(web: WebServer) -> None:
    data = os.urandom(MiB + 7)
    web.add("/e206.img", Served(data, empty_206=True))
    opened = open_url(web.url("/e206.img"), no_checksum=True,
                      settings=HttpSettings(connect_timeout=2, read_timeout=2, retries=0,
                                            outage=0))
    with opened.image.open() as stream:
        assert stream.read() == data


@pytest.mark.root
def test_bucket_size_in_powers_of_1000_gets_a_hint(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image, _ = _image(tmp_path)
    loop = loop_factory(4 * MiB, fill=PATTERN)
    done = _flash(str(image), loop.path, "--yes", "--bucket-size", "4MB")
    assert done.returncode == 2
    assert "4MB is 4000000 bytes (MB means powers of 1000): did you mean 4MiB?" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert _untouched(loop)


@pytest.mark.root
def test_ctrl_c_at_the_confirmation_answers_below_the_prompt(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    pexpect = pytest.importorskip("pexpect")
    image, _ = _image(tmp_path)
    loop = loop_factory(4 * MiB, fill=PATTERN)
    cmd = popsicle_cmd()
    # As from a user's terminal: a shell that started the tests in the background (`&`) has
    # them, and so this child, ignore SIGINT, and Python then never raises KeyboardInterrupt.
    child = pexpect.spawn(cmd[0], [*cmd[1:], "flash", str(image), loop.path],
                          env={**os.environ, "COLUMNS": "100"}, dimensions=(30, 100),
                          encoding="utf-8", timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect(r"Continue\? \[y/N\]: ")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    lines = [ANSI.sub("", line).rstrip() for line in (child.before or "").splitlines()]
    said = [line for line in lines if "interrupted before writing" in line]
    assert said == ["popsicle-py: interrupted before writing: nothing was written"], lines
    assert child.exitstatus == 130 or child.signalstatus is None
    assert _untouched(loop)


@pytest.mark.root
def test_with_yes_the_output_still_names_the_image_and_the_drives(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image, _ = _image(tmp_path)
    a, b = loop_factory(4 * MiB, fill=PATTERN), loop_factory(4 * MiB, fill=PATTERN)
    done = _flash(str(image), a.path, b.path, "--yes", "--no-probe")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert f"Flash {image} (1 MiB): {a.path}, {b.path}" in first, done.stdout


@pytest.mark.root
def test_a_name_without_dev_gets_a_did_you_mean(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image, _ = _image(tmp_path)
    loop = loop_factory(4 * MiB, fill=PATTERN)
    name = loop.path.removeprefix("/dev/")
    done = subprocess.run([*popsicle_cmd(), "flash", str(image), name, "--yes"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"popsicle-py: {name} does not exist; did you mean {loop.path}?"]
    assert _untouched(loop)


@pytest.mark.root
def test_unmount_says_what_it_unmounted(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    from loopdev import mounted_ext4

    image, data = _image(tmp_path)
    loop = loop_factory(8 * MiB, fill=PATTERN)
    with mounted_ext4(loop.path) as mountpoint:
        done = _flash(str(image), loop.path, "--yes", "--unmount", "--no-probe")
        assert done.returncode == 0, done.stderr
        assert f"unmounted {mountpoint} ({loop.path})" in done.stdout, done.stdout
        assert not os.path.ismount(mountpoint)
    with open(loop.path, "rb") as f:
        assert f.read(len(data)) == data


def test_a_read_given_up_while_naming_its_files_does_not_promise_their_removal() -> None:
    """The files thread is killed with the process once its hung call returns: what it named
    by then stays, and the note must not say the files are removed (review of the 14th
    session's diff: OUTPUT and its .sha256 stood after "its partial files are removed")."""
    from popsicle_py.failures import hung_output

    assert hung_output("/mnt").endswith("and its partial files are removed then")
    said = hung_output("/mnt", publishing="/mnt/stick.img")
    assert "removed" not in said
    assert "/mnt/stick.img and its .sha256 may then stand (check them with sha256sum -c)" in said
