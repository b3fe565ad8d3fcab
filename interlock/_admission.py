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
(tests/test_admission_fairness.py). That is the order among requests that compete for the
same workers.

Requests may have different candidate workers (their *pool*: a LoRA adapter is served by some
engines only, a gateway's subset hint names some, a request with a ``cache_salt`` leaves old
workers out). So the head does not block the queue: when a slot may have freed, a *pass* goes
over the waiters in the order above (a snapshot taken when it starts; requests that join
meanwhile are appended). One waiter at a time holds the baton and asks the Router, with
``reserved``: the workers every waiter before it in the pass found full (its
`WorkersFull.blocked_on`), which count as full for it too, so it can never take a worker an
earlier waiter could use; a waiter whose pool lies within those is passed over without asking
(so with one pool, a pass costs one ask however many wait). Served, refused or gone, the
waiter hands the baton to the next; served, it ends the pass instead when the Router says no
worker has room left (`Selection.room_left`): one ask per freed slot while everyone is busy.
Requests with the same pool (the same pool key: the adapter, the subset, whether salted)
share what the last of them learned, so a newcomer whose pool is known full joins without
asking.

A pass starts when a request ends (`wake`: a slot may be free), after a membership change
has reached the Router (`hold` until then: a newcomer must not take a just-joined worker
before the waiters ahead), and when the head waited `RECHECK` seconds without a turn (an
engine that reports its own queue, an OpenAI-compatible server's /metrics, or an ejection
that ended, makes room without any request of ours ending; those passes ask once per pool
again). A wake during a pass restarts it from the head once the current ask is answered: at
most one ask is in flight, so no later waiter's ask reaches the Router before an earlier
waiter's that could use the same freed slot.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator

import trio

from ._errors import Overloaded

#: Seconds the head waits for a turn before it starts a pass itself.
RECHECK = 0.5

#: The flow of a request that names none (GAIE's default fairness id).
DEFAULT_FLOW = "default-flow"


class _Pool:
    """What the waiters of one pool key know of their candidate workers."""

    __slots__ = ("blocked_on", "key", "seen", "waiting")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        #: The workers the last refusal named (`WorkersFull.blocked_on`); None: not asked.
        self.blocked_on: frozenset[int] | None = None
        #: The queue's `_refreshed` count when ``blocked_on`` was learned: from an older
        #: one, the pool may have changed since (a worker joined) and it is asked again.
        self.seen = -1
        #: Tickets of this key in the queue.
        self.waiting = 0


class _Ticket:
    __slots__ = ("event", "flow", "members", "passed", "pool", "priority", "queued", "reserved")

    def __init__(self, priority: int, flow: str, pool: _Pool) -> None:
        self.priority = priority
        self.flow = flow
        self.pool = pool
        #: Set when the ticket is given the baton.
        self.event = trio.Event()
        #: While it holds the baton: the workers to count as full when it asks.
        self.reserved: frozenset[int] | None = None
        #: With ``reserved``: the workers there were when it was worked out.
        self.members: frozenset[int] | None = None
        self.queued = True
        #: The number of the last pass that reached it: a late joiner the walk also meets
        #: is asked once.
        self.passed = -1

    @property
    def blocked_on(self) -> frozenset[int] | None:
        """The workers its last refusal (or one of a request with its pool key) named."""
        return self.pool.blocked_on


#: One priority's waiters: each flow's FIFO, the flows in the order of their turns.
_Ring = OrderedDict[str, deque[_Ticket]]


