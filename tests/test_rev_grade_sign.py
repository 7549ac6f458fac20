"""--sign-key through an ssh-agent that stops answering mid-run (a hung agent, a stopped
forwarding): the run's Ctrl-C must still give the shell back at once, and no later drive
waits for that signer again."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import popsicle_cmd
from tests.loopdev import Loop

pytestmark = pytest.mark.root
MiB = 1 << 20


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[dict[str, str], int, Path]]:
    """A real ssh-agent holding a fresh key: its environment, its pid and the key's .pub."""
    key = tmp_path / "release.key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < end:
            time.sleep(0.02)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True,
                       stderr=subprocess.DEVNULL)
        key.unlink()  # only the agent can sign now
        yield env, proc.pid, Path(f"{key}.pub")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


class _Events:
    """The JSON events a process prints, read as they come (no buffer between: select)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.pending = b""

    def until(self, done: Callable[[dict[str, object]], bool], deadline: float
              ) -> list[dict[str, object]]:
        """The events up to the first that is ``done`` (or the deadline, or the end)."""
        seen: list[dict[str, object]] = []
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                seen.append(json.loads(line))
                if done(seen[-1]):
                    return seen
            if select.select([self.fd], [], [], 0.1)[0]:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                self.pending += chunk
        return seen


def _signing(proc: subprocess.Popen[bytes], deadline: float = 30) -> bool:
    """True once ``proc`` runs ``ssh-keygen -Y sign`` for a drive (the drive's result comes
    after its certificate, so no event says the signature began)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end and proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.name() == "ssh-keygen" and "sign" in child.cmdline():
                    return True
            except psutil.Error:
                continue
        time.sleep(0.02)
    return False


