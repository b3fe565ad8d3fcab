"""Review script (not a benchmark of record): how long `ServerState.sweep_idle` holds the event
loop when many idle connections time out together.

`ServerState.idle` is a dict used as a FIFO: each `next(iter(idle.items()))` after `del`s at the
front scans the deleted entries' holes from the start of CPython's entry table, so closing N
connections due in one pass costs O(N^2): the whole event loop stalls meanwhile.

    PYTHONPATH=. python benchmarks/review_sweep_idle_many.py
"""

from __future__ import annotations

import time

import trio
import trio.testing

from interlock.http._h1 import ServerState


class _Fake:
    closed = 0

    def close(self) -> None:
        _Fake.closed += 1


async def _sweep(n: int) -> float:
    server = ServerState(
        None,  # type: ignore[arg-type]
        lifespan_state={},
        keep_alive_timeout=10,
        header_timeout=60,
        write_timeout=60,
        max_header_bytes=16384,
    )
    now = trio.current_time()
    for _ in range(n):
        server.idle[_Fake()] = now  # type: ignore[index]  # all idle since the same instant
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.sweep_idle)
        await trio.sleep(9.999)
        start = time.perf_counter()
        await trio.sleep(0.002)  # the sweeper's pass at the deadline runs in here
        took = time.perf_counter() - start
        assert not server.idle
        nursery.cancel_scope.cancel()
    return took


for n in (5_000, 20_000, 50_000):
    took = trio.run(_sweep, n, clock=trio.testing.MockClock(autojump_threshold=0))
    print(f"{n} idle connections due together: one sweeper pass {1000 * took:.0f} ms")
