"""README and the man page list exactly the phases, statuses, causes and JSON fields the code has.

The lists come from popsicle_py.events itself (its enums, and every event's ``to_json``), so a
phase added to the code (as ``watch``'s "decompressing" once was, undocumented) fails here until
both documents name it, and a word the documents name that the code does not have fails too.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from popsicle_py import events

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
MAN = (REPO / "man" / "popsicle-py.1").read_text()


def _json_section_of_readme() -> str:
    start = README.index("### JSON events")
    end = README.index("\n## ", start)
    return README[start:end]


def _json_section_of_man() -> str:
    start = MAN.index(".SS JSON events")
    end = MAN.index("\n.SH ", start)
    return MAN[start:end].replace("\\-", "-").replace("\\(em", "-")


def _sample(cls: type) -> Any:
    """An instance of an event class, every field given a value of its declared type."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        kind = hints[f.name]
        origin = typing.get_origin(kind)
        args = typing.get_args(kind)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            kind = next(a for a in args if a is not type(None))
            origin = typing.get_origin(kind)
        if kind is events.DriveResult:
            values[f.name] = _sample(events.DriveResult)
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            values[f.name] = next(iter(kind))
        elif kind is str:
            values[f.name] = "x"
        elif kind is int:
            values[f.name] = 1
        elif kind is float:
            values[f.name] = 1.0
        elif kind is bool:
            values[f.name] = True
        elif origin is tuple or kind is tuple:
            values[f.name] = ()
        elif dataclasses.is_dataclass(kind):
            values[f.name] = _sample(kind)  # type: ignore[arg-type]
        else:
            values[f.name] = None
    return cls(**values)


def _event_classes() -> list[type]:
    return [obj for obj in vars(events).values()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj)
            and hasattr(obj, "to_json") and obj not in (events.DriveResult, events.DriveInfo)]


def _keys() -> dict[str, set[str]]:
    """event name -> the keys its JSON object has."""
    found: dict[str, set[str]] = {}
    for cls in _event_classes():
        data = _sample(cls).to_json()
        found.setdefault(data["event"], set()).update(k for k in data if k != "event")
    found["result"] |= set(_sample(events.DriveResult).to_json())
    return found


WORDS = {
    "phases": [s.value for s in events.Step],
    "statuses": [s.value for s in events.Status],
    "causes": [c.value for c in events.Cause],
}


@pytest.mark.parametrize("kind", sorted(WORDS))
def test_readme_lists_every_word_the_code_has(kind: str) -> None:
    section = _json_section_of_readme()
    missing = [w for w in WORDS[kind] if f"`{w}`" not in section]
    assert not missing, f"README's JSON section does not name these {kind}: {missing}"


@pytest.mark.parametrize("kind", sorted(WORDS))
def test_man_page_lists_every_word_the_code_has(kind: str) -> None:
    section = _json_section_of_man()
    missing = [w for w in WORDS[kind] if not re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])",
                                                        section)]
    assert not missing, f"the man page's JSON events do not name these {kind}: {missing}"


def test_readme_documents_every_event_and_field() -> None:
    section = _json_section_of_readme()
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `(\w+)` \| (.*) \|$", section, re.M)}
    for name, keys in _keys().items():
        assert name in rows, f"README's JSON events table has no row for `{name}`"
        missing = sorted(k for k in keys if f"`{k}`" not in rows[name])
        assert not missing, f"README: the `{name}` row does not name {missing}"


def test_readme_names_no_phase_the_code_lacks() -> None:
    section = _json_section_of_readme()
    line = next(line for line in section.splitlines() if line.startswith("| `phase` |"))
    listed = set(re.findall(r"`(\w+)`", line.split("`phase` (", 1)[1].split(")", 1)[0]))
    assert listed == set(WORDS["phases"]), listed ^ set(WORDS["phases"])


def test_man_page_documents_every_event_and_field() -> None:
    section = _json_section_of_man()
    for name, keys in _keys().items():
        assert re.search(rf"^\.B {name}$", section, re.M), f"man page: no entry for {name}"
        missing = sorted(k for k in keys if not re.search(rf"(?<![\w]){k}(?![\w])", section))
        assert not missing, f"man page: the JSON events do not name {missing} ({name})"
