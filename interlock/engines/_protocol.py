"""What the pipeline needs from a worker: the `Engine` protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol, runtime_checkable

import attrs
import trio

from ..wire import EngineOutput, PreprocessedRequest

Role = Literal["agg", "prefill", "decode"]
ROLES: tuple[Role, ...] = ("agg", "prefill", "decode")

#: Receives a worker's events (membership changes; KV events and load reports later).
EventListener = Callable[[Any], None]


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


@runtime_checkable
class Engine(Protocol):
    """A worker that runs requests: in-process (`MockEngine`), or a client for a remote one.

    The pipeline starts `run` in its own nursery and owns the engine until it closes.
    """

    @property
    def instance_id(self) -> int: ...

    @property
    def role(self) -> Role: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; call ``task_status.started()`` once ready."""
        ...

    def open_stream(
        self, request: PreprocessedRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[EngineOutput]]:
        """Start ``request``; the context yields its outputs, the last with a finish_reason.

        Leaving the context before the last output cancels the request on the worker and frees
        its slot. Entering raises `WorkerRefused` when the worker will not take it; iterating
        raises `WorkerGone` when the stream breaks.
        """
        ...

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        """Call ``listener(event)`` for each event the worker publishes; returns a remover."""
        ...

    async def snapshot(self) -> WorkerSnapshot:
        """The worker's current state (waits for a remote worker to answer)."""
        ...
