"""`RequestFilter`: which requests a summary, a validation or a follow looks at."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import attrs

from ._history import RequestHistory


def _strings(values: str | Iterable[str] | None) -> frozenset[str]:
    if values is None:
        return frozenset()
    return frozenset({values}) if isinstance(values, str) else frozenset(values)


def _ints(values: int | Iterable[int] | None) -> frozenset[int]:
    if values is None:
        return frozenset()
    return frozenset({values}) if isinstance(values, int) else frozenset(values)


@attrs.frozen(kw_only=True)
class RequestFilter:
    """Selects whole requests (never single records, so a selected request keeps its path).

    A request is selected when it matches every criterion given: it went through one of
    ``states`` (any state of its path, so ``done`` selects finished requests and ``migrated``
    those that migrated); a record names one of ``workers``; its mode is one of ``modes``; and
    its records' wall-clock span (Unix seconds) overlaps ``[since, until]``: it was active in
    the window. Empty sets and None accept anything.
    """

    states: frozenset[str] = attrs.field(default=frozenset(), converter=_strings)
    workers: frozenset[int] = attrs.field(default=frozenset(), converter=_ints)
    modes: frozenset[str] = attrs.field(default=frozenset(), converter=_strings)
    since: float | None = None
    until: float | None = None

    def matches(self, history: RequestHistory) -> bool:
        if self.modes and history.mode not in self.modes:
            return False
        if self.states and not self.states.intersection(history.path):
            return False
        if self.workers and not self.workers.intersection(history.workers):
            return False
        first, last = history.entries[0].wall, history.entries[-1].wall
        if self.since is not None and last < self.since:
            return False
        return not (self.until is not None and first > self.until)


def parse_time(text: str) -> float:
    """A ``--since``/``--until`` value as Unix seconds: a number of seconds, or an ISO 8601
    date-time (``2025-01-31T12:00:00``, local time unless it names a zone, ``Z`` for UTC).

    Raises:
        ValueError: neither, with an example of each.
    """
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give Unix seconds (1735689600) or an ISO 8601 date-time "
            "(2025-01-01T00:00:00, local time, or with a zone: 2025-01-01T00:00:00Z)"
        ) from None
    return moment.timestamp()
