"""SHA-512 crypt (``$6$``), the password hash Raspberry Pi Imager and cloud-init's
``hashed_passwd`` use, in plain Python.

Why not a library: Python's ``crypt`` module is deprecated (gone in 3.13) and passlib has had
no release since 2020 and breaks with current dependencies; calling ``openssl passwd -6`` would
put a password on a pipe to another program and need it installed.  The algorithm is short and
fixed (Ulrich Drepper's specification); the tests check it against ``openssl passwd -6``.
"""

from __future__ import annotations

import hashlib
import secrets

__all__ = ["SALT_ALPHABET", "hash_password", "sha512_crypt"]

#: The alphabet of salts and of the hash's encoding.
SALT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_ROUNDS = 5000

# Which bytes of the final digest go together into each group of four characters.
_ORDER = ((0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26),
          (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32),
          (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38),
          (18, 39, 60), (40, 61, 19), (62, 20, 41))


def _b64(value: int, count: int) -> str:
    out = []
    for _ in range(count):
        out.append(SALT_ALPHABET[value & 0x3F])
        value >>= 6
    return "".join(out)


def _repeat(digest: bytes, length: int) -> bytes:
    return (digest * (length // len(digest) + 1))[:length]


def sha512_crypt(password: str, salt: str, rounds: int = DEFAULT_ROUNDS) -> str:
    """``$6$salt$hash`` of ``password`` (``$6$rounds=N$...`` when rounds is not the default)."""
    key = password.encode()
    salt_bytes = salt.encode()[:16]
    rounds = min(max(rounds, 1000), 999_999_999)
    alt = hashlib.sha512(key + salt_bytes + key).digest()
    ctx = hashlib.sha512(key + salt_bytes + _repeat(alt, len(key)))
    length = len(key)
    while length:
        ctx.update(alt if length & 1 else key)
        length >>= 1
    a = ctx.digest()
    p = _repeat(hashlib.sha512(key * len(key)).digest(), len(key))
    s = _repeat(hashlib.sha512(salt_bytes * (16 + a[0])).digest(), len(salt_bytes))
    c = a
    for i in range(rounds):
        h = hashlib.sha512()
        h.update(p if i & 1 else c)
        if i % 3:
            h.update(s)
        if i % 7:
            h.update(p)
        h.update(c if i & 1 else p)
        c = h.digest()
    encoded = "".join(_b64((c[x] << 16) | (c[y] << 8) | c[z], 4) for x, y, z in _ORDER)
    encoded += _b64(c[63], 2)
    prefix = "$6$" if rounds == DEFAULT_ROUNDS else f"$6$rounds={rounds}$"
    return f"{prefix}{salt_bytes.decode()}${encoded}"


def hash_password(password: str) -> str:
    """The password hashed with a fresh random 16-character salt."""
    salt = "".join(secrets.choice(SALT_ALPHABET) for _ in range(16))
    return sha512_crypt(password, salt)
