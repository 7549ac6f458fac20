"""Sizes as people write them (16M, 4MiB, 1048576) and as the program prints them (1.5 GiB).

The one home of size formatting: every size printed is in binary IEC units (KiB, MiB, GiB...),
the units that ``16M`` and ``128GiB`` mean on input, so a size printed can be typed back.
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 1000,
    "m": 1 << 20, "mib": 1 << 20, "mb": 1000**2,
    "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3,
    "t": 1 << 40, "tib": 1 << 40, "tb": 1000**4,
    "p": 1 << 50, "pib": 1 << 50, "pb": 1000**5,
    "e": 1 << 60, "eib": 1 << 60, "eb": 1000**6,
}
_SIZE = re.compile(r"^\s*(\d+)(?:\.(\d+))?\s*([a-zA-Z]*)\s*$")
#: The largest size taken: what a file offset (off_t, signed 64 bits) can reach, and more
#: than any drive holds.  Anything above is refused, never rounded.
MAX_SIZE = 1 << 63
#: Digits beyond these cannot be a size at most MAX_SIZE (with leading zeros stripped).
_MAX_DIGITS = len(str(MAX_SIZE)) + 1


def _shown(text: str) -> str:
    """``text`` for a message: a 400-digit argument is cut, so the message stays one line."""
    text = text.strip()
    return repr(text if len(text) <= 40 else f"{text[:20]}...{text[-10:]}")


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number, or with K/M/G/T/P/E or KiB.. (binary), or KB.. (decimal).

    Exact (integers, never a float: 9007199254740993 stays itself), and at most
    :data:`MAX_SIZE`: a larger size is a ``ValueError`` that says so, whatever its length.
    """
    match = _SIZE.match(text)
    if not match or match.group(3).lower() not in _UNITS:
        raise ValueError(f"not a size: {_shown(text)} (examples: 16M, 4MiB, 1048576)")
    whole, fraction = match.group(1).lstrip("0"), (match.group(2) or "").rstrip("0")
    if len(whole) > _MAX_DIGITS:  # before int(): 5000 digits would be its ValueError
        raise ValueError(f"too large: {_shown(text)} (at most {format_size(MAX_SIZE)})")
    if len(fraction) > 64:  # 2**-60 has 60 decimals: more can never be whole bytes
        raise ValueError(f"not a whole number of bytes: {_shown(text)}")
    unit = _UNITS[match.group(3).lower()]
    scale: int = 10 ** len(fraction)
    numerator = (int(whole or "0") * scale + int(fraction or "0")) * unit
    if numerator % scale:
        raise ValueError(f"not a whole number of bytes: {_shown(text)}")
    if numerator // scale > MAX_SIZE:
        raise ValueError(f"too large: {_shown(text)} (at most {format_size(MAX_SIZE)})")
    return numerator // scale


_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(n: int | None) -> str:
    """Binary IEC units: ``511 B``, ``16 MiB`` (exact multiples bare), ``1.5 GiB``, ``?``."""
    if n is None:
        return "?"
    if n < 1024:
        return f"{n} B"
    factor = 1
    for unit in _BINARY_UNITS:
        factor *= 1024
        # Move up while this unit would print 1024 or more (1023.96 MiB is 1.0 GiB, not 1024.0).
        if round(n / factor, 1) < 1024 or unit == _BINARY_UNITS[-1]:
            if n % factor == 0:
                return f"{n // factor} {unit}"
            return f"{n / factor:.1f} {unit}"
    raise AssertionError("unreachable")


def format_link_speed(mbps: int | None) -> str:
    """A USB link's speed as sysfs and people say it: ``480 Mbit/s``, ``5 Gbit/s``, ``?``."""
    if mbps is None:
        return "?"
    if mbps >= 1000 and mbps % 1000 == 0:
        return f"{mbps // 1000} Gbit/s"
    return f"{mbps} Mbit/s"
