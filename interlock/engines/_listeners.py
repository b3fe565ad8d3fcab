"""`Listeners`: the subscribers to one worker's events (membership, KV events)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._protocol import EventListener


class Listeners:
    """Who to tell about a worker's events. `add` returns the function that unsubscribes;
    `publish` calls every listener in the order they subscribed (a listener may unsubscribe
    while it is being called)."""

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: list[EventListener] = []

    def add(self, listener: EventListener) -> Callable[[], None]:
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def publish(self, event: Any) -> None:
        for listener in list(self._listeners):
            listener(event)
