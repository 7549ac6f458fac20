"""Records: frozen dataclasses made without compiling code of their own but ``__init__``.

Python 3.11's ``@dataclass(frozen=True)`` compiles six functions for every class it makes
(``__init__``, ``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__``, ``__delattr__``); with
the hundred events, messages, drives and requests a flash imports, that compiling was 50 ms of
its start (issue 30).  All but ``__init__`` are the same code for every class but for the field
names, so :func:`record` has dataclasses compile the ``__init__`` of a plain dataclass and takes
the rest from here, where they are written once.  They behave as the generated ones do: the same
text; equal only to an instance of the very same class with equal compared fields; the same
hash; and :class:`dataclasses.FrozenInstanceError` for any assignment or deletion once built
(the ``__init__`` sets each field once; a field not yet set is the only one that can be).

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
    values = self.__record_shown_values__(self)
    shown = ", ".join(f"{name}={value!r}"
                      for name, value in zip(self.__record_shown__, values, strict=True))
    return f"{type(self).__qualname__}({shown})"


def _eq(self: Any, other: object) -> Any:
    key = self.__record_key__
    if other.__class__ is self.__class__:
        return key(self) == key(other)
    return NotImplemented


def _hash(self: Any) -> int:
    return hash(self.__record_key__(self))


def _freeze(cls: type[Any]) -> None:
    """Frozen as dataclasses freeze: for the class itself and its fields in a subclass."""
    fields = cls.__dataclass_fields__

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if name in fields and name not in self.__dict__:  # __init__ setting it
            object.__setattr__(self, name, value)
        elif type(self) is cls or name in fields:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        else:
            super(cls, self).__setattr__(name, value)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in fields:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)

    cls.__setattr__ = __setattr__  # type: ignore[assignment]
    cls.__delattr__ = __delattr__  # type: ignore[assignment]


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, dataclasses.Field))
def record(cls: type[T]) -> type[T]:
    """``@dataclass(frozen=True)``, with the shared methods of this module.

    A ``__repr__``, ``__eq__`` or ``__hash__`` the class defines itself is kept, as
    dataclasses keep it; one that defines ``__setattr__`` or ``__delattr__`` is refused.
    """
    own = cls.__dict__
    if "__setattr__" in own or "__delattr__" in own:
        raise TypeError(f"{cls.__qualname__}: a record cannot define __setattr__ or __delattr__")
    made = dataclasses.dataclass(repr=False, eq=False)(cls)
    _freeze(made)
    fields = dataclasses.fields(made)  # type: ignore[arg-type]
    shown = tuple(f.name for f in fields if f.repr)
    compared = tuple(f.name for f in fields if f.compare)
    made.__record_shown__ = shown  # type: ignore[attr-defined]
    made.__record_shown_values__ = staticmethod(_getter(shown))  # type: ignore[attr-defined]
    made.__record_key__ = staticmethod(_getter(compared))  # type: ignore[attr-defined]
    for name, method in (("__repr__", _repr), ("__eq__", _eq)):
        if name not in own:
            setattr(made, name, method)
    # A class defining __eq__ alone gets __hash__ = None from Python, not from its author.
    explicit_hash = "__hash__" in own and not (own["__hash__"] is None and "__eq__" in own)
    if not explicit_hash:
        made.__hash__ = _hash  # type: ignore[method-assign]
    return made
