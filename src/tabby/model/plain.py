"""Plain value classes: equality, repr and ``replace`` from ``__slots__``.

Why not ``@dataclass``: it generates and compiles ``__init__``, ``__eq__`` and ``__repr__`` for
every class when its module is imported, ~1 ms a class on this machine, and the CNI plugin (a
process per call) imports some twenty record classes. A class here writes its own ``__init__``
(typed, so the constructor is checked like a dataclass's) and lists its fields in ``__slots__``.
"""

from __future__ import annotations

from typing import Any, TypeVar


class Plain:
    __slots__: tuple[str, ...] = ()

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.values() == other.values()  # type: ignore[attr-defined, no-any-return]

    __hash__ = None  # type: ignore[assignment]  # fields may change (or hold a dict): not hashable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self.__slots__)})"


T = TypeVar("T", bound=Plain)  # the class itself, not its name: a string bound is compiled (~2 ms)


def replace(obj: T, **changes: Any) -> T:
    """A copy of obj with some fields changed (``dataclasses.replace`` for Plain classes)."""
    new = object.__new__(type(obj))
    for f in obj.__slots__:
        object.__setattr__(new, f, changes.pop(f) if f in changes else getattr(obj, f))
    if changes:
        raise TypeError(f"{type(obj).__name__} has no field {', '.join(changes)}")
    return new


class Frozen(Plain):
    """A Plain class whose fields are set once, in ``__init__`` (through ``_set``); hashable."""

    __slots__ = ()

    def _set(self, **fields: Any) -> None:
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: {name} cannot be set")

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(self.values())
