"""Just enough YAML for cloud-init's files: mappings, lists, strings, numbers and booleans.

Strings are written as JSON strings (valid YAML double-quoted scalars) with every character
outside printable ASCII escaped, so no value can turn into a different type or break the
document, whatever it holds: the files are ASCII, and a YAML reader gives back each value.
"""

from __future__ import annotations

import json
import re

__all__ = ["dump"]


def _scalar(value: object) -> str:
    if isinstance(value, dict | list) and not value:
        return "{}" if isinstance(value, dict) else "[]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _ASTRAL.sub(_wide, json.dumps(value, ensure_ascii=True))
    raise TypeError(f"no YAML for {type(value).__name__}")


#: JSON's escape of a character past U+FFFF: a surrogate pair, which YAML does not take
#: (libyaml, as netplan reads, refuses it; PyYAML's own reader gives lone surrogates).
#: An escape only where its backslash is not itself escaped (text holding "\\ud83c").
_ASTRAL = re.compile(r"(?<!\\)((?:\\\\)*)\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})")


def _wide(pair: re.Match[str]) -> str:
    """The pair as YAML's own escape of the whole character: ``\\UXXXXXXXX``."""
    high, low = int(pair[2], 16), int(pair[3], 16)
    return f"{pair[1]}\\U{0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00):08X}"


#: Plain words YAML 1.1 (PyYAML, which cloud-init and netplan use) reads as booleans or null.
_SPECIAL = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})


def _key(key: str) -> str:
    """A key as written: plain when it can only be read back as this string, else quoted
    (an SSID named "on", "123" or "-010", YAML 1.1's octal -8, stays a string)."""
    plain = key.isascii() and key[:1].isalpha() and key.replace("-", "_").isidentifier() \
        and key.lower() not in _SPECIAL
    return key if plain else _scalar(key)


def _lines(value: object, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                out.append(f"{pad}{_key(str(key))}:")
                out.extend(_lines(item, indent + 2))
            else:
                out.append(f"{pad}{_key(str(key))}: {_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list) and item:
                inner = _lines(item, indent + 2)
                out.append(f"{pad}- {inner[0].lstrip()}")
                out.extend(inner[1:])
            else:
                out.append(f"{pad}- {_scalar(item)}")
    else:
        out.append(pad + _scalar(value))
    return out


def dump(value: object) -> str:
    """``value`` as a YAML block document (no trailing document marker)."""
    return "\n".join(_lines(value, 0)) + "\n"
