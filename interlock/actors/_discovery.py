"""The Discovery actor: mirrors the registry and tells subscribers about membership."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from ..discovery import EmbeddedRegistry
from ..engines import Engine
from ._messages import GetWorkers, WorkersChanged
from ._runtime import Actor, ActorRef


@attrs.frozen
class _RegistryChanged:
    workers: Mapping[int, Engine]


class DiscoveryActor(Actor):
    """Watches the registry; replies to `GetWorkers`; sends `WorkersChanged` to every
    subscriber after each change (and after its own restart, so nobody misses one)."""

    name = "discovery"

    def __init__(self, registry: EmbeddedRegistry, subscribers: Sequence[ActorRef[Any]]) -> None:
        self._registry = registry
        self._subscribers = subscribers
        self._workers: Mapping[int, Engine] = {}
        self._unwatch: Callable[[], None] | None = None

    async def on_start(self) -> None:
        ref = self.ref
        self._unwatch = self._registry.watch(lambda w: ref.send_nowait(_RegistryChanged(w)))
        self._publish(self._registry.snapshot())

    def on_stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()

    async def handle(self, message: Any) -> Any:
        if type(message) is GetWorkers:
            return self._workers
        if type(message) is _RegistryChanged:
            self._publish(message.workers)
            return None
        raise TypeError(f"the discovery actor does not handle {message!r}")

    def _publish(self, workers: Mapping[int, Engine]) -> None:
        self._workers = workers
        for subscriber in self._subscribers:
            subscriber.send_nowait(WorkersChanged(workers))
