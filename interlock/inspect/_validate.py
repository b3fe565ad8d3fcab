"""`validate`: `check_invariants` over every request of a log, collecting each failure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ..testing import InvariantViolation, check_invariants
from ._history import RequestHistory
from ._records import LogEntry


@attrs.frozen
class Violation:
    """One request whose path breaks an invariant: `check_invariants`'s error, and the log
    lines of the request's records."""

    request_id: str
    error: InvariantViolation
    entries: tuple[LogEntry, ...]

    @property
    def message(self) -> str:
        return str(self.error)

    @property
    def locations(self) -> str:
        """``SOURCE:FIRST-LAST`` ranges of the request's lines, e.g. ``log.jsonl:3-9,14``."""
        parts: list[str] = []
        by_source: dict[str, list[int]] = {}
        for entry in self.entries:
            by_source.setdefault(entry.source, []).append(entry.line)
        for source, lines in by_source.items():
            ranges: list[str] = []
            ordered = sorted(lines)
            start = previous = ordered[0]
            for line in [*ordered[1:], None]:
                if line is not None and line == previous + 1:
                    previous = line
                    continue
                ranges.append(str(start) if start == previous else f"{start}-{previous}")
                if line is not None:
                    start = previous = line
            parts.append(f"{source}:{','.join(ranges)}")
        return " ".join(parts)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "message": self.message,
            "records": [e.location for e in self.entries],
        }


def validate(
    requests: Mapping[str, RequestHistory] | Iterable[RequestHistory],
    *,
    migration_limit: int | None = None,
    require_terminal: bool = True,
) -> list[Violation]:
    """Check each request with `interlock.testing.check_invariants` (its path follows its
    mode's graph, starts in ``received``, ends in a terminal state unless
    ``require_terminal=False``, has nothing after the end, never executes in query_only, and
    migrates at most ``migration_limit`` times). Returns one `Violation` per failing request;
    an empty list means every path is legal."""
    histories = requests.values() if isinstance(requests, Mapping) else requests
    found: list[Violation] = []
    for history in histories:
        try:
            check_invariants(
                [entry.to_json_dict() for entry in history.entries],
                migration_limit=migration_limit,
                require_terminal=require_terminal,
            )
        except InvariantViolation as exc:
            found.append(Violation(history.key, exc, history.entries))
    return found