def test_ctrl_c_while_a_hung_agent_signs_gives_the_shell_back(
        tmp_path: Path, loop_factory: Callable[..., Loop],
        agent: tuple[dict[str, str], int, Path]) -> None:
    """It waited for ssh-keygen's full minute: Ctrl-C gave the shell back ~60 s later."""
    env, agent_pid, pub = agent
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 * MiB))
    loop = loop_factory(2 * MiB)
    certs = tmp_path / "certs"
    proc = subprocess.Popen(
        [*popsicle_cmd(), "flash", str(image), loop.path, "--yes", "--json", "--no-probe",
         "--certificate", str(certs), "--sign-key", str(pub)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    events = _Events(proc)
    try:
        first = events.until(lambda e: True, 30)  # the key was tried: it signed
        assert first and first[0]["event"] == "start", first
        os.kill(agent_pid, signal.SIGSTOP)  # from here on the agent never answers
        assert _signing(proc), "ssh-keygen never started signing"
        time.sleep(0.5)  # ssh-keygen now waits for the agent
        os.kill(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        rest = events.until(lambda e: e["event"] == "summary", 15)
        code = proc.wait(timeout=15)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.kill(agent_pid, signal.SIGCONT)
    assert took < 5, took
    assert code == 130
    notes = [e["text"] for e in rest if e["event"] == "note"]
    assert f"{loop.path}: no certificate: cancelled while ssh-keygen was signing" in notes, rest
    [result] = [e for e in rest if e["event"] == "result"]
    assert (result["status"], result["certificate"], result["certificate_error"]) == (
        "ok", None, "cancelled while ssh-keygen was signing"), result
    assert not list(certs.iterdir())  # no certificate, signed or not, no temporary file
    assert loop.read(1 * MiB) == image.read_bytes()  # the drive itself is done: ok


def test_a_signer_that_timed_out_is_not_waited_for_again(
        tmp_path: Path, agent: tuple[dict[str, str], int, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each drive's end stood the whole timeout (60 s) again, the job's thread held."""
    from popsicle_py import events
    from popsicle_py.certify import sshsig
    from popsicle_py.certify.writer import CertificateWriter

    env, agent_pid, pub = agent
    monkeypatch.setenv("SSH_AUTH_SOCK", env["SSH_AUTH_SOCK"])
    monkeypatch.setattr(sshsig, "_TIMEOUT", 1)  # the minute, made a second
    writer = CertificateWriter(str(tmp_path / "certs"), str(pub), "disk.img", None)
    done = events.DriveResult("/dev/sdb", events.Status.OK, 1 * MiB, verified=True,
                              device_sha256="ab" * 32)
    os.kill(agent_pid, signal.SIGSTOP)
    try:
        with pytest.raises(sshsig.SignError, match="did not answer in 1 s"):
            writer.certify(done, [((0, 1 * MiB), bytes(16))], 0.0)
        began = time.monotonic()
        with pytest.raises(sshsig.SignError, match="not asked again this run"):
            writer.certify(done, [((0, 1 * MiB), bytes(16))], 0.0)
        assert time.monotonic() - began < 0.5
    finally:
        os.kill(agent_pid, signal.SIGCONT)
        writer.close()
    assert list((tmp_path / "certs").iterdir()) == []


def test_a_sign_key_that_is_no_key_file_is_said_so_at_once(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """/dev/null was "No such file or directory" (ssh-keygen's words); a FIFO held the run a
    minute before its refusal."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 * MiB))
    loop = loop_factory(2 * MiB, fill=0x5A)
    before = loop.read(2 * MiB)
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    cases = {tmp_path / "nokey": "no such file", Path("/dev/null"): "not a key file",
             fifo: "not a key file"}
    for key, words in cases.items():
        began = time.monotonic()
        done = subprocess.run([*popsicle_cmd(), "flash", str(image), loop.path, "--yes",
                               "--certificate", str(tmp_path / "certs"),
                               "--sign-key", str(key)],
                              capture_output=True, text=True, timeout=90)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"popsicle-py: --sign-key {key}: {words}"), done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert time.monotonic() - began < 10
    assert loop.read(2 * MiB) == before


def test_a_slow_signature_does_not_make_another_drive_too_slow(
        tmp_path: Path, loop_factory: Callable[..., Loop],
        throttle: Callable[..., Callable[[int], None]],
        agent: tuple[dict[str, str], int, Path]) -> None:
    """The job's thread judged each drive's speed when it got to its progress messages: held
    by the first drive's signature (a key that waits for a touch, an agent slow to answer),
    it took the bytes another drive wrote before as written after, and that drive, writing
    at 24 MB/s, was "too slow: writes at ..." with a 16MB/s minimum (12 and 8: 928.9 KiB/s)."""
    env, agent_pid, pub = agent
    data = os.urandom(96 * MiB)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    fast, slow = loop_factory(100 * MiB), loop_factory(100 * MiB)
    add = throttle((fast, 80_000_000), (slow, 24_000_000))
    proc = subprocess.Popen(
        [*popsicle_cmd(), "flash", str(image), fast.path, slow.path, "--yes", "--json",
         "--no-probe", "--min-write-speed", "16MB/s", "--certificate", str(tmp_path / "c"),
         "--sign-key", str(pub)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        preexec_fn=lambda: add(os.getpid()))
    events = _Events(proc)
    try:
        first = events.until(lambda e: True, 30)  # the key was tried: it signed
        assert first and first[0]["event"] == "start", first
        os.kill(agent_pid, signal.SIGSTOP)
        assert _signing(proc), "ssh-keygen never started signing"  # the fast drive's
        time.sleep(4)  # the fast drive's signature holds the job's thread meanwhile
        os.kill(agent_pid, signal.SIGCONT)
        rest = events.until(lambda e: e["event"] == "summary", 60)
        proc.wait(timeout=30)
    finally:
        os.kill(agent_pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    results = {e["device"]: (e["status"], e["error"]) for e in rest if e["event"] == "result"}
    assert results == {fast.path: ("ok", None), slow.path: ("ok", None)}, rest
    assert proc.returncode == 0
    assert slow.read(len(data)) == data
    assert len(list((tmp_path / "c").glob("*.json.sig"))) == 2
