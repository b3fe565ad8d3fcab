"""Converting wire messages to and from plain data (JSON, msgpack, TOML-shaped dicts).

One converter, built once. Structuring is strict: unknown keys are refused, and a value of the
wrong type is refused rather than coerced (cattrs would turn ``"3"`` or ``2.7`` into ``3``
and a string into a tuple of characters, silently changing a client's request). Errors name
the field.
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from .._errors import RequestError

T = TypeVar("T")

converter = cattrs.Converter(forbid_extra_keys=True)


def _is_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.Enum)


def _enum(value: Any, kind: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in kind)
        raise ValueError(f"must be one of {allowed}, got {value!r}") from None


def _strict(kind: type) -> Any:
    def structure(value: Any, target: Any) -> Any:
        if target is not kind and _is_enum(target):
            # A str or int enum reaches this hook through its base class.
            return _enum(value, target)
        if type(value) is kind or (kind is float and type(value) is int):
            return value
        raise TypeError(f"must be {kind.__name__}, got {type(value).__name__} {value!r}")

    return structure


for _scalar in (int, float, str, bool):
    converter.register_structure_hook(_scalar, _strict(_scalar))


def _int_tuple(value: Any, _type: Any) -> tuple[int, ...]:
    if type(value) not in (list, tuple):
        raise TypeError(f"must be a list of integers, got {type(value).__name__}")
    result = tuple(value)
    # set(map(type, ...)) runs in C; ranges are the classes' job. Refuses bools too.
    if not set(map(type, result)) <= {int}:
        bad = next(v for v in result if type(v) is not int)
        kind = "a boolean" if type(bad) is bool else repr(bad)
        raise TypeError(f"must be a list of integers; found {kind}")
    return result


def _str_tuple(value: Any, _type: Any) -> tuple[str, ...]:
    if type(value) not in (list, tuple) or not all(type(v) is str for v in value):
        raise TypeError("must be a list of strings")
    return tuple(value)


# Enums (string enums included, which would otherwise match the str hook) by value.
converter.register_structure_hook_func(_is_enum, _enum)
converter.register_unstructure_hook_func(_is_enum, lambda member: member.value)
converter.register_structure_hook_func(lambda kind: kind == tuple[int, ...], _int_tuple)
converter.register_structure_hook_func(lambda kind: kind == tuple[str, ...], _str_tuple)
converter.register_unstructure_hook_func(
    lambda kind: getattr(kind, "__origin__", kind) in (frozenset, set),
    lambda value: sorted(value),
)


def to_builtins(message: Any) -> Any:
    """A message as dicts, lists and scalars (tuples become lists)."""
    return converter.unstructure(message)


def from_builtins(data: Any, cls: type[T]) -> T:
    """Build a ``cls`` message from plain data.

    Raises:
        RequestError: naming the unknown or invalid field.
    """
    try:
        return converter.structure(data, cls)
    except RequestError:
        raise
    except ClassValidationError as group:
        raise _first_error(group, cls.__name__) from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise RequestError(f"invalid {cls.__name__}: {exc}", field=cls.__name__) from None


def _first_error(error: BaseException, where: str, field: str | None = None) -> RequestError:
    """The first leaf error of a cattrs validation group, as a `RequestError` naming the
    innermost field it concerns."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, ForbiddenExtraKeysError):
        keys = sorted(error.extra_fields)
        return RequestError(f"unknown field {keys[0]!r} in {error.cl.__name__}", field=keys[0])
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            name = field
            for note in getattr(inner, "__notes__", ()):
                name = getattr(note, "name", None) or name
            return _first_error(inner, where, name if isinstance(name, str) else field)
    name = field or where
    return RequestError(f"{name} {error}", field=name)
