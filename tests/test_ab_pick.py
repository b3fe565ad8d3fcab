"""benchmarks/ab_pick.py's measured pick still runs against this checkout's picker and test
helpers (a few picks, in virtual time; no figure is asserted)."""

from __future__ import annotations

import trio
from helpers import load_benchmark


async def test_the_benchmarked_pick_runs(autojump_clock: trio.testing.MockClock) -> None:
    # Each pick asserts its answer names a destination: a picker that refused the short chat
    # fails here rather than have the benchmark time refusals.
    assert await load_benchmark("ab_pick").pick_cpu_us(3, warm_up=1) > 0
