"""A worker's state as plain data: its role, and the `WorkerSnapshot` a frontend asks for.

These travel on the worker protocol (`SnapshotReply`), so they live in the wire layer; the
`Engine` protocol (`interlock.engines`, where users import them) returns them.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

Role = Literal["agg", "prefill", "decode"]
ROLES: tuple[Role, ...] = ("agg", "prefill", "decode")


@attrs.frozen
class ActiveSequence:
    """A request a worker is serving, as reported in a `WorkerSnapshot`."""

    request_id: str
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    prefill_done: bool


@attrs.frozen
class WorkerSnapshot:
    """A worker's state, for rebuilding a router after a restart or an event gap.

    ``kv_blocks`` is its whole KV cache as stored events, parents first, current as of event
    ``kv_last_event_id`` (-1 before the first event); empty for a worker that publishes no KV
    events.
    """

    worker_id: int
    role: Role
    active: tuple[ActiveSequence, ...] = ()
    kv_blocks: tuple[Any, ...] = ()
    kv_last_event_id: int = -1
    block_size: int | None = None
