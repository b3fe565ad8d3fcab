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
workers out). So the head does not block the queue: when a slot frees, a *pass* goes over the
waiters in the order above (each priority's snapshot taken when the pass reaches it; requests
that join meanwhile are appended). One waiter at a time holds the baton and asks the Router,
with ``reserved``: the workers every waiter before it in the pass needs and is known to find
full (its `WorkersFull.blocked_on`), which count as full for it too, so it can never take a
worker an earlier waiter could use; and with ``members``, the workers there were then, each
with the LoRA adapters it served (one that joins, or starts or stops serving an adapter, while
the ask is on its way counts as reserved too: the waiters ahead were not asked about it; the
Router reads adapters as they are when the ask arrives). Served, refused or gone, the waiter
hands the baton to the next; served, it ends the pass instead when the Router says no worker
has room left (`Selection.room_left`). Requests with the same pool (the same pool key: the
adapter, the subset, whether salted) share what the last of them learned.

What a pass asks: a pool is *dirty* when a slot may have freed on one of the workers its last
refusal named (`wake` says which workers freed, and an index from each worker to the pools
that named it marks them), or when nothing is known of it (new, or what it knew is out of
date); otherwise it is known full, and its waiters are passed over without an ask (their
workers reserved for them). A pass asks only dirty pools, in service order, and none whose
workers are all reserved already. A refusal makes its pool clean, unless one of its workers
freed while it asked (the pass then starts again from the head); so does a served ask after
which no worker has room. So a freed slot costs about one ask, whether one pool waits or
many (the pool of the freed worker), not one per waiting pool.

A pass starts when a slot frees (`wake`; a request that never held one, a shed 429 or one that
gave up in the queue with no ask on its way, wakes nobody), when a request of an unknown or
dirty pool joins, after a membership change has reached the Router (`hold` until then: a
newcomer must not take a just-joined worker before the waiters ahead; an engine that starts or
stops serving an adapter is one, announced as `WorkerChanged`), and every `RECHECK` seconds
while anyone waits (`recheck`, a timer of the queue's own, which no pass or wake puts off: an
engine that reports its own queue, an OpenAI-compatible server's /metrics, makes room without
any request of ours ending). The last two make every pool unknown: each is asked once again.
An ejection ends with no message either, but a refusal says when each ejected candidate comes
back (`WorkersFull.returns`), and the same timer then wakes that worker (`wake_at`), as a slot
that frees there would: its waiters have it at once. A refusal names the ejected candidates
too, so a worker whose ejection ends stays held for the waiters refused over it, not taken by
one behind; a request whose every candidate is ejected uses them anyway, held or not, as they
are held only for when their ejection ends. A slot that frees during a pass, on a worker a
pool's refusal named (or on any worker, when the pass would end with a pool nothing is known of
still to ask), restarts the pass from the head once the current ask is answered: at most one
ask is in flight, so no later waiter's ask reaches the Router before an earlier waiter's that
could use the same freed slot.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from typing import TYPE_CHECKING

import trio

from ._errors import Overloaded

if TYPE_CHECKING:
    from .actors._adapters import Members

#: Seconds between two refreshes while anyone waits (`AdmissionQueue.recheck`).
RECHECK = 0.5

#: The flow of a request that names none (GAIE's default fairness id).
DEFAULT_FLOW = "default-flow"


class _Pool:
    """What the waiters of one pool key know of their candidate workers."""

    __slots__ = ("blocked_on", "key", "passed", "seen", "waiting")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        #: The workers the last refusal named (`WorkersFull.blocked_on`); None: not asked.
        self.blocked_on: frozenset[int] | None = None
        #: The queue's `_refreshed` count when ``blocked_on`` was learned: from an older
        #: one, the pool may have changed since (a worker joined) and it is asked again.
        self.seen = -1
        #: The last pass that reserved ``blocked_on`` (once per pass is enough).
        self.passed = -1
        #: Tickets of this key in the queue.
        self.waiting = 0


class _Ticket:
    __slots__ = (
        "asked_at",
        "event",
        "flow",
        "members",
        "passed",
        "pool",
        "priority",
        "queued",
        "refreshed_at",
        "reserved",
    )

    def __init__(self, priority: int, flow: str, pool: _Pool) -> None:
        self.priority = priority
        self.flow = flow
        self.pool = pool
        #: Set when the ticket is given the baton.
        self.event = trio.Event()
        #: While it holds the baton: the workers to count as full when it asks.
        self.reserved: frozenset[int] | None = None
        #: With ``reserved``: the workers there were when it was worked out.
        self.members: Members | None = None
        #: The queue's `wakes` and `_refreshed` when it was given the baton: what its answer
        #: knows of (a slot freed later may not be in it).
        self.asked_at = -1
        self.refreshed_at = -1
        self.queued = True
        #: The number of the last pass that reached it: a late joiner the walk also meets
        #: is asked once.
        self.passed = -1


