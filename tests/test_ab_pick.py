"""benchmarks/ab_pick.py's measured pick still runs against this checkout's picker and test
helpers (a few picks, in virtual time; no figure is asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio
from helpers import BENCHMARKS, load_benchmark


async def test_the_benchmarked_pick_runs(autojump_clock: trio.testing.MockClock) -> None:
    # Each pick asserts its answer names a destination: a picker that refused the short chat
    # fails here rather than have the benchmark time refusals.
    assert await load_benchmark("ab_pick").pick_cpu_us(3, warm_up=1) > 0


@pytest.mark.parametrize(
    ("argv", "flag"), [(["--rounds", "0"], "--rounds 0"), (["--picks", "0"], "--picks 0")]
)
def test_a_count_below_one_is_refused_naming_its_flag(argv: list[str], flag: str) -> None:
    # As bench_epp.py refuses its counts: at the start, naming the flag, not a traceback from
    # the end of the run (statistics of no rounds; a child's CPU divided by no picks).
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "ab_pick.py"), "--src", "a=.", "--src", "b=.", *argv],
        capture_output=True, text=True, timeout=120, check=False, cwd=BENCHMARKS.parent,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert flag in done.stderr, done.stderr[-3000:]
