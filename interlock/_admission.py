"""`AdmissionQueue`: requests waiting in the frontend for a worker slot.

When every worker that could take a new request is at its in-flight limit (the Router answers
`WorkersFull`), the request waits here instead of piling up in an engine's queue, where it
could no longer go to whichever worker frees first, nor be refused while refusing is cheap.
Waiters are served highest priority first (GAIE's InferenceObjective ordering); a negative
priority is sheddable: it never waits. Within a priority, the flows (GAIE's
``x-gateway-inference-fairness-id``; `DEFAULT_FLOW` when a request names none) take turns,
oldest first within a flow: one flow's burst cannot starve another. The queue is bounded:
past its limit, `Overloaded` (HTTP 429 with Retry-After) answers at once.

Each priority keeps one FIFO per flow, and its flows in a ring: the next to go is the oldest
waiter of the flow at the front of the ring. When a waiter is served, its flow goes to the
back of the ring; a flow whose FIFO empties leaves the ring and is forgotten, and one that
comes back joins at the back. So a waiter that gives up (cancelled) only leaves its FIFO: its
flow's turn is not used, and the flow's next waiter takes it. While a request waits, its flow
is served once (the request itself last) for each request of its flow served before it, and
between two turns of its flow every other flow of its priority is served at most once: with
k requests of its own flow served before it (at most those ahead of it when it joined), no
other flow is served more than k + 1 times before it, however many that flow queued
(tests/test_admission_fairness.py).

A waiter is woken when a request ends (a slot may be free), and asks the Router again; it
also asks every `RECHECK` seconds, since a worker that joins, or an engine that reports its own
queue (an OpenAI-compatible server's /metrics), makes room without any request of ours ending.

Requests do not all compete for the same workers: a LoRA adapter's request may go only to the
engines that serve it, a gateway's request only to its subset. So the order above binds among
requests that wait for the same workers, and no further: each waiter remembers the workers it
waits for (its candidates, all full when it last asked: `WorkersFull.workers`), and those are
reserved for it. A request behind it, or a newcomer, may take a slot only on a worker no one
ahead of it waits for (`reservation_for`, `newcomer_reservation`: the Router counts those as
full), so one adapter's full engine holds back no base-model request that other engines have
room for, and a waiter is never passed on a worker it waits for: FIFO among rivals, no
starvation. When the head finds no room, the first waiter behind it that waits for a worker no
one ahead does is woken too (`wake_behind`). A waiter whose workers are unknown (None)
reserves them all.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Iterator

import trio

from ._errors import Overloaded

#: Seconds between a waiter's own checks when nothing woke it.
RECHECK = 0.5

#: The flow of a request that names none (GAIE's default fairness id).
DEFAULT_FLOW = "default-flow"


class _Ticket:
    __slots__ = ("event", "flow", "priority", "waits_for")

    def __init__(self, priority: int, flow: str, waits_for: frozenset[int] | None) -> None:
        self.priority = priority
        self.flow = flow
        self.event = trio.Event()
        #: The workers it waits for (None: unknown, every worker).
        self.waits_for = waits_for


#: One priority's waiters: each flow's FIFO, the flows in the order of their turns.
_Ring = OrderedDict[str, deque[_Ticket]]


class AdmissionQueue:
    """The waiting requests, in the order they get slots. Owned by one `Pipeline`; every
    method runs in its trio run."""

    def __init__(self) -> None:
        #: Per priority with waiters: its ring of flows. A priority or a flow without waiters
        #: is dropped, so what is kept is bounded by the waiters.
        self._levels: dict[int, _Ring] = {}
        self._count = 0
        #: How many waiters wait for each worker, and how many for unknown workers (all).
        self._waited: Counter[int] = Counter()
        self._unknown = 0
        #: Requests turned away since the pipeline opened (queue full, or sheddable).
        self.shed = 0
        #: The most requests that waited at once.
        self.high_water = 0

    def __len__(self) -> int:
        return self._count

    def join(
        self,
        priority: int,
        limit: int,
        flow: str = DEFAULT_FLOW,
        waits_for: frozenset[int] | None = None,
    ) -> _Ticket:
        """A place in the queue for a request of ``priority`` in ``flow`` (its fairness id),
        behind the waiters of its flow, waiting for the workers ``waits_for`` (None: any);
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
        if self._count >= limit:
            self.shed += 1
            raise Overloaded(
                f"every worker is at its in-flight limit and {self._count} requests "
                f"wait already (max_queued_requests={limit}); retry later"
            )
        ring = self._levels.get(priority)
        if ring is None:
            ring = self._levels[priority] = OrderedDict()
        fifo = ring.get(flow)
        if fifo is None:
            fifo = ring[flow] = deque()  # a new flow's turn comes after every waiting flow's
        ticket = _Ticket(priority, flow, waits_for)
        fifo.append(ticket)
        self._reserve(ticket, 1)
        self._count += 1
        self.high_water = max(self.high_water, self._count)
        return ticket

    def leave(self, ticket: _Ticket, *, served: bool = False) -> None:
        """Take ``ticket`` out: it got a slot (``served``: its flow's turn is used, and the
        flow goes to the back of the ring), or failed or was cancelled (its flow keeps its
        place, for its next waiter). The caller then `wake`s the next in line: a slot this
        one did not use may be free. A ticket already out is ignored."""
        ring = self._levels.get(ticket.priority)
        fifo = ring.get(ticket.flow) if ring is not None else None
        if ring is None or fifo is None:
            return
        if fifo and fifo[0] is ticket:
            fifo.popleft()
        else:
            try:
                fifo.remove(ticket)  # gave up while others of its flow were ahead
            except ValueError:
                return
        self._count -= 1
        self._reserve(ticket, -1)
        if not fifo:
            del ring[ticket.flow]
            if not ring:
                del self._levels[ticket.priority]
        elif served:
            ring.move_to_end(ticket.flow)

    def refused(self, ticket: _Ticket, waits_for: frozenset[int]) -> None:
        """``ticket`` asked and found no room: it waits for ``waits_for`` now."""
        self._reserve(ticket, -1)
        ticket.waits_for = waits_for
        self._reserve(ticket, 1)

    def _reserve(self, ticket: _Ticket, sign: int) -> None:
        if ticket.waits_for is None:
            self._unknown += sign
            return
        waited = self._waited
        for worker in ticket.waits_for:
            waited[worker] += sign
            if not waited[worker]:
                del waited[worker]

    def reserved(self) -> frozenset[int] | None:
        """The workers some waiter waits for (a newcomer may not take them); None: all."""
        return None if self._unknown else frozenset(self._waited)

    def newcomer_reservation(self, workers: Iterable[int]) -> frozenset[int] | None:
        """What a request just arriving must leave to the waiters (`Select.reserved`: it may
        take a slot on any other worker), or None when it must join the queue without
        asking: they wait for every one of ``workers`` (the registered ones), or nobody
        waits (then it asks with no reservation)."""
        if not self._count:
            return frozenset()
        reserved = None if self._unknown else self._waited.keys()
        if reserved is None or reserved >= set(workers):
            return None
        return frozenset(reserved)

    def reservation_for(self, ticket: _Ticket) -> frozenset[int] | None:
        """What ``ticket``, woken, must leave to the waiters ahead of it when it asks for a
        slot (`Select.reserved`; empty for the head), or None when it should not ask: every
        worker it waits for is one someone ahead waits for too (its rivals go first)."""
        if self._head() is ticket:
            return frozenset()
        found: set[int] = set()
        for other in self._in_order():
            if other is ticket:
                break
            if other.waits_for is None:
                return None
            found |= other.waits_for
        mine = ticket.waits_for
        if mine is None or found.issuperset(mine):
            return None
        return frozenset(found)

    def wake_behind(self, ticket: _Ticket) -> None:
        """``ticket`` found no room: wake the first waiter behind it that waits for a worker
        no one ahead of it waits for (it may find room there)."""
        ahead: set[int] = set()
        behind = False
        for other in self._in_order():
            waits_for = other.waits_for
            if waits_for is None:
                return  # it waits for every worker: no one behind it may pass it
            if behind and not waits_for <= ahead:
                other.event.set()
                return
            behind = behind or other is ticket
            ahead |= waits_for

    def _in_order(self) -> Iterator[_Ticket]:
        """The waiters in the order they would be served: priorities high to low; within
        one, the flows' heads in ring order, then their second waiters, and so on."""
        for priority in sorted(self._levels, reverse=True):
            fifos = list(self._levels[priority].values())
            for depth in range(max(len(f) for f in fifos)):
                for fifo in fifos:
                    if depth < len(fifo):
                        yield fifo[depth]

    def _head(self) -> _Ticket | None:
        if not self._levels:
            return None
        ring = self._levels[max(self._levels)]
        return next(iter(ring.values()))[0]

    def is_next(self, ticket: _Ticket) -> bool:
        """Whether ``ticket`` is at the head (the only waiter allowed to take a slot)."""
        return self._head() is ticket

    async def wait_turn(self, ticket: _Ticket) -> None:
        """Block until ``ticket`` is woken or `RECHECK` seconds passed."""
        with trio.move_on_after(RECHECK):
            await ticket.event.wait()
        ticket.event = trio.Event()

    def wake(self) -> None:
        """A slot may have freed: wake the head waiter."""
        head = self._head()
        if head is not None:
            head.event.set()


def default_queue_limit(slots: list[int | None]) -> int:
    """``max_queued_requests`` when unset: a quarter of the workers' slots together (a worker
    without a known limit counting 64), and at least 8.

    A quarter keeps a queued request's wait under about a quarter of a request's time in a
    full batch, so admitted requests stay within twice the unloaded p99 at any load
    (benchmarks/bench_overload.py: half the slots gave 2.03x)."""
    total = sum(s if s else 64 for s in slots)
    return max(8, total // 4)
