"""Signing and checking certificates with OpenSSH keys: ``ssh-keygen -Y`` (OpenSSH >= 8.1).

The data goes through stdin and the signature comes back on stdout, so ssh-keygen never
opens a file in the certificate directory (where it could follow a planted symlink); the
signature is written beside the certificate like the certificate itself.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable

from popsicle_py.certify.model import NAMESPACE, CertificateError
from popsicle_py.errors import Refused

#: The suffix of a certificate's signature file.
SIG_SUFFIX = ".sig"
_TIMEOUT = 60
#: How often a signature's wait looks at the run's cancellation, in seconds.
_POLL = 0.2
_ARMOR = re.compile(rb"-----BEGIN SSH SIGNATURE-----(.*?)-----END SSH SIGNATURE-----", re.S)


class SignError(OSError):
    """ssh-keygen could not sign (a key that needs a passphrase, a missing agent ...)."""


class SignTimeout(SignError):
    """ssh-keygen did not answer in time (an agent that hangs): no use asking it again."""


def _keygen() -> str:
    path = shutil.which("ssh-keygen")
    if path is None:
        raise Refused(["ssh-keygen is not installed (package openssh-client): it signs and "
                       "checks certificates"])
    return path


def _last_line(text: bytes) -> str:
    lines = [line for line in text.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


def _answer(proc: subprocess.Popen[bytes], data: bytes, key: str,
            stopped: Callable[[], bool] | None) -> tuple[bytes, bytes]:
    """What ssh-keygen wrote, once it ends; SignError at ``stopped`` or at the timeout."""
    deadline = time.monotonic() + _TIMEOUT
    given: bytes | None = data
    while True:
        try:  # the data is given once: a later call goes on with what is left of it
            return proc.communicate(given, timeout=_POLL)
        except subprocess.TimeoutExpired:
            given = None
            if stopped is not None and stopped():
                raise SignError("cancelled while ssh-keygen was signing") from None
            if time.monotonic() >= deadline:
                raise SignTimeout(f"ssh-keygen -Y sign -f {key} did not answer in {_TIMEOUT} s "
                                "(an ssh-agent that hangs?)") from None


def sign(key: str, data: bytes, stopped: Callable[[], bool] | None = None) -> bytes:
    """The SSH signature of ``data`` with the private key (or the agent's, given the public
    key file) ``key``; raises SignError.

    ssh-keygen runs in a session of its own, with no terminal and no askpass program: a key
    that needs a passphrase fails at once, never a prompt on popsicle's terminal, asked again
    for each drive while the run waits (README: use ssh-agent and give the .pub file).
    ``stopped`` (the run's cancellation) is heard while it waits: an agent that stopped
    answering held a Ctrl-C for the whole timeout, a minute at each drive's end."""
    try:
        proc = subprocess.Popen([_keygen(), "-q", "-Y", "sign", "-f", key, "-n", NAMESPACE],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                env={**os.environ, "SSH_ASKPASS_REQUIRE": "never"})
    except OSError as exc:
        raise SignError(f"ssh-keygen -Y sign: {exc.strerror or exc}") from None
    with proc:  # its pipes closed and the process reaped, whatever ends the wait
        try:
            out, err = _answer(proc, data, key, stopped)
        finally:
            if proc.returncode is None:
                proc.kill()
    if proc.returncode != 0 or b"BEGIN SSH SIGNATURE" not in out:
        said = _last_line(err)
        if said.startswith("Couldn't load") and os.path.isfile(key):  # "No such file", it says
            raise SignError(f"{key} is not an OpenSSH private key, nor the .pub of one held by "
                            "ssh-agent")
        if "passphrase" in said:
            raise SignError(f"{key} needs a passphrase, which popsicle-py does not ask for: "
                            "add it to ssh-agent (ssh-add) and give its .pub file")
        raise SignError(f"ssh-keygen -Y sign -f {key}: {said}")
    return out


def check_key(key: str) -> None:
    """Refuse (exit 2) before anything is written when ``key`` cannot sign.  A name that is
    no file is said so (ssh-keygen said "No such file or directory" of /dev/null, and
    waited a minute on a FIFO)."""
    if not os.path.exists(key):  # a dangling link too
        raise Refused([f"--sign-key {key}: no such file"])
    if not os.path.isfile(key):
        raise Refused([f"--sign-key {key}: not a key file (a directory, a device, a pipe)"])
    try:
        sign(key, b"popsicle-py: can this key sign?\n")
    except SignError as exc:
        raise Refused([f"--sign-key {key}: {exc}"]) from None


def _run_with_signature(args: list[str], data: bytes, signature: bytes) -> tuple[int, str, str]:
    with tempfile.TemporaryDirectory(prefix="popsicle-py-sig-") as tmp:
        sig = os.path.join(tmp, "cert.sig")
        with open(sig, "wb") as f:
            f.write(signature)
        args = [a if a != "{sig}" else sig for a in args]
        try:
            done = subprocess.run([_keygen(), *args], input=data, capture_output=True,
                                  timeout=_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CertificateError(f"ssh-keygen -Y: {exc}") from None
    return (done.returncode, done.stdout.decode(errors="replace"),
            _all_lines(done.stderr or done.stdout))


def _all_lines(text: bytes) -> str:
    """Every line ssh-keygen said, on one line: its last alone ("No principal matched.")
    hid the one before that says why ("key has expired", "not permitted ... namespace")."""
    lines = [line.strip() for line in text.decode(errors="replace").splitlines()]
    return "; ".join(dict.fromkeys(line for line in lines if line)) or "no message"


def namespace_of(signature: bytes) -> str | None:
    """The namespace an SSH signature (``ssh-keygen -Y sign -n NAMESPACE``) was made for, or
    None when ``signature`` is no SSH signature (PROTOCOL.sshsig: "SSHSIG", a version, then
    the public key and the namespace as SSH strings)."""
    found = _ARMOR.search(signature)
    if found is None:
        return None
    try:
        blob = base64.b64decode(b"".join(found[1].split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    if not blob.startswith(b"SSHSIG"):
        return None
    fields: list[bytes] = []
    at = 10  # past the magic and the version
    for _ in range(2):
        size = int.from_bytes(blob[at:at + 4], "big")
        if at + 4 + size > len(blob):
            return None
        fields.append(blob[at + 4:at + 4 + size])
        at += 4 + size
    return fields[1].decode(errors="replace")


def _made_for_certificates(where: str, signature: bytes) -> None:
    """Refuse a signature file that is none, or one made for another namespace, in words
    that say so: ssh-keygen's refusal read "it was changed after signing"."""
    namespace = namespace_of(signature)
    if namespace is None:
        raise CertificateError(f"{where}{SIG_SUFFIX}: not an SSH signature (one of "
                               f"ssh-keygen -Y sign -n {NAMESPACE})")
    if namespace != NAMESPACE:
        raise CertificateError(f"{where}{SIG_SUFFIX}: a signature for namespace {namespace!r}, "
                               f"not {NAMESPACE!r}: not made to sign a certificate")


def verify(where: str, data: bytes, signature: bytes, allowed_signers: str) -> str:
    """The principal of ``allowed_signers`` whose key made ``signature`` over ``data``;
    raises CertificateError (exit 2) when no allowed signer made it, or it does not match."""
    _made_for_certificates(where, signature)
    code, out, why = _run_with_signature(
        ["-Y", "find-principals", "-f", allowed_signers, "-s", "{sig}"], b"", signature)
    principals = [line.strip() for line in out.splitlines() if line.strip()]
    if code != 0 or not principals:
        raise CertificateError(f"{where}: signed by a key that {allowed_signers} does not "
                               f"allow ({why})")
    for principal in principals:
        code, _, why = _run_with_signature(
            ["-Y", "verify", "-f", allowed_signers, "-I", principal, "-n", NAMESPACE,
             "-s", "{sig}"], data, signature)
        if code == 0:
            return principal
    # Intact, yet refused: the file restricts that key (its namespaces, its validity).
    check_intact(where, data, signature)
    raise CertificateError(f"{where}: signed by {', '.join(principals)}, whom "
                           f"{allowed_signers} does not allow to sign it ({why})")


def check_intact(where: str, data: bytes, signature: bytes) -> None:
    """The signature is a good one over ``data`` by *some* key (no signer list to trust);
    raises CertificateError (exit 2) when it is not."""
    _made_for_certificates(where, signature)
    code, _, why = _run_with_signature(
        ["-Y", "check-novalidate", "-n", NAMESPACE, "-s", "{sig}"], data, signature)
    if code != 0:
        raise CertificateError(f"{where}: the signature does not match the certificate: it "
                               f"was changed after signing ({why})")
