"""A one-for-one supervisor: restarts a crashed actor with fresh state, within limits."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ._runtime import Actor, ActorRef, fail_pending, open_mailbox, run_actor


@attrs.frozen
class RestartPolicy:
    """How a supervisor treats a crashing child.

    At most ``max_restarts`` restarts within ``window`` seconds; the first waits ``backoff``
    seconds and each further one in the window twice as long (capped at ``max_backoff``). One
    more crash inside the window and the supervisor gives up: the child's original error
    propagates out of the supervisor's nursery. Failing to make the replacement actor counts
    as a crash too; failing to make the first one escalates at once.
    """

    max_restarts: int = 5
    window: float = 10.0
    backoff: float = 0.01
    max_backoff: float = 1.0


@attrs.frozen
class RestartEvent:
    """A restart the supervisor performed (or refused: ``gave_up``)."""

    actor: str
    time: float
    error: BaseException
    restarts_in_window: int
    gave_up: bool = False


class Supervisor:
    """Runs actors in a nursery and restarts each one that crashes, one-for-one.

    Create with `open_supervisor`. Time comes from trio's clock, so back-off runs in virtual
    time under `trio.testing.MockClock`.
    """

    def __init__(self, nursery: trio.Nursery, policy: RestartPolicy) -> None:
        self._nursery = nursery
        self.policy = policy
        self.events: list[RestartEvent] = []
        self._mailboxes: list[trio.MemoryReceiveChannel[Any]] = []

    def start_actor(self, factory: Callable[[], Actor], name: str | None = None) -> ActorRef[Any]:
        """Start the actor ``factory()`` makes, and make a fresh one after every crash.

        Returns its ref at once; messages sent before it has started wait in its mailbox.
        """
        actor_name = name or getattr(factory, "name", None) or "actor"
        ref, mailbox = open_mailbox(actor_name)
        self._mailboxes.append(mailbox)
        self._nursery.start_soon(self._supervise, factory, ref, mailbox, name=actor_name)
        return ref

    def restarts(self, actor: str) -> int:
        """How many times ``actor`` has been restarted."""
        return sum(1 for e in self.events if e.actor == actor and not e.gave_up)

    async def _supervise(
        self,
        factory: Callable[[], Actor],
        ref: ActorRef[Any],
        mailbox: trio.MemoryReceiveChannel[Any],
    ) -> None:
        recent: collections.deque[float] = collections.deque()
        try:
            # A factory that fails on the first start is a setup error: it escalates at once.
            actor = factory()
            while True:
                actor.ref = ref
                try:
                    await run_actor(actor, mailbox)
                    return
                except Exception as exc:
                    await self._after_crash(ref, recent, exc)
                while True:
                    # Failing to make the replacement is one more crash of the same actor,
                    # under the same budget and back-off.
                    try:
                        actor = factory()
                        break
                    except Exception as exc:
                        await self._after_crash(ref, recent, exc)
        finally:
            fail_pending(mailbox, ref.name)
            mailbox.close()

    async def _after_crash(
        self, ref: ActorRef[Any], recent: collections.deque[float], exc: Exception
    ) -> None:
        """Record a crash of ``ref``'s actor and wait out its back-off; re-raises ``exc`` when
        it is one crash too many in the window."""
        now = trio.current_time()
        while recent and now - recent[0] > self.policy.window:
            recent.popleft()
        recent.append(now)
        gave_up = len(recent) > self.policy.max_restarts
        self.events.append(RestartEvent(ref.name, now, exc, len(recent), gave_up))
        if gave_up:
            raise exc
        delay = min(self.policy.backoff * 2 ** (len(recent) - 1), self.policy.max_backoff)
        await trio.sleep(delay)