class AdmissionQueue:
    """The waiting requests, in the order they get slots, and the pass that gives them the
    baton. Owned by one `Pipeline`; every method runs in its trio run and never waits but
    `turn`."""

    def __init__(self, members: frozenset[int] | None = None) -> None:
        #: The workers the Router knows (None: not told), as `release` last said: a worker
        #: that joins while a waiter's ask is on its way counts as reserved for it.
        self._members = members
        #: Per priority with waiters: its ring of flows. A priority or a flow without waiters
        #: is dropped, so what is kept is bounded by the waiters.
        self._levels: dict[int, _Ring] = {}
        self._count = 0
        #: Per pool key with waiters: what they know.
        self._pools: dict[Hashable, _Pool] = {}
        #: The pass: who holds the baton, who comes next (the snapshot, then late joiners),
        #: and the workers held for the waiters before.
        self._holder: _Ticket | None = None
        self._order: Iterator[_Ticket] | None = None
        self._late: deque[_Ticket] = deque()
        self._reserved: frozenset[int] = frozenset()
        #: A slot may have freed while the holder asked: the pass starts again from the head.
        self._restart = False
        #: Counts passes (see `_Ticket.passed`).
        self._passes = 0
        #: Membership changes not yet known to the Router: no pass goes on meanwhile.
        self._held = 0
        #: Bumped when what waiters learned may be out of date (membership, `RECHECK`).
        self._refreshed = 0
        #: Bumped by every `wake` (see `join`'s ``since``).
        self.wakes = 0
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
        *,
        key: Hashable = None,
        blocked_on: frozenset[int] | None = None,
        since: int | None = None,
    ) -> _Ticket:
        """A place in the queue for a request of ``priority`` in ``flow`` (its fairness id),
        behind the waiters of its flow; `turn` then waits for its baton, and it must `leave`
        when done (served or not). ``key``: its pool key (requests with equal keys may go to
        the same workers). ``blocked_on`` and ``since``: the request asked the Router before
        joining, as `wakes` was ``since``, and was refused naming ``blocked_on``.

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
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(key)
        pool.waiting += 1
        if blocked_on:
            pool.blocked_on = blocked_on
            pool.seen = self._refreshed
        ticket = _Ticket(priority, flow, pool)
        fifo.append(ticket)
        self._count += 1
        self.high_water = max(self.high_water, self._count)
        if self._held:
            pass  # the pass from the head follows `release`
        elif self._holder is not None:
            self._late.append(ticket)
        elif since is not None and since != self.wakes:
            self._start()  # a slot may have freed while it asked
        elif self._known(pool):
            # Its pool is known full and nothing freed since the last pass (it would be
            # running): no ask can succeed.
            pass
        elif any(not self._known(p) for p in self._pools.values() if p is not pool):
            self._start()  # an earlier waiter may need the slot it would find
        else:
            # Every other waiter's pool is known full: try this one alone, with all of
            # theirs reserved.
            self._order = iter(())
            self._reserved = self._union()
            self._give(ticket)
        return ticket

    def leave(self, ticket: _Ticket, *, served: bool = False, room_left: bool = True) -> None:
        """Take ``ticket`` out: it got a slot (``served``: its flow's turn is used, and the
        flow goes to the back of the ring), or failed or was cancelled (its flow keeps its
        place, for its next waiter). If it held the baton, the next in the pass gets it,
        unless the Router said no worker has room left after it (``room_left`` False). A
        ticket already out is ignored."""
        if not ticket.queued:
            return
        if not room_left and ticket is self._holder:
            # Every worker is full: nobody behind would find room. A slot freed since the
            # Router said so has woken the queue (`_restart`), and is looked at from the head.
            self._order = iter(())
            self._late.clear()
        ticket.queued = False
        ring = self._levels[ticket.priority]
        fifo = ring[ticket.flow]
        if fifo[0] is ticket:
            fifo.popleft()
        else:
            fifo.remove(ticket)  # gave up while others of its flow were ahead
        self._count -= 1
        if not fifo:
            del ring[ticket.flow]
            if not ring:
                del self._levels[ticket.priority]
        elif served:
            ring.move_to_end(ticket.flow)
        pool = ticket.pool
        pool.waiting -= 1
        if not pool.waiting:
            del self._pools[pool.key]
        if ticket is self._holder:
            self._hand_on()
        if not self._count:
            self._end_pass()

    def refused(self, ticket: _Ticket, blocked_on: frozenset[int]) -> None:
        """``ticket``'s ask was refused (`WorkersFull`) naming ``blocked_on``: remember it
        (for every request of its pool key) and hand the baton on."""
        pool = ticket.pool
        if blocked_on:
            pool.blocked_on = blocked_on
            pool.seen = self._refreshed
        if ticket is self._holder:
            self._reserved |= blocked_on
            self._hand_on()

    async def turn(self, ticket: _Ticket) -> tuple[frozenset[int], frozenset[int] | None]:
        """Wait until ``ticket`` holds the baton; return the workers it must count as full
        when it asks (held for the waiters before it), and the workers there were when
        those were worked out (`Select.members`: any other joined since, and counts as full
        too; None: not known). Report the answer with `refused` or
        `leave`. The head that waited `RECHECK` seconds starts a pass (asking once per pool
        key again: something may have changed that nothing of ours reported)."""
        while (reserved := ticket.reserved) is None:
            with trio.move_on_after(RECHECK):
                await ticket.event.wait()
            if ticket.reserved is None and self._head() is ticket:
                self._refreshed += 1
                self.wake()
        ticket.event = trio.Event()
        return reserved, ticket.members

    def wake(self) -> None:
        """A slot may have freed: a pass starts from the head (after the ask in flight, if
        one is)."""
        self.wakes += 1
        if not self._count or self._held:
            return
        if self._holder is not None:
            self._restart = True
        else:
            self._start()

    def hold(self) -> None:
        """Membership changed and the Router does not know yet: no pass goes on (nor starts)
        until the matching `release`."""
        self._held += 1

    def release(self, members: frozenset[int] | None = None) -> None:
        """The Router knows of the change `hold` announced: a pass starts from the head,
        asking every pool key again (a worker may have joined any of them). ``members``:
        the workers there are now (the Router knows them once nothing is held)."""
        self._held -= 1
        if not self._held:
            if members is not None:
                self._members = members
            self._refreshed += 1
            self.wake()

    def _head(self) -> _Ticket | None:
        if not self._levels:
            return None
        ring = self._levels[max(self._levels)]
        return next(iter(ring.values()))[0]

    def is_next(self, ticket: _Ticket) -> bool:
        """Whether ``ticket`` is at the head (the first in service order)."""
        return self._head() is ticket

    def _known(self, pool: _Pool) -> bool:
        """Whether ``pool``'s workers are known (and still known) to be full."""
        return pool.blocked_on is not None and pool.seen == self._refreshed

    def _union(self) -> frozenset[int]:
        known = [p.blocked_on for p in self._pools.values() if p.blocked_on is not None]
        return frozenset().union(*known)

    def _service_order(self) -> Iterator[_Ticket]:
        """The waiters now, in the order `leave(served=True)` would serve them: priorities
        from the highest, and within one its flows' FIFOs in turn (each priority's snapshot
        taken when the walk reaches it)."""
        for priority in sorted(self._levels, reverse=True):
            ring = self._levels.get(priority)
            if ring is None:
                continue  # every waiter of it left since the walk began (no wake: no restart)
            fifos = [list(fifo) for fifo in ring.values()]
            if len(fifos) == 1:
                yield from fifos[0]
                continue
            for row in itertools.zip_longest(*fifos):
                for ticket in row:
                    if ticket is not None:
                        yield ticket

    def _start(self) -> None:
        """A pass from the head."""
        self._restart = False
        self._passes += 1
        self._reserved = frozenset()
        self._order = self._service_order()
        self._late.clear()
        self._advance()

    def _hand_on(self) -> None:
        holder = self._holder
        assert holder is not None
        holder.reserved = None
        self._holder = None
        if self._held:
            self._end_pass()
        elif self._restart:
            self._start()
        else:
            self._advance()

    def _advance(self) -> None:
        """Give the baton to the next waiter of the pass that may find room; end the pass
        when none may."""
        reserved = self._reserved
        pools = self._pools.values()
        if all(self._known(p) and p.blocked_on <= reserved for p in pools):  # type: ignore[operator]
            self._end_pass()  # every waiter needs a worker that is full
            return
        order = self._order
        late = self._late
        while True:
            ticket = next(order, None) if order is not None else None
            if ticket is None:
                if not late:
                    break
                ticket = late.popleft()
            if not ticket.queued or ticket.passed == self._passes:
                continue
            ticket.passed = self._passes
            pool = ticket.pool
            if self._known(pool) and pool.blocked_on <= reserved:  # type: ignore[operator]
                continue
            self._give(ticket)
            return
        self._end_pass()

    def _give(self, ticket: _Ticket) -> None:
        self._holder = ticket
        ticket.reserved = self._reserved
        ticket.members = self._members
        ticket.event.set()

    def _end_pass(self) -> None:
        self._order = None
        self._late.clear()
        self._reserved = frozenset()
        self._restart = False


def default_queue_limit(slots: list[int | None]) -> int:
    """``max_queued_requests`` when unset: a quarter of the workers' slots together (a worker
    without a known limit counting 64), and at least 8.

    A quarter keeps a queued request's wait under about a quarter of a request's time in a
    full batch, so admitted requests stay within twice the unloaded p99 at any load
    (benchmarks/bench_overload.py: half the slots gave 2.03x)."""
    total = sum(s if s else 64 for s in slots)
    return max(8, total // 4)
