"""`StallWatch`: one task per pipeline that ends the waits of the streams whose next output is
overdue, in place of a deadline cancel scope entered for each wait.

A leg's stream waits for each output that has not arrived yet; with a cancel scope per wait
(``trio.move_on_at``) that is ~6 µs of trio's scope and deadline bookkeeping a wait, a few per
request. A stream that can be interrupted (``fail_waiting``: `RemoteEngine`'s, and
`OpenAIEngine`'s, which closes its connection to end a read) instead has its
leg's deadline kept here: moving it on an output is an ordered dict's move to the end, a wait
sets a field, and this watch's one task sleeps until the earliest deadline and fails the waits
that are still waiting then. A deadline never cancels anything: the waiting stream raises the
stall from its own ``__anext__``, so nothing leaks into the code of whoever iterates the
pipeline's outputs (a deadline that passes while that code writes to a slow client is seen by
the leg's next wait, as a scope entered then would see it).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import trio

from ._errors import EngineError, WorkerStalled

#: What a leg's stream offers to be watched here: ``fail_waiting(exc)`` ends its reader's wait
#: for an output with ``exc``, or returns False (doing nothing) when an output or error has
#: already arrived for the reader to take first (or bytes that may be one); a wait that goes
#: on is asked again `RECHECK_GRACE` later.
FailWaiting = Callable[[EngineError], bool]

#: How long after a passed deadline the watch looks again at a leg whose ``fail`` said False
#: (an output, or bytes of one, had come) and that still waits: long enough for the woken
#: reader to run and the rest of an output already in flight (one write split into TCP
#: segments) to land, even on a loaded box; short beside any sane engine_idle_timeout, as an
#: engine frozen mid-output stalls this late. Without it such a leg was watched by no one.
RECHECK_GRACE = 1.0


class WatchedLeg:
    """One leg's deadline for its stream's next output (`StallWatch.watch`)."""

    __slots__ = ("deadline", "fail", "idle", "since", "waiting", "worker_id")

    def __init__(self, fail: FailWaiting, worker_id: int, since: float, deadline: float) -> None:
        self.fail = fail
        self.worker_id = worker_id
        #: When the worker last made progress (the leg's start, then its last output): what
        #: the deadline was set from, and where the silence a stall reports began.
        self.since = since
        #: When the next output is due (trio's clock; math.inf: never).
        self.deadline = deadline
        #: Whether the deadline is an idle one (set by `StallWatch.moved`).
        self.idle = False
        #: Whether the leg is waiting for its next output (not while its consumer is busy with
        #: an output, or once it ended).
        self.waiting = False


class StallWatch:
    """The deadlines of a pipeline's watched legs and the task that enforces them (`run`).

    Legs are kept in two ordered dicts, first-token deadlines and idle ones, each in deadline
    order with the earliest at its front. An idle deadline is "now + engine_idle_timeout" when
    it is set, so appending keeps that order. A first-token deadline is set from the leg's
    start, before its stream opened (an engine's ``__aenter__`` may connect, send, wait), so a
    leg whose stream took time to open may be due before legs watched meanwhile: it goes in
    ahead of them (`_insert_in_order`; at the end, O(1), in the usual case). The task sleeps
    until the earlier front; a deadline set earlier than that (the first in an empty dict)
    moves the task's wake-up forward.

    ``stalled(worker_id, since)`` builds the error a stall raises (the worker silent since
    ``since``); the pipeline counts the stall when its leg's wait raises it. The task starts
    in ``nursery`` with the first leg watched: a pipeline whose streams all keep their scopes
    (in-process engines) runs no task, and schedules its tasks as it did before the watch
    existed.
    """

    __slots__ = ("_first", "_idle", "_nursery", "_sleep", "_wake_at", "stalled")

    def __init__(
        self,
        nursery: trio.Nursery,
        stalled: Callable[[int, float], WorkerStalled],
    ) -> None:
        self._nursery: trio.Nursery | None = nursery
        self.stalled = stalled
        self._first: OrderedDict[WatchedLeg, None] = OrderedDict()
        self._idle: OrderedDict[WatchedLeg, None] = OrderedDict()
        #: When the task wakes next, and the scope it sleeps in (None: not asleep).
        self._wake_at = math.inf
        self._sleep: trio.CancelScope | None = None

    def watch(
        self, stream: object, worker_id: int, since: float, deadline: float
    ) -> WatchedLeg | None:
        """Watch a leg that started at ``since`` on ``stream``, with its first-token
        ``deadline``; None (watch it with a scope per wait) when the stream cannot be
        interrupted."""
        fail: FailWaiting | None = getattr(stream, "fail_waiting", None)
        if fail is None:
            return None
        nursery = self._nursery
        if nursery is not None:
            try:
                nursery.start_soon(self._run)
            except RuntimeError:  # the pipeline's nursery has closed: nothing watches
                return None
            self._nursery = None
        leg = WatchedLeg(fail, worker_id, since, deadline)
        if deadline != math.inf:
            _insert_in_order(self._first, leg)
            self._wake_by(deadline)
        return leg

    def moved(self, leg: WatchedLeg, since: float, deadline: float) -> None:
        """``leg`` sent an output at ``since``: its next is due by ``deadline`` (an idle
        deadline)."""
        leg.since = since
        leg.deadline = deadline
        if not leg.idle:
            leg.idle = True
            self._first.pop(leg, None)
        idle = self._idle
        # Popped and appended rather than moved: the task drops a leg whose deadline passed
        # while it was not waiting.
        idle.pop(leg, None)
        if deadline != math.inf:
            idle[leg] = None
            self._wake_by(deadline)

    def done(self, leg: WatchedLeg) -> None:
        """``leg`` ended: forget it."""
        leg.waiting = False
        self._first.pop(leg, None)
        self._idle.pop(leg, None)

    def _wake_by(self, deadline: float) -> None:
        if deadline < self._wake_at:
            self._wake_at = deadline
            if self._sleep is not None:
                self._sleep.deadline = deadline

    async def _run(self) -> None:
        """Fail the waits of the legs whose deadline passed, as they pass; until cancelled."""
        while True:
            self._sleep = trio.CancelScope(deadline=self._wake_at)
            with self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            self._expire(trio.current_time())

    def _expire(self, now: float) -> None:
        wake_at = math.inf
        for legs in (self._first, self._idle):
            while legs:
                leg = next(iter(legs))
                if leg.deadline > now:
                    wake_at = min(wake_at, leg.deadline)
                    break
                del legs[leg]
                # A leg not waiting is left to its next wait, which finds the deadline passed
                # unless an output came meanwhile (a slow consumer is not a stalled worker).
                # An output that came as the deadline passed is taken first (``fail`` says
                # False): as with a scope, whose cancel cannot undo a wake-up already due. Not
                # counted here: the reader may be cancelled in this same batch and never raise
                # it (the pipeline counts the stall its leg raises).
                if leg.waiting and not leg.fail(self.stalled(leg.worker_id, leg.since)):
                    # The reader takes what came first; if that was no progress (part of an
                    # output, or one without tokens, which moves no deadline), the leg must
                    # still stall: looked at again shortly, from the same ``since``. In the
                    # first-token dict, the one kept in deadline order whatever the deadline
                    # (not idle: `moved` then takes it out of there).
                    leg.deadline = now + RECHECK_GRACE
                    leg.idle = False
                    _insert_in_order(self._first, leg)
                    wake_at = min(wake_at, leg.deadline)
        self._wake_at = wake_at


def _insert_in_order(legs: OrderedDict[WatchedLeg, None], leg: WatchedLeg) -> None:
    """Add ``leg`` to ``legs`` (in deadline order) where its deadline puts it: at the end,
    unless legs there are due later, which then move behind it (as many as there are)."""
    later: list[WatchedLeg] = []
    for other in reversed(legs):
        if other.deadline <= leg.deadline:
            break
        later.append(other)
    legs[leg] = None
    for other in reversed(later):
        legs.move_to_end(other)
