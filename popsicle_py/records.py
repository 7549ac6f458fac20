"""Records: frozen dataclasses whose ``repr``, ``==`` and ``hash`` are written once, not per class.

Python 3.11's ``@dataclass(frozen=True)`` compiles six functions for every class it makes
(``__init__``, ``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__``, ``__delattr__``); with
the hundred events, messages, drives and requests a flash imports, that compiling was 50 ms of
its start (issue 30).  ``__repr__``, ``__eq__`` and ``__hash__`` are the same code for every
class but for the field names, so :func:`record` takes them from here and leaves dataclasses to
compile only the other three.  They behave as the generated ones do: the same text, equal only
to an instance of the very same class with equal compared fields, the same hash.

A record is a real dataclass: ``dataclasses.replace``, ``fields``, ``asdict``, ``match`` and
``field(repr=False, compare=False)`` work on it, and type checkers treat ``@record`` as
``@dataclass(frozen=True)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:
    def dataclass_transform(**_: object) -> Callable[[Any], Any]:
        """Nothing at run time: the marker only tells type checkers what :func:`record` is."""
        return lambda decorated: decorated

__all__ = ["record"]

T = TypeVar("T")


def _getter(names: tuple[str, ...]) -> Callable[[object], tuple[Any, ...]]:
    """The tuple of ``names``' values of an instance (attrgetter is a tuple only from two)."""
    if len(names) >= 2:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return lambda obj: ()


def _repr(self: Any) -> str:
    shown = ", ".join(f"{name}={value!r}" for name, value
                      in zip(self.__record_shown__, self.__record_shown_values__(self),
                                              strict=True))
    return f"{type(self).__qualname__}({shown})"


def _eq(self: Any, other: object) -> Any:
    key = self.__record_key__
    if other.__class__ is self.__class__:
        return key(self) == key(other)
    return NotImplemented


def _hash(self: Any) -> int:
    return hash(self.__record_key__(self))


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, dataclasses.Field))
def record(cls: type[T]) -> type[T]:
    """``@dataclass(frozen=True)``, with the shared ``__repr__``, ``__eq__`` and ``__hash__``.

    A method the class defines itself is kept, as dataclasses keep it.
    """
    made = dataclasses.dataclass(frozen=True, repr=False, eq=False)(cls)
    fields = dataclasses.fields(made)  # type: ignore[arg-type]
    shown = tuple(f.name for f in fields if f.repr)
    compared = tuple(f.name for f in fields if f.compare)
    made.__record_shown__ = shown  # type: ignore[attr-defined]
    made.__record_shown_values__ = staticmethod(_getter(shown))  # type: ignore[attr-defined]
    made.__record_key__ = staticmethod(_getter(compared))  # type: ignore[attr-defined]
    own = cls.__dict__
    for name, method in (("__repr__", _repr), ("__eq__", _eq)):
        if name not in own:
            setattr(made, name, method)
    # A class defining __eq__ alone gets __hash__ = None from Python, not from its author.
    explicit_hash = "__hash__" in own and not (own["__hash__"] is None and "__eq__" in own)
    if not explicit_hash:
        made.__hash__ = _hash  # type: ignore[method-assign]
    return made
