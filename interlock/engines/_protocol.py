"""What the pipeline needs from a worker: the `Engine` protocol.

`Role`, `WorkerSnapshot` and `ActiveSequence` are plain data that travel on the worker
protocol, so they are defined in `interlock.wire` (which must not import this package) and
exported here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

import trio

from ..wire import EngineOutput, PreprocessedRequest
from ..wire._snapshot import ROLES, ActiveSequence, Role, WorkerSnapshot

__all__ = ["ROLES", "ActiveSequence", "Engine", "EventListener", "Role", "WorkerSnapshot"]

#: Receives a worker's events (membership changes; KV events and load reports later).
EventListener = Callable[[Any], None]


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
