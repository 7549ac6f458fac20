"""``popsicle-py check``: its verdicts say what was judged (review and fix, session 19).

A published digest that did not match said only "reads back with SHA-256 X, not Y": with a
wrong ``--size`` (GB for GiB) every good drive "differs", and nothing said how many bytes
were read.  A certificate whose every chunk matched but whose SHA-256 did not (edited, it is
unsigned) said the same, as if the drive were wrong.  And the shapes a certificate must not
have are refused, never judged: a drive is compared with every byte it claims.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.loopdev import Loop
from tests.test_check import certificate_for, flip, image_bytes, run

MiB = 1 << 20


@pytest.fixture
def stick(loop_factory: Callable[..., Loop]) -> tuple[Loop, bytes]:
    data = image_bytes(3 * MiB + 4096)
    loop = loop_factory(4 * MiB, fill=0x5A)
    with open(loop.backing, "r+b") as f:
        f.write(data)
    return loop, data


def result_of(done: Any) -> dict[str, Any]:
    return next(e for e in map(json.loads, done.stdout.splitlines()) if e["event"] == "result")


def test_a_digest_that_differs_says_how_many_bytes_were_read(
        stick: tuple[Loop, bytes]) -> None:
    loop, data = stick
    short = len(data) - 4096  # the user's --size is not the image's
    done = run("--sha256", hashlib.sha256(data).hexdigest(), "--size", str(short), loop.path,
               "--json")
    assert done.returncode == 1, done.stderr
    result = result_of(done)
    assert (result["status"], result["cause"]) == ("invalid", "mismatch")
    assert result["error"].startswith(f"{loop.path}: its first {short} bytes (--size) read "
                                      "back with SHA-256 "), result["error"]


def test_a_certificate_that_contradicts_itself_is_said_so(stick: tuple[Loop, bytes],
                                                          tmp_path: Path) -> None:
    loop, data = stick
    body = certificate_for(data).to_json()
    body["device"]["sha256"] = "0" * 64  # every chunk right, the whole wrong
    cert = tmp_path / "c.json"
    cert.write_text(json.dumps(body))
    done = run(cert, loop.path, "--json")
    assert done.returncode == 1, done.stderr
    assert "the certificate contradicts itself" in result_of(done)["error"]


def _chunks(body: dict[str, Any]) -> list[list[Any]]:
    chunks: list[list[Any]] = body["device"]["chunks"]
    return chunks


@pytest.mark.parametrize("change", ["gap", "overlap", "unsorted", "short", "past", "zero",
                                    "empty", "negative"])
def test_a_certificate_that_does_not_cover_its_image_exactly_is_refused(
        stick: tuple[Loop, bytes], tmp_path: Path, change: str) -> None:
    """Chunks that leave bytes out (a gap, the end) would let a drive differ there."""
    loop, data = stick
    body = certificate_for(data).to_json()
    chunks = _chunks(body)
    if change == "gap":
        del chunks[1]
    elif change == "overlap":
        chunks[1][0] -= 4096
    elif change == "unsorted":
        chunks[1], chunks[2] = chunks[2], chunks[1]
    elif change == "short":
        chunks.pop()
    elif change == "past":
        body["image"]["size"] += 4096
    elif change == "zero":
        body["image"]["size"] = 0
    elif change == "empty":
        body["device"]["chunks"] = []
    else:
        chunks[0][1] = -chunks[0][1]
    cert = tmp_path / "c.json"
    cert.write_text(json.dumps(body))
    done = run(cert, loop.path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "unexpected" not in done.stderr, done.stderr


@pytest.mark.parametrize("where", ["first", "last", "past"])
def test_every_byte_of_the_image_is_judged_and_none_past_it(
        stick: tuple[Loop, bytes], tmp_path: Path, where: str) -> None:
    loop, data = stick
    cert = tmp_path / "c.json"
    cert.write_text(certificate_for(data).text())
    flip(loop, {"first": 0, "last": len(data) - 1, "past": len(data)}[where])
    done = run(cert, loop.path)
    assert done.returncode == (0 if where == "past" else 1), done.stdout + done.stderr
