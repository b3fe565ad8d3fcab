"""`EmbeddedRegistry`: worker membership kept in-process (etcd discovery feeds it too).

The registry is the source of truth, as etcd would be: the Discovery actor watches it and can
re-read it after a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ..engines import Engine
from ..wire import WorkerChanged, WorkerJoined, WorkerLeft

Watcher = Callable[[Mapping[int, Engine]], None]


class EmbeddedRegistry:
    """Which engines are registered, by instance id, with change notification.

    An engine that publishes `WorkerLeft` / `WorkerJoined` (a `MockEngine` that crashes,
    leaves or rejoins) is removed and re-added automatically; one that publishes
    `WorkerChanged` (it serves other LoRA adapters now) is announced to the watchers again.
    """

    def __init__(self) -> None:
        self._known: dict[int, Engine] = {}
        self._present: dict[int, Engine] = {}
        self._watchers: list[Watcher] = []
        self._removers: dict[int, Callable[[], None]] = {}

    def register(self, engine: Engine) -> None:
        """Add ``engine``; it becomes routable at once.

        Raises:
            ValueError: another engine already has its instance id.
        """
        worker_id = engine.instance_id
        existing = self._known.get(worker_id)
        if existing is not None and existing is not engine:
            raise ValueError(
                f"worker id {worker_id} is already registered to {existing!r}; "
                "every worker needs its own instance_id"
            )
        self._known[worker_id] = engine
        if worker_id not in self._removers:

            def on_event(event: Any, _engine: Engine = engine) -> None:
                self._on_event(_engine, event)

            self._removers[worker_id] = engine.add_listener(on_event)
        if getattr(engine, "registered", True):
            self._present[worker_id] = engine
            self._notify()

    def deregister(self, worker_id: int) -> None:
        """Remove a worker for good (no-op when unknown). Watchers are told even when it
        was away (not routable): whoever remembers away workers learns it is gone."""
        known = self._known.pop(worker_id, None)
        remover = self._removers.pop(worker_id, None)
        if remover is not None:
            remover()
        self._present.pop(worker_id, None)
        if known is not None:
            self._notify()

    def get(self, worker_id: int) -> Engine | None:
        """The engine registered under ``worker_id``, present or not (None when none is)."""
        return self._known.get(worker_id)

    def snapshot(self) -> Mapping[int, Engine]:
        """The routable workers now (a read-only copy)."""
        return MappingProxyType(dict(self._present))

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher(snapshot)`` after every change; returns a function that stops it."""
        self._watchers.append(watcher)

        def stop() -> None:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

        return stop

    def _on_event(self, engine: Engine, event: Any) -> None:
        worker_id = engine.instance_id
        if isinstance(event, WorkerLeft):
            if self._present.pop(worker_id, None) is not None:
                self._notify()
        elif isinstance(event, WorkerJoined) and worker_id in self._known:
            self._present[worker_id] = engine
            self._notify()
        elif isinstance(event, WorkerChanged) and worker_id in self._present:
            # The pools it is in changed: the admission queue's waiters must learn of it
            # (`Pipeline`'s watcher), or one behind may take it from one ahead.
            self._notify()

    def _notify(self) -> None:
        snapshot = self.snapshot()
        for watcher in list(self._watchers):
            watcher(snapshot)
