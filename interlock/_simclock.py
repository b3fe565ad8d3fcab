"""`SimulationClock`: virtual time that jumps straight to the next thing due, with timers for
simulated engines that cost no cancel scope. Re-exported by `interlock.testing`."""

from __future__ import annotations

import heapq
import itertools
import math

import trio

#: How long trio's loop may block on real I/O when nothing at all is scheduled (trio caps
#: any wait at a day; this only matters when a simulation also waits on a thread or socket).
_IDLE_WAIT = 86_400.0


class SimulationClock(trio.abc.Clock):
    """A virtual clock for simulations: time stands still while any task can run and jumps
    to the next deadline the moment every task waits.

    It keeps time exactly like ``trio.testing.MockClock(autojump_threshold=0)`` but costs
    less: the jump happens in the same pass of trio's loop that finds nothing to run (the
    mock clock needs a second one), and `sleep_until` gives simulated engines timers that
    need no cancel scope. A mock engine's scheduler step is one such timer, which makes a
    long trace replay about twice as fast.

    One thing differs from the mock clock: ``trio.testing.wait_all_tasks_blocked`` wakes only
    when nothing at all is scheduled, since the clock jumps ahead of it. Tests that use it
    should run on ``MockClock``; everything in interlock works on either.

    Use it as trio's clock: ``trio.run(main, clock=SimulationClock())``
    (`interlock.testing.run_simulation` does).
    """

    __slots__ = ("_now", "_order", "_timers")

    def __init__(self, *, start: float = 0.0) -> None:
        self._now = float(start)
        # Entries are [deadline, order, task]; a cancelled timer's task becomes None.
        self._timers: list[list[object]] = []
        self._order = itertools.count()

    def __repr__(self) -> str:
        return f"<SimulationClock time={self._now:.6f} timers={len(self._timers)}>"

    # -- trio.abc.Clock ----------------------------------------------------------------------

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self._now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        # trio asks this only when no task can run: the moment to move time forward.
        timers = self._timers
        while timers and timers[0][2] is None:
            heapq.heappop(timers)
        if timers and timers[0][0] <= deadline:  # type: ignore[operator]
            due: float = timers[0][0]  # type: ignore[assignment]
            if due > self._now:
                self._now = due
            reschedule = trio.lowlevel.reschedule
            while timers and timers[0][0] <= due:  # type: ignore[operator]
                entry = heapq.heappop(timers)
                task = entry[2]
                if task is not None:
                    entry[2] = None
                    reschedule(task)  # type: ignore[arg-type]
            return 0.0
        if deadline == math.inf:
            return _IDLE_WAIT
        if deadline > self._now:
            self._now = deadline
        return 0.0

    # -- for simulations ---------------------------------------------------------------------

    def jump(self, seconds: float) -> None:
        """Move time forward by ``seconds`` now (deadlines passed on the way fire at once).

        Raises:
            ValueError: ``seconds`` is negative: time does not go back.
        """
        if seconds < 0:
            raise ValueError(f"time can only jump forward, not by {seconds} s")
        self._now += seconds

    async def sleep_until(self, deadline: float) -> None:
        """Wait until this clock reads ``deadline`` (at once, as a checkpoint, if it already
        has passed). Like `trio.sleep_until` but with no cancel scope: cancelling the task
        still interrupts it (`trio.Cancelled`).

        Raises:
            RuntimeError: the running trio loop uses another clock, which would never fire it.
        """
        if trio.lowlevel.current_clock() is not self:
            raise RuntimeError(
                "SimulationClock.sleep_until called in a trio run on another clock; pass "
                "clock=SimulationClock() to trio.run, or use trio.sleep_until"
            )
        if deadline <= self._now:
            await trio.lowlevel.checkpoint()
            return
        entry: list[object] = [deadline, next(self._order), trio.lowlevel.current_task()]
        heapq.heappush(self._timers, entry)

        def abort(_: object) -> trio.lowlevel.Abort:
            entry[2] = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
