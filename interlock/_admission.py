"""`AdmissionQueue`: requests waiting in the frontend for a worker slot.

When every worker that could take a new request is at its in-flight limit (the Router answers
`WorkersFull`), the request waits here instead of piling up in an engine's queue, where it
could no longer go to whichever worker frees first, nor be refused while refusing is cheap.
Waiters are served highest priority first, then oldest first (GAIE's InferenceObjective
ordering); a negative priority is sheddable: it never waits. The queue is bounded: past its
limit, `Overloaded` (HTTP 429 with Retry-After) answers at once.

A waiter is woken when a request ends (a slot may be free), and asks the Router again; it
also asks every `RECHECK` seconds, since a worker that joins, or an engine that reports its own
queue (an OpenAI-compatible server's /metrics), makes room without any request of ours ending.
"""

from __future__ import annotations

import bisect
import itertools

import trio

from ._errors import Overloaded

#: Seconds between a waiter's own checks when nothing woke it.
RECHECK = 0.5


class _Ticket:
    __slots__ = ("event", "key")

    def __init__(self, key: tuple[int, int]) -> None:
        self.key = key
        self.event = trio.Event()

    def __lt__(self, other: _Ticket) -> bool:
        return self.key < other.key


class AdmissionQueue:
    """The waiting requests, in the order they get slots. Owned by one `Pipeline`; every
    method runs in its trio run."""

    def __init__(self) -> None:
        self._waiting: list[_Ticket] = []
        self._order = itertools.count()
        #: Requests turned away since the pipeline opened (queue full, or sheddable).
        self.shed = 0
        #: The most requests that waited at once.
        self.high_water = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def join(self, priority: int, limit: int) -> _Ticket:
        """A place in the queue for a request of ``priority``; `leave` it when done.

        Raises:
            Overloaded: ``limit`` requests wait already, or ``priority`` is negative.
        """
        if priority < 0:
            self.shed += 1
            raise Overloaded(
                f"every worker is at its in-flight limit and this request is sheddable "
                f"(priority {priority} < 0); retry later"
            )
        if len(self._waiting) >= limit:
            self.shed += 1
            raise Overloaded(
                f"every worker is at its in-flight limit and {len(self._waiting)} requests "
                f"wait already (max_queued_requests={limit}); retry later"
            )
        ticket = _Ticket((-priority, next(self._order)))
        bisect.insort(self._waiting, ticket)
        self.high_water = max(self.high_water, len(self._waiting))
        return ticket

    def leave(self, ticket: _Ticket) -> None:
        """Take ``ticket`` out (it got a slot, failed or was cancelled). The caller then
        `wake`s the next in line: a slot this one did not use may be free."""
        index = bisect.bisect_left(self._waiting, ticket)
        if index < len(self._waiting) and self._waiting[index] is ticket:
            del self._waiting[index]

    def is_next(self, ticket: _Ticket) -> bool:
        """Whether ``ticket`` is at the head (the only waiter allowed to take a slot)."""
        return bool(self._waiting) and self._waiting[0] is ticket

    async def wait_turn(self, ticket: _Ticket) -> None:
        """Block until ``ticket`` is woken or `RECHECK` seconds passed."""
        with trio.move_on_after(RECHECK):
            await ticket.event.wait()
        ticket.event = trio.Event()

    def wake(self) -> None:
        """A slot may have freed: wake the head waiter."""
        if self._waiting:
            self._waiting[0].event.set()

    def newcomer_must_wait(self) -> bool:
        """Whether a request just arriving must queue behind others rather than take a slot
        first (it must while anyone waits: first come, first served within a priority)."""
        return bool(self._waiting)


def default_queue_limit(slots: list[int | None]) -> int:
    """``max_queued_requests`` when unset: a quarter of the workers' slots together (a worker
    without a known limit counting 64), and at least 8.

    A quarter keeps a queued request's wait under about a quarter of a request's time in a
    full batch, so admitted requests stay within twice the unloaded p99 at any load
    (benchmarks/bench_overload.py: half the slots gave 2.03x)."""
    total = sum(s if s else 64 for s in slots)
    return max(8, total // 4)
