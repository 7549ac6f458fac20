"""A record behaves as ``@dataclass(frozen=True)`` does: text, equality, hash, the rest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from popsicle_py.events import Phase, Step
from popsicle_py.records import record


@record
class Point:
    """Two compared fields, one hidden from repr, one left out of == and hash."""

    x: int
    y: str = "a"
    secret: str = field(default="s", repr=False)
    note: tuple[int, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class DataPoint:
    """The same fields as a plain frozen dataclass, to compare with."""

    x: int
    y: str = "a"
    secret: str = field(default="s", repr=False)
    note: tuple[int, ...] = field(default=(), compare=False)


@record
class Child(Point):
    """A record of a record adds its own field to all four."""

    z: int = 0


@record
class One:
    """One field: its key is still a tuple."""

    only: int


@record
class Empty:
    """No field at all."""


@record
class Own:
    """A method of the class's own is kept."""

    v: int

    def __repr__(self) -> str:
        return "mine"


def _as_data(p: Point) -> DataPoint:
    return DataPoint(p.x, p.y, p.secret, p.note)


@pytest.mark.parametrize("point", [Point(1), Point(2, "b", "hidden", (1, 2)), Point(-1, "")])
def test_repr_eq_and_hash_are_those_of_a_frozen_dataclass(point: Point) -> None:
    data = _as_data(point)
    assert repr(point) == repr(data).replace("DataPoint", "Point")
    assert hash(point) == hash(data)
    assert point == dataclasses.replace(point, note=(9,))  # compare=False: not compared
    assert point != dataclasses.replace(point, secret="other")  # repr=False: still compared
    other: object = data
    assert point != other  # another class is never equal, as a dataclass's ==
    assert point.__eq__(other) is NotImplemented


def test_frozen_replace_fields_asdict_and_match() -> None:
    p = Point(3, "c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 4  # type: ignore[misc]
    assert dataclasses.is_dataclass(p)
    assert [f.name for f in dataclasses.fields(p)] == ["x", "y", "secret", "note"]
    assert dataclasses.asdict(p) == {"x": 3, "y": "c", "secret": "s", "note": ()}
    match p:
        case Point(x, y):
            assert (x, y) == (3, "c")
        case _:
            pytest.fail("a record matches by position as a dataclass does")
    assert {p: 1}[Point(3, "c")] == 1


def test_subclass_one_field_no_field_and_own_methods() -> None:
    c = Child(1, z=5)
    assert repr(c) == "Child(x=1, y='a', note=(), z=5)"
    assert c != Child(1, z=6) and c == Child(1, z=5, note=(7,))
    assert c != Point(1)  # the parent is another class
    assert repr(One(4)) == "One(only=4)" and hash(One(4)) == hash((4,)) and One(4) == One(4)
    assert repr(Empty()) == "Empty()" and Empty() == Empty() and hash(Empty()) == hash(())
    assert repr(Own(1)) == "mine" and Own(1) == Own(1)


def test_the_code_s_records_print_and_compare_as_before() -> None:
    phase = Phase("/dev/sdb", Step.WRITING)
    assert repr(phase).startswith("Phase(device='/dev/sdb', phase=<Step.WRITING")
    assert phase == Phase("/dev/sdb", Step.WRITING) and phase != Phase("/dev/sdc", Step.WRITING)


def test_frozen_once_built_as_a_frozen_dataclass() -> None:
    p = Point(1)
    for name in ("x", "note", "other"):  # a field, a field left out of ==, not a field
        with pytest.raises(dataclasses.FrozenInstanceError, match=f"assign to field '{name}'"):
            setattr(p, name, 2)
        with pytest.raises(dataclasses.FrozenInstanceError, match=f"delete field '{name}'"):
            delattr(p, name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Child(1).z = 1  # type: ignore[misc]
    assert (p.x, p.note) == (1, ())

    class Plain(Point):  # a subclass that is no dataclass may have attributes of its own
        pass

    plain = Plain(2)
    plain.extra = 3  # type: ignore[attr-defined]
    assert plain.extra == 3  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plain.x = 3  # type: ignore[misc]


def test_copies_and_pickles_and_refuses_its_own_setattr() -> None:
    import copy
    import pickle

    p = Child(1, "b", "c", (2,), 3)
    for twin in (copy.copy(p), copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert twin == p and repr(twin) == repr(p) and twin is not p
    with pytest.raises(TypeError, match="cannot define __setattr__"):
        @record
        class Mutable:
            v: int

            def __setattr__(self, name: str, value: object) -> None:
                object.__setattr__(self, name, value)
