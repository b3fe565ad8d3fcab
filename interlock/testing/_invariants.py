"""`check_invariants`: what must hold of any transition log, whatever the faults."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..statemachines import TERMINAL_STATES, Mode, State, TransitionRecord, Trigger, table_for

_EXECUTION_STATES = frozenset({State.PREFILLING, State.PREFILLED, State.DECODING, State.MIGRATED})


class InvariantViolation(AssertionError):
    """A transition log broke an invariant. The message names the request and quotes the
    offending record; ``request_id`` and ``records`` hold the request's whole log."""

    def __init__(self, message: str, request_id: str, records: list[Any]) -> None:
        timeline = "\n".join(f"    {_describe(r)}" for r in records)
        super().__init__(f"request {request_id!r}: {message}\n  its transitions:\n{timeline}")
        self.request_id = request_id
        self.records = records


def _field(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def _describe(record: Any) -> str:
    worker = _field(record, "worker_id")
    detail = _field(record, "detail")
    return (
        f"#{_field(record, 'seq')} {_field(record, 'src')} --{_field(record, 'trigger')}--> "
        f"{_field(record, 'dst')}"
        + (f" worker={worker}" if worker is not None else "")
        + (f" ({detail})" if detail else "")
    )


def check_invariants(
    records: Iterable[TransitionRecord | Mapping[str, Any]],
    *,
    migration_limit: int | None = None,
    require_terminal: bool = True,
) -> dict[str, list[Any]]:
    """Check every request in a transition log (records or JSONL dicts, in any order).

    Checked per request: its sequence numbers run 0, 1, 2, ... without gaps; it starts in
    ``received``; every step is an edge of its mode's graph; it ends in a terminal state
    (unless ``require_terminal=False``, for logs of a pipeline still running); nothing happens
    after a terminal state but one ``usage`` note after ``done`` (``done -> done``); query_only
    requests never enter an execution state; it migrates at most ``migration_limit`` times.

    Returns the records grouped by request id.

    Raises:
        InvariantViolation: naming the request and the offending record.
    """
    grouped: dict[str, list[Any]] = {}
    for record in records:
        grouped.setdefault(_field(record, "request_id"), []).append(record)
    for request_id, group in grouped.items():
        group.sort(key=lambda r: _field(r, "seq"))
        _check_request(request_id, group, migration_limit, require_terminal)
    return grouped


def _check_request(
    request_id: str, group: list[Any], migration_limit: int | None, require_terminal: bool
) -> None:
    def fail(message: str) -> None:
        raise InvariantViolation(message, request_id, group)

    mode_name = _field(group[0], "mode")
    try:
        mode = Mode.from_name(mode_name)
    except ValueError as exc:
        fail(str(exc))
    table = table_for(mode)
    state = State.RECEIVED.value
    migrations = 0
    noted = False
    for expected_seq, record in enumerate(group):
        where = _describe(record)
        if _field(record, "seq") != expected_seq:
            fail(f"sequence numbers skip or repeat at {where} (expected #{expected_seq})")
        if _field(record, "mode") != mode_name:
            fail(f"mode changes to {_field(record, 'mode')!r} at {where}")
        src, trigger, dst = _field(record, "src"), _field(record, "trigger"), _field(record, "dst")
        if trigger == Trigger.USAGE and state == src == dst == State.DONE:
            # A note about the ended request, not a transition: its response's usage, once.
            if noted:
                fail(f"a second usage note after the request's end: {where}")
            noted = True
            continue
        if state in TERMINAL_STATES:
            fail(f"a transition after the terminal state {state!r}: {where}")
        if src != state:
            fail(f"{where} starts from {src!r}, but the request was in {state!r}")
        legal = table.get((src, trigger))
        if legal is None:
            fail(f"{where} is not an edge of mode {mode_name!r}")
        if legal != dst:
            fail(f"{where} should lead to {legal!r} in mode {mode_name!r}")
        if not mode.executes and dst in _EXECUTION_STATES:
            fail(f"a query_only request executed: {where}")
        if trigger == Trigger.MIGRATE:
            migrations += 1
            if migration_limit is not None and migrations > migration_limit:
                fail(f"migration #{migrations} exceeds migration_limit={migration_limit}: {where}")
        state = dst
    if require_terminal and state not in TERMINAL_STATES:
        fail(f"ends in {state!r}, which is not terminal")
