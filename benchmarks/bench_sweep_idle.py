"""How long `ServerState.sweep_idle` holds the event loop when many idle keep-alive connections
time out together, per connection, against the same pass over ten times fewer in the same run.

A pass should cost the same per connection at any count (the printed ratio near 1.0): with
``ServerState.idle`` a plain dict used as a queue, each look at its first entry rescanned the
holes earlier deletions left, and 50,000 connections due together held the loop ~1.6 s (a
ratio near 10). The connections are stand-ins with a real descriptor (a pipe's write end,
never readable), so the pass makes the readability check a real connection gets; rounds
alternate the two sizes (the box is shared: absolute times move, the ratio less).

    PYTHONPATH=. python benchmarks/bench_sweep_idle.py --many 50000 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import trio
import trio.testing

from interlock.http._h1 import ServerState


class _Idle:
    """What the sweeper uses of a `Connection`: its descriptor, ``closed`` and ``close``."""

    __slots__ = ("_fd", "closed")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.closed = False

    def close(self) -> None:
        self.closed = True


async def _one_pass(count: int, fd: int) -> float:
    """Seconds of the sweeper's pass that closes ``count`` connections due together."""
    server = ServerState(
        None,  # type: ignore[arg-type]  # no connection is served
        lifespan_state={},
        keep_alive_timeout=10,
        header_timeout=60,
        write_timeout=60,
        max_header_bytes=16384,
    )
    now = trio.current_time()
    connections = [_Idle(fd) for _ in range(count)]
    for connection in connections:
        server.idle[connection] = now  # type: ignore[index]  # all idle since one instant
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.sweep_idle)
        await trio.sleep(9.999)
        start = time.perf_counter()
        await trio.sleep(0.002)  # the sweeper's pass at the deadline runs in here
        took = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    if server.idle or not all(c.closed for c in connections):
        raise RuntimeError("the sweeper left connections open past their deadline")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--many", type=int, default=50_000, help="connections due together")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    few = a.many // 10
    read_end, write_end = os.pipe()
    per: dict[int, list[float]] = {few: [], a.many: []}
    try:
        for r in range(a.rounds):
            for count in (few, a.many) if r % 2 == 0 else (a.many, few):
                clock = trio.testing.MockClock(autojump_threshold=0)
                took = trio.run(_one_pass, count, write_end, clock=clock)
                per[count].append(took / count)
    finally:
        os.close(read_end)
        os.close(write_end)
    for count, times in per.items():
        print(
            f"{count} connections due together: one pass "
            f"{statistics.median(times) * count * 1000:.1f} ms "
            f"({statistics.median(times) * 1e6:.2f} us a connection)"
        )
    ratios = [m / f for f, m in zip(per[few], per[a.many], strict=True)]
    print(
        f"per-connection cost, {a.many} vs {few}: {statistics.median(ratios):.2f}x "
        f"[{min(ratios):.2f}-{max(ratios):.2f}] (1.0: linear) rounds={a.rounds}"
    )


if __name__ == "__main__":
    main()
