"""What the pipeline needs from a worker: the `Engine` protocol.

`Role`, `WorkerSnapshot` and `ActiveSequence` are plain data that travel on the worker
protocol, so they are defined in `interlock.wire` (which must not import this package) and
exported here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

import trio

from .._errors import EngineError
from ..wire import EngineOutput, PreprocessedRequest
from ..wire._snapshot import ROLES, ActiveSequence, Role, WorkerSnapshot

__all__ = [
    "ROLES",
    "ActiveSequence",
    "Engine",
    "EventListener",
    "Role",
    "TokenizerMismatch",
    "WorkerMismatch",
    "WorkerSnapshot",
    "WorkerUnreachable",
]

#: Receives a worker's events (membership changes; KV events and load reports later).
EventListener = Callable[[Any], None]


# The errors an engine's `run` raises before ``task_status.started()``: they tell whoever
# adds it (a `Pipeline`, etcd's `WorkerWatcher`) to skip the worker or to try again later,
# whatever the engine's kind.


class WorkerMismatch(EngineError):
    """The worker at the address is not the one configured: another instance id, role,
    block size or tokenizer. Raised by an engine's `run` on the first connection (a later
    one only logs it and keeps the engine out of routing)."""


class TokenizerMismatch(WorkerMismatch):
    """The `WorkerMismatch` of a worker whose tokenizer is not the frontend's: it reports
    another tokenizer fingerprint, or (reporting none) may generate ids the frontend's
    tokenizer does not have."""


class WorkerUnreachable(EngineError):
    """An engine's `run` could not reach its worker (complete a handshake, get a health
    answer) within its ``connect_timeout``; the worker may come up later."""


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

        The iterator may also offer ``receive_nowait()``: the next output without waiting,
        raising ``trio.WouldBlock`` when none has arrived (and `StopAsyncIteration` once the
        stream ended); the pipeline then takes a backlog in one go. And ``fail_waiting(exc)``:
        end the reader's wait for the next output with ``exc`` (raised from ``__anext__``), or
        return False and do nothing when something has already arrived for the reader or the
        stream ended; the pipeline then keeps the stream's deadlines with one task of its own
        instead of a cancel scope per wait.
        """
        ...

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        """Call ``listener(event)`` for each event the worker publishes; returns a remover."""
        ...

    async def snapshot(self) -> WorkerSnapshot:
        """The worker's current state (waits for a remote worker to answer)."""
        ...
