"""Converting wire messages to and from plain data (JSON, msgpack, TOML-shaped dicts).

One converter, built once. Structuring forbids unknown keys, so a typo in a field name is an
error that names it rather than a value silently dropped.
"""

from __future__ import annotations

from typing import Any, TypeVar

import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from .._errors import RequestError

T = TypeVar("T")

converter = cattrs.Converter(forbid_extra_keys=True)

# Scalars pass through unchanged: cattrs would coerce them (int("3"), int(2.7), int(True)),
# which turns a client's mistake into a silently different request. The message classes'
# own validators check types and name the field.
for _scalar in (int, float, str, bool):
    converter.register_structure_hook(_scalar, lambda value, _type: value)
converter.register_structure_hook_func(
    lambda kind: kind in (tuple[int, ...], tuple[str, ...]), lambda value, _type: value
)
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
    except (TypeError, ValueError) as exc:
        raise RequestError(f"invalid {cls.__name__}: {exc}", field=cls.__name__) from None


def _first_error(group: BaseException, where: str) -> RequestError:
    if isinstance(group, RequestError):
        return group
    if isinstance(group, ForbiddenExtraKeysError):
        keys = sorted(group.extra_fields)
        return RequestError(f"unknown field {keys[0]!r} in {where}", field=keys[0])
    if isinstance(group, BaseExceptionGroup):
        notes = getattr(group, "__notes__", [])
        for exc in group.exceptions:
            inner = _first_error(exc, where)
            field = inner.field
            for note in getattr(exc, "__notes__", []) or notes:
                if "attribute" in note and "'" in note:
                    field = note.split("'")[1]
                    break
            if field != where:
                return RequestError(str(inner), field=field)
            return inner
    return RequestError(f"invalid {where}: {group}", field=where)
