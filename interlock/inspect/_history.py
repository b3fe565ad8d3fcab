"""One request's records in order, and what follows from them: its path, the time it spent in
each state, the workers it touched."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from ..statemachines import TERMINAL_STATES, State, Trigger
from ._records import LogEntry

#: Triggers whose record carries a `RoutingDecision`.
ROUTING_TRIGGERS = frozenset({Trigger.ROUTE.value, Trigger.FALL_BACK.value})


@attrs.frozen(slots=True)
class StateSpan:
    """A stay in one state: entered at trio time ``entered`` by the ``trigger`` of record
    ``seq`` (about worker ``worker_id``), left at ``left``. The request's last state has no
    ``left`` and no ``duration``."""

    state: str
    seq: int
    trigger: str
    entered: float
    left: float | None
    worker_id: int | None

    @property
    def duration(self) -> float | None:
        """Seconds spent in the state, or None for the last state."""
        return None if self.left is None else self.left - self.entered


@attrs.frozen
class RequestHistory:
    """Every record of one request, in sequence order.

    ``received`` has no span: the log records when a request leaves it, not when it arrived.
    """

    request_id: str
    entries: tuple[LogEntry, ...]
    #: ``request_id``, or ``request_id@N`` for the N-th request of that id in the log.
    key: str = attrs.field()

    @key.default
    def _key_default(self) -> str:
        return self.request_id

    @property
    def mode(self) -> str:
        return self.entries[0].mode

    @property
    def path(self) -> list[str]:
        """The states the request went through, starting where its first record starts."""
        return [self.entries[0].src, *(e.dst for e in self.entries)]

    @property
    def final_state(self) -> str:
        return self.entries[-1].dst

    @property
    def terminal(self) -> bool:
        """Whether the request has ended (done, failed or cancelled)."""
        return self.final_state in TERMINAL_STATES

    @property
    def complete(self) -> bool:
        """Whether the log holds the request from its start (a rotated-away or lost head
        leaves it without record 0)."""
        return self.entries[0].seq == 0 and self.entries[0].src == State.RECEIVED

    @property
    def started(self) -> float:
        """Trio time of the first record."""
        return self.entries[0].t

    @property
    def elapsed(self) -> float:
        """Trio seconds from the first record to the last."""
        return self.entries[-1].t - self.entries[0].t

    @property
    def spans(self) -> list[StateSpan]:
        """Each state entered, with how long the request stayed."""
        entries = self.entries
        return [
            StateSpan(
                state=entry.dst,
                seq=entry.seq,
                trigger=entry.trigger,
                entered=entry.t,
                left=entries[i + 1].t if i + 1 < len(entries) else None,
                worker_id=entry.worker_id,
            )
            for i, entry in enumerate(entries)
        ]

    @property
    def workers(self) -> set[int]:
        """Every worker a record names (prefill and decode workers, broken ones)."""
        return {e.worker_id for e in self.entries if e.worker_id is not None}

    @property
    def last_worker(self) -> int | None:
        """The worker named last: where the request was when it ended (or is now)."""
        for entry in reversed(self.entries):
            if entry.worker_id is not None:
                return entry.worker_id
        return None

    @property
    def routing_entries(self) -> list[LogEntry]:
        """The records that carry a routing decision (``route`` and ``fall_back``)."""
        return [
            e
            for e in self.entries
            if e.trigger in ROUTING_TRIGGERS and isinstance(e.decision, dict)
        ]

    def count(self, trigger: str) -> int:
        """How many times the request took ``trigger``."""
        return sum(1 for e in self.entries if e.trigger == trigger)

    def to_json_dict(self) -> dict[str, Any]:
        """The history for ``--json``: path, spans and the records themselves."""
        return {
            "request_id": self.request_id,
            "key": self.key,
            "mode": self.mode,
            "final_state": self.final_state,
            "terminal": self.terminal,
            "complete": self.complete,
            "path": self.path,
            "elapsed": self.elapsed,
            "spans": [
                {
                    "state": s.state,
                    "seq": s.seq,
                    "trigger": s.trigger,
                    "entered": s.entered,
                    "left": s.left,
                    "duration": s.duration,
                    "worker_id": s.worker_id,
                }
                for s in self.spans
            ],
            "records": [
                e.to_json_dict() | {"source": e.source, "line": e.line} for e in self.entries
            ],
        }


def group_requests(entries: Iterable[LogEntry]) -> dict[str, RequestHistory]:
    """Histories by `RequestHistory.key`, in order of each request's first record.

    A log appended to by several pipeline runs can hold the same id twice (``req-0`` of each
    run): a record #0 for an id whose current history already has one starts a new history,
    keyed ``ID@2``, ``ID@3``, ... in reading order.
    """
    grouped: dict[str, list[LogEntry]] = {}
    current: dict[str, str] = {}
    runs: dict[str, int] = {}
    started: set[str] = set()
    for entry in entries:
        rid = entry.request_id
        key = current.get(rid)
        if key is None or (entry.seq == 0 and key in started):
            runs[rid] = runs.get(rid, 0) + 1
            key = rid if runs[rid] == 1 else f"{rid}@{runs[rid]}"
            current[rid] = key
            grouped[key] = []
        if entry.seq == 0:
            started.add(key)
        grouped[key].append(entry)
    return {
        key: RequestHistory(group[0].request_id, tuple(sorted(group, key=lambda e: e.seq)), key)
        for key, group in grouped.items()
    }
