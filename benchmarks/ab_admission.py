"""The admission queue against another revision's, in one run: router asks per freed slot and
CPU per admitted request, with one pool of workers and with three.

Run from the repository root::

    python benchmarks/ab_admission.py [--base main] [--waiters 64] [--frees 1500] [--rounds 3]

Extracts ``--base`` (``git archive``) into a temporary folder and runs each case in a child
process per checkout (``PYTHONPATH`` says which interlock it imports), alternating the order
between rounds. Each child opens a query-only pipeline over 3 mock workers of 4 slots
(``max_inflight_per_worker=4``), fills every slot with gateway bookings
(``query(book=True, admit=True)``) and keeps ``--waiters`` requests waiting; then, ``--frees``
times, it frees the oldest booking, lets everything settle and tops the waiters up again.
Time stands still (a `MockClock` that never jumps), so only frees move the queue. Cases:

- ``one-pool``: every request may go to every worker.
- ``three-pools``: requests for LoRA adapter ``ad1`` (served by worker 1), ``ad2`` (workers 2
  and 3) and the base model (any worker), in turn.

Printed per case and checkout: router asks (``Select``s with admission) per freed slot,
requests admitted per freed slot, the slots left idle once the queue settled after a free, on
average (above 0 while requests wait: head-of-line blocking), and CPU per admitted request
(the whole child's CPU over the freeing loop: the pipeline's query path, the router and the
queue; the same work in both but the queue's); then each figure's ratio, this checkout over
the base, medians over the rounds. The box is shared: only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CASES = ("one-pool", "three-pools")
WORKERS = (1, 2, 3)
SLOTS = 4
SERVING = {1: frozenset({"ad1"}), 2: frozenset({"ad2"}), 3: frozenset({"ad2"})}


def child(case: str, waiters: int, frees: int) -> dict[str, float]:
    """One measurement in this process, with whichever interlock ``PYTHONPATH`` gives."""
    import trio
    import trio.testing

    from interlock import Components, PipelineConfig, build_pipeline
    from interlock.actors import _router
    from interlock.engines.mock import MockEngine
    from interlock.wire import PreprocessedRequest

    asks = 0
    select = _router.RouterActor._select

    def counting(self: Any, message: Any) -> Any:
        nonlocal asks
        asks += message.admit
        return select(self, message)

    _router.RouterActor._select = counting  # type: ignore[method-assign]
    models = [None] if case == "one-pool" else ["ad1", "ad2", None]
    config = PipelineConfig(
        routing="query_only",
        router_mode="round_robin",
        max_inflight_per_worker=SLOTS,
        max_queued_requests=waiters * 2,
    )

    async def run() -> dict[str, float]:
        engines = []
        for worker_id in WORKERS:
            engine = MockEngine(worker_id)
            engine.adapters = SERVING[worker_id]  # type: ignore[attr-defined]
            engines.append(engine)
        async with build_pipeline(config, Components(workers=engines)) as pipeline:
            booked: list[str] = []
            count = 0

            async def book(name: str, model: str | None) -> None:
                request = PreprocessedRequest(token_ids=(1, 2, 3, 4), request_id=name, model=model)
                await pipeline.query(request, book=True, admit=True)
                booked.append(name)

            async with trio.open_nursery() as nursery:

                async def top_up() -> None:
                    nonlocal count
                    while pipeline.queued < waiters:
                        nursery.start_soon(book, f"r{count}", models[count % len(models)])
                        count += 1
                        await trio.testing.wait_all_tasks_blocked()

                await top_up()
                await trio.testing.wait_all_tasks_blocked()
                before = len(booked)
                asked = asks
                idle = 0
                cpu = time.process_time()
                for _ in range(frees):
                    pipeline.free(booked.pop(0))
                    await trio.testing.wait_all_tasks_blocked()
                    idle += len(WORKERS) * SLOTS - len(booked)
                    await top_up()
                cpu = time.process_time() - cpu
                # Each free removed one booking; each admission added one.
                admitted = len(booked) - before + frees
                result = {
                    "asks_per_free": (asks - asked) / frees,
                    "admitted_per_free": admitted / frees,
                    "idle_slots": idle / frees,
                    "cpu_us_per_admitted": cpu / max(admitted, 1) * 1e6,
                }
                nursery.cancel_scope.cancel()
        return result

    return trio.run(run, clock=trio.testing.MockClock())


def measure(source: Path, case: str, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(source))
    output = subprocess.run(
        [
            sys.executable,
            __file__,
            *("--child", case, "--waiters", str(args.waiters), "--frees", str(args.frees)),
        ],
        env=env,
        cwd=source,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    figures: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="git revision to compare with")
    parser.add_argument("--waiters", type=int, default=64)
    parser.add_argument("--frees", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.waiters, args.frees)))
        return
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        archive = subprocess.run(
            ["git", "archive", args.base], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        sources = {"base": base, "new": ROOT}
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for index in range(args.rounds):
            order = list(sources) if index % 2 == 0 else list(reversed(sources))
            for case in CASES:
                for name in order:
                    figures = measure(sources[name], case, args)
                    results.setdefault((case, name), []).append(figures)
                    print(json.dumps({"round": index, "case": case, "checkout": name} | figures))
    print(
        f"\n{args.waiters} waiters, 3 workers x {SLOTS} slots, {args.frees} frees; medians of "
        f"{args.rounds} rounds ({args.base} = base)"
    )
    print(f"{'case':<12} {'figure':<20} {'base':>9} {'new':>9} {'new/base':>9}")
    for case in CASES:
        for figure in ("asks_per_free", "admitted_per_free", "idle_slots", "cpu_us_per_admitted"):
            old = statistics.median(r[figure] for r in results[(case, "base")])
            new = statistics.median(r[figure] for r in results[(case, "new")])
            ratio = new / old if old else float("nan")
            print(f"{case:<12} {figure:<20} {old:>9.3f} {new:>9.3f} {ratio:>9.2f}")


if __name__ == "__main__":
    main()