#: One priority's waiters: each flow's FIFO, the flows in the order of their turns.
_Ring = OrderedDict[str, deque[_Ticket]]


class AdmissionQueue:
    """The waiting requests, in the order they get slots, and the pass that gives them the
    baton. Owned by one `Pipeline`; every method runs in its trio run and never waits but
    `turn` and `recheck`."""

    def __init__(self, members: Callable[[], Members] | None = None) -> None:
        #: Reads `Members` now (None: the Router is not told them, and checks none).
        self._read_members = members
        #: The workers the Router knows, as read at the last refresh with nothing held: one
        #: that joins, or changes what it serves, while a waiter's ask is on its way counts
        #: as reserved for it.
        self._members = members() if members is not None else None
        #: Per priority with waiters: its ring of flows. A priority or a flow without waiters
        #: is dropped, so what is kept is bounded by the waiters.
        self._levels: dict[int, _Ring] = {}
        self._count = 0
        #: Per pool key with waiters: what they know.
        self._pools: dict[Hashable, _Pool] = {}
        #: The pools a pass must ask (see the module's docstring): unknown, or a worker their
        #: last refusal named may have freed since.
        self._dirty: set[_Pool] = set()
        #: Per worker: the pools whose ``blocked_on`` names it (a free marks them dirty).
        self._naming: dict[int, set[_Pool]] = {}
        #: Per worker: `wakes` when it last freed a slot, since `_all_at` (a refusal asked
        #: before then may not have seen the slot).
        self._freed_at: dict[int, int] = {}
        #: `wakes` when any worker may last have freed a slot (a free of unknown workers, a
        #: refresh).
        self._all_at = 0
        #: The pass: who holds the baton, who comes next (the walk, then late joiners),
        #: and the workers held for the waiters before.
        self._holder: _Ticket | None = None
        self._order: Iterator[_Ticket] | None = None
        self._late: deque[_Ticket] = deque()
        self._reserved: set[int] = set()
        #: A pool was marked dirty while the holder asked: the pass starts again from the
        #: head, where an earlier waiter may need the slot.
        self._restart = False
        #: Counts passes (see `_Ticket.passed`).
        self._passes = 0
        #: Membership changes not yet known to the Router: no pass goes on meanwhile.
        self._held = 0
        #: Bumped when what waiters learned may be out of date (membership, `RECHECK`).
        self._refreshed = 0
        #: Set when the first request joins an empty queue (`recheck` waits for it).
        self._someone: trio.Event | None = None
        #: Per worker: when `wake_at` wakes its waiters (an ejection a refusal named ends).
        self._wake_times: dict[int, float] = {}
        #: While `recheck` sleeps: its sleep, which `wake_at` ends sooner.
        self._timer: trio.CancelScope | None = None
        #: Bumped by every `wake` that frees something (see `join`'s ``since``).
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
            self._dirty.add(pool)  # nothing known of it yet
        pool.waiting += 1
        if blocked_on and since is not None and self._all_at <= since:
            # (Asked before a refresh: what it learned may be out of date, so not kept.)
            self._learn(pool, blocked_on, self._refreshed, since)
        ticket = _Ticket(priority, flow, pool)
        fifo.append(ticket)
        if not self._count and self._someone is not None:
            self._someone.set()
        self._count += 1
        self.high_water = max(self.high_water, self._count)
        if self._held:
            pass  # the pass from the head follows `release`
        elif self._holder is not None:
            self._late.append(ticket)
        elif pool in self._dirty:
            # Unknown, or a slot freed while it asked: it may find room, which an earlier
            # waiter may need first.
            self._start()
        return ticket

    def leave(self, ticket: _Ticket, *, served: bool = False, room_left: bool = True) -> None:
        """Take ``ticket`` out: it got a slot (``served``: its flow's turn is used, and the
        flow goes to the back of the ring), or failed or was cancelled (its flow keeps its
        place, for its next waiter). If it held the baton, the next in the pass gets it,
        unless the Router said no worker has room left after it (``room_left`` False). A
        ticket already out is ignored."""
        if not ticket.queued:
            return
        holder = ticket is self._holder
        if holder and served and not room_left:
            # Every worker is full: nobody behind would find room, and every pool whose
            # workers are known is full, unless a slot freed since the Router said so (the
            # pass then starts again from the head).
            self._order = None
            self._late.clear()
            freed = self.wakes > ticket.asked_at
            for pool in list(self._dirty):
                blocked_on = pool.blocked_on
                if blocked_on is None or pool.seen != ticket.refreshed_at:
                    # Its workers are not known: the slot that freed since (if one did)
                    # may be one of them, and no refusal names it, so `wake` marked
                    # nothing dirty for it.
                    self._restart = self._restart or freed
                elif self._freed_since(blocked_on, ticket.asked_at):
                    self._restart = True
                else:
                    self._dirty.discard(pool)
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
            self._dirty.discard(pool)
            self._unname(pool)
        if holder:
            self._hand_on()
        if not self._count:
            self._end_pass()
            self._wake_times.clear()  # nobody to wake: a newcomer asks afresh

    def refused(self, ticket: _Ticket, blocked_on: frozenset[int]) -> None:
        """``ticket``'s ask was refused (`WorkersFull`) naming ``blocked_on``: remember it
        (for every request of its pool key) and hand the baton on."""
        pool = ticket.pool
        if blocked_on and ticket.queued:
            self._learn(pool, blocked_on, ticket.refreshed_at, ticket.asked_at)
            if pool in self._dirty and pool.seen == self._refreshed:
                # One of its workers freed while it asked: from the head again, where it
                # (or an earlier waiter) may take that slot.
                self._restart = True
        if ticket is self._holder:
            self._reserved |= blocked_on
            pool.passed = self._passes
            self._hand_on()

    async def turn(self, ticket: _Ticket) -> tuple[frozenset[int], Members | None]:
        """Wait until ``ticket`` holds the baton; return the workers it must count as full
        when it asks (held for the waiters before it), and the workers there were when
        those were worked out, with what each served (`Select.members`: any other joined
        since, or changed what it serves, and counts as full too; None: not known). Report
        the answer with `refused` or `leave`."""
        while (reserved := ticket.reserved) is None:
            await ticket.event.wait()
            ticket.event = trio.Event()
        return reserved, ticket.members

    def wake(self, freed: Collection[int] | None = None) -> None:
        """Slots may have freed on the workers ``freed`` (None: on any): the pools that
        named one are dirty, and a pass starts from the head (after the ask in flight, if
        one is). An empty ``freed`` (a request that held no slot) does nothing."""
        if freed is not None and not freed:
            return
        self.wakes += 1
        if freed is None:
            dirtied = self._mark_all()
        else:
            dirtied = False
            naming = self._naming
            for worker_id in freed:
                self._freed_at[worker_id] = self.wakes
                pools = naming.get(worker_id)
                if pools:
                    self._dirty |= pools
                    dirtied = True
        if not self._count or self._held:
            return
        if self._holder is not None:
            self._restart = self._restart or dirtied
        elif self._dirty:
            self._start()

    def hold(self) -> None:
        """Membership changed and the Router does not know yet: no pass goes on (nor starts)
        until the matching `release`."""
        self._held += 1

    def release(self) -> None:
        """The Router knows of the change `hold` announced: a pass starts from the head,
        asking every pool key again (a worker may have joined any of them)."""
        self._held -= 1
        if not self._held:
            self._refresh()

    def wake_at(self, times: Mapping[int, float]) -> None:
        """A slot may free on each worker of ``times`` at its time (trio's clock: a refusal
        named it ejected until then, and an ejection ends with no message): `wake` it then.
        Kept while anyone waits (the time last told for a worker replaces the one before: the
        Router's ejection ends only move later)."""
        if not times or not self._count:
            return
        self._wake_times.update(times)
        timer = self._timer
        if timer is not None:
            timer.deadline = min(timer.deadline, min(times.values()))

    async def recheck(self) -> None:
        """Every `RECHECK` seconds while anyone waits, ask every pool key again (room that
        nothing of ours reported: see the module's docstring); meanwhile, wake the workers
        `wake_at` named at their times. Runs until cancelled (the pipeline's nursery runs
        it)."""
        while True:
            if not self._count:
                self._someone = trio.Event()
                await self._someone.wait()
            due = trio.current_time() + RECHECK
            while trio.current_time() < due:
                times = self._wake_times
                deadline = min(times.values(), default=due)
                with trio.CancelScope(deadline=min(due, deadline)) as self._timer:
                    await trio.sleep_forever()
                self._timer = None
                now = trio.current_time()
                if ended := [w for w, at in times.items() if at <= now]:
                    for worker_id in ended:
                        del times[worker_id]
                    self.wake(ended)
            if self._count:
                self._refresh()

    def _refresh(self) -> None:
        if not self._held and self._read_members is not None:
            # The Router knows them once nothing is held. Read at a `RECHECK` too: an engine
            # whose adapters change without a `WorkerChanged` would else stay reserved for
            # every queued ask until the next membership change.
            self._members = self._read_members()
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

    def _learn(self, pool: _Pool, blocked_on: frozenset[int], seen: int, asked_at: int) -> None:
        """``pool``'s workers, all full when asked as `wakes` was ``asked_at``: it is clean
        unless one of them freed since."""
        old = pool.blocked_on
        if old != blocked_on:
            self._unname(pool)
            naming = self._naming
            for worker_id in blocked_on:
                pools = naming.get(worker_id)
                if pools is None:
                    naming[worker_id] = {pool}
                else:
                    pools.add(pool)
            pool.blocked_on = blocked_on
        pool.seen = seen
        if seen != self._refreshed or self._freed_since(blocked_on, asked_at):
            self._dirty.add(pool)
        else:
            self._dirty.discard(pool)

    def _unname(self, pool: _Pool) -> None:
        if pool.blocked_on is None:
            return
        naming = self._naming
        for worker_id in pool.blocked_on:
            pools = naming.get(worker_id)
            if pools is not None:
                pools.discard(pool)
                if not pools:
                    del naming[worker_id]

    def _freed_since(self, workers: frozenset[int], at: int) -> bool:
        if self._all_at > at:
            return True
        freed = self._freed_at
        return any(freed.get(w, -1) > at for w in workers)

    def _mark_all(self) -> bool:
        """Any worker may have freed a slot: every pool is dirty. Whether there is one."""
        self._all_at = self.wakes
        self._freed_at.clear()  # (older frees are covered by _all_at)
        self._dirty.update(self._pools.values())
        return bool(self._pools)

    def _service_order(self) -> Iterator[_Ticket]:
        """The waiters now, in the order `leave(served=True)` would serve them: priorities
        from the highest, and within one its flows' FIFOs in turn (each priority's snapshot
        taken when the walk reaches it)."""
        for priority in sorted(self._levels, reverse=True):
            ring = self._levels.get(priority)
            if ring is None:
                continue  # every waiter of it left since the walk began
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
        self._reserved = set()
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
        if not self._dirty:
            self._end_pass()  # every waiter's workers are known full
            return
        passes = self._passes
        reserved = self._reserved
        refreshed = self._refreshed
        dirty = self._dirty
        order = self._order
        late = self._late
        while True:
            ticket = next(order, None) if order is not None else None
            if ticket is None:
                if not late:
                    break
                ticket = late.popleft()
            if not ticket.queued or ticket.passed == passes:
                continue
            ticket.passed = passes
            pool = ticket.pool
            blocked_on = pool.blocked_on
            if blocked_on is not None and pool.seen == refreshed:
                if pool not in dirty:
                    # Full, and nothing freed since: its workers are held for it.
                    if pool.passed != passes:
                        pool.passed = passes
                        reserved |= blocked_on
                    continue
                if blocked_on <= reserved:
                    continue  # every worker it may use is held for a waiter ahead
            self._give(ticket)
            return
        self._end_pass()

    def _give(self, ticket: _Ticket) -> None:
        self._holder = ticket
        ticket.reserved = frozenset(self._reserved)
        ticket.members = self._members
        ticket.asked_at = self.wakes
        ticket.refreshed_at = self._refreshed
        ticket.event.set()

    def _end_pass(self) -> None:
        self._order = None
        self._late.clear()
        self._reserved = set()
        self._restart = False


def default_queue_limit(slots: list[int | None]) -> int:
    """``max_queued_requests`` when unset: a quarter of the workers' slots together (a worker
    without a known limit counting 64), and at least 8.

    A quarter keeps a queued request's wait under about a quarter of a request's time in a
    full batch, so admitted requests stay within twice the unloaded p99 at any load
    (benchmarks/bench_overload.py: half the slots gave 2.03x)."""
    total = sum(s if s else 64 for s in slots)
    return max(8, total // 4)
