"""Fault schedules: which worker, when, which fault; and the task that applies them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import attrs
import trio

from ..engines.mock import MockEngine

FaultKind = Literal["crash", "restart", "stall", "refuse", "accept", "slow", "leave", "rejoin"]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "crash",
    "restart",
    "stall",
    "refuse",
    "accept",
    "slow",
    "leave",
    "rejoin",
)


@attrs.frozen
class Fault:
    """At trio time ``at`` (seconds after the schedule starts), do ``kind`` to worker
    ``worker_id``; ``amount`` is the stall length in seconds or the slow-down factor."""

    at: float
    worker_id: int
    kind: FaultKind
    amount: float = 1.0

    def apply(self, engine: MockEngine) -> None:
        """Inject this fault into ``engine`` now."""
        if self.kind == "crash":
            engine.crash()
        elif self.kind == "restart":
            engine.restart()
        elif self.kind == "stall":
            engine.stall(self.amount)
        elif self.kind == "refuse":
            engine.refuse_new(True)
        elif self.kind == "accept":
            engine.refuse_new(False)
        elif self.kind == "slow":
            engine.slow(self.amount)
        elif self.kind == "leave":
            engine.leave()
        elif self.kind == "rejoin":
            engine.rejoin()
        else:  # pragma: no cover - FaultKind is closed
            raise ValueError(f"unknown fault kind {self.kind!r}")


async def run_fault_schedule(
    faults: Sequence[Fault], engines: Mapping[int, MockEngine] | Sequence[MockEngine]
) -> None:
    """Apply ``faults`` in time order, sleeping (in trio time) between them; returns after the
    last one. Faults naming an unknown worker are ignored."""
    by_id = engines if isinstance(engines, Mapping) else {e.instance_id: e for e in engines}
    start = trio.current_time()
    for fault in sorted(faults, key=lambda f: f.at):
        await trio.sleep_until(start + fault.at)
        engine = by_id.get(fault.worker_id)
        if engine is not None:
            fault.apply(engine)
