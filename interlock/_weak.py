"""`WeakCallback`: a bound method called through a weak reference.

For callbacks a longer-lived object keeps (a pipeline's membership watchers and queue-time
observers): a pipeline may outlive the apps built over it, and must neither keep one alive
through its callbacks nor call one that is gone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Generic, ParamSpec

P = ParamSpec("P")


class WeakCallback(Generic[P]):
    """Calls ``method`` while its object lives; a no-op once it is gone. Two compare equal
    while they call the same live object's same method (so ``in`` finds a duplicate);
    unhashable, as what they equal changes when the object goes."""

    __slots__ = ("__weakref__", "_method")

    def __init__(self, method: Callable[P, Any]) -> None:
        self._method = weakref.WeakMethod(method)  # type: ignore[arg-type]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> None:
        method = self._method()
        if method is not None:
            method(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WeakCallback) and self._method == other._method

    __hash__ = None  # type: ignore[assignment]  # equal while alive, identity-free after: unhashable
