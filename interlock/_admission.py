"""`AdmissionQueue`: requests waiting in the frontend for a worker slot.

When every worker that could take a new request is at its in-flight limit (the Router answers
`WorkersFull`), the request waits here instead of piling up in an engine's queue, where it
could no longer go to whichever worker frees first, nor be refused while refusing is cheap.
Waiters are served highest priority first (GAIE's InferenceObjective ordering); a negative
priority is sheddable: it never waits. Within a priority, the flows (GAIE's
``x-gateway-inference-fairness-id``; `DEFAULT_FLOW` when a request names none) take turns,
oldest first within a flow: one flow's burst cannot starve another. The queue is bounded:
past its limit, `Overloaded` (HTTP 429 with Retry-After) answers at once.

The turns are start-time fair queueing (Goyal et al., 1996) with a cost of one per request.
Each waiter gets a round, ``max(the priority's current round, its flow's previous round +
1)``, and waiters go by ``(-priority, round, arrival)``; the current round is the round of
the last waiter that left from the head. So while a request waits behind k of its own flow,
any other flow is served at most k + 2 times before it (k + 1 rounds, plus what it was owed
of the round under way), however many that flow queued (tests/test_admission_fairness.py).
A flow's previous round is remembered while it is ahead of the current round, so a flow
that empties and rejoins at once does not get a turn it already had. A waiter that leaves
without being served (cancelled) keeps its round from its flow's later waiters while the flow
still has some waiting; once the flow has none, it is back to the round after its last one
served.

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

#: The flow of a request that names none (GAIE's default fairness id).
DEFAULT_FLOW = "default-flow"


class _Ticket:
    __slots__ = ("event", "flow", "key")

    def __init__(self, key: tuple[int, int, int], flow: str) -> None:
        self.key = key
        self.flow = flow
        self.event = trio.Event()

    def __lt__(self, other: _Ticket) -> bool:
        return self.key < other.key


class AdmissionQueue:
    """The waiting requests, in the order they get slots. Owned by one `Pipeline`; every
    method runs in its trio run."""

    def __init__(self) -> None:
        self._waiting: list[_Ticket] = []
        self._order = itertools.count()
        #: Per priority: its current round, and its waiters' flows -> [the round after the
        #: flow's last waiter, how many of it wait, the round after its last one served]. A
        #: priority without waiters is dropped (rounds are relative), and so is a flow
        #: without waiters once the current round caught up with it.
        self._levels: dict[int, _Level] = {}
        #: Requests turned away since the pipeline opened (queue full, or sheddable).
        self.shed = 0
        #: The most requests that waited at once.
        self.high_water = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def join(self, priority: int, limit: int, flow: str = DEFAULT_FLOW) -> _Ticket:
        """A place in the queue for a request of ``priority`` in ``flow`` (its fairness id);
        `leave` it when done.

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
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = _Level()
        level.waiting += 1
        mine = level.flows.get(flow)
        if mine is None:
            mine = level.flows[flow] = [level.round, 0, level.round]
        start = max(level.round, mine[0])
        mine[0] = start + 1
        mine[1] += 1
        ticket = _Ticket((-priority, start, next(self._order)), flow)
        bisect.insort(self._waiting, ticket)
        self.high_water = max(self.high_water, len(self._waiting))
        return ticket

    def leave(self, ticket: _Ticket) -> None:
        """Take ``ticket`` out (it got a slot, failed or was cancelled). The caller then
        `wake`s the next in line: a slot this one did not use may be free."""
        index = bisect.bisect_left(self._waiting, ticket)
        if index >= len(self._waiting) or self._waiting[index] is not ticket:
            return
        del self._waiting[index]
        priority, start = -ticket.key[0], ticket.key[1]
        level = self._levels[priority]
        level.waiting -= 1
        if not level.waiting:
            del self._levels[priority]
            return
        mine = level.flows[ticket.flow]
        mine[1] -= 1
        if index == 0:
            mine[2] = start + 1
        if not mine[1]:
            # Rounds its cancelled waiters held are not held against its next request.
            mine[0] = mine[2]
        if index == 0 and start > level.round:
            # The queue reached this round: newcomers of idle flows join it, and the flows
            # with no waiters that it caught up with are forgotten.
            level.round = start
            for name, (after, waiting, _) in list(level.flows.items()):
                if not waiting and after <= start:
                    del level.flows[name]

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
        first (it must while anyone waits: the queue's order says who goes next)."""
        return bool(self._waiting)


class _Level:
    """One priority's turns: its current round and its flows."""

    __slots__ = ("flows", "round", "waiting")

    def __init__(self) -> None:
        self.round = 0
        self.waiting = 0
        self.flows: dict[str, list[int]] = {}


def default_queue_limit(slots: list[int | None]) -> int:
    """``max_queued_requests`` when unset: a quarter of the workers' slots together (a worker
    without a known limit counting 64), and at least 8.

    A quarter keeps a queued request's wait under about a quarter of a request's time in a
    full batch, so admitted requests stay within twice the unloaded p99 at any load
    (benchmarks/bench_overload.py: half the slots gave 2.03x)."""
    total = sum(s if s else 64 for s in slots)
    return max(8, total // 4)
