"""The admission queue against other revisions', in one run: router asks per freed slot and
CPU per admitted request, with one pool of workers, with three, and with many.

Run from the repository root::

    python benchmarks/ab_admission.py [--base main [--base c517d0c]] [--waiters 64]
        [--frees 1500] [--rounds 3] [--cases one-pool,three-pools,pools-16,pools-64]

Extracts each ``--base`` (``git archive``) into a temporary folder and runs each case in a
child process per checkout (``PYTHONPATH`` says which interlock it imports), alternating the
order between rounds. Each child opens a query-only pipeline over mock workers, fills every
slot with gateway bookings (``query(book=True, admit=True)``) and keeps requests waiting;
then, ``--frees`` times, it frees the oldest booking, lets everything settle and tops the
waiters up again. Time stands still (a `MockClock` that never jumps), so only frees move the
queue. Cases:

- ``one-pool``: 3 workers of 4 slots, ``--waiters`` requests waiting, every request may go to
  every worker.
- ``three-pools``: the same, with requests for LoRA adapter ``ad1`` (served by worker 1),
  ``ad2`` (workers 2 and 3) and the base model (any worker), in turn.
- ``pools-16``, ``pools-64``: 16 (64) workers of 1 slot, each serving its own adapter, and
  requests for each adapter in turn, 2 waiting per adapter: 16 (64) pools, each blocked on
  one worker (a gateway's per-adapter engines, or subset hints). A booking drawn at random
  (seeded) frees each time, not the oldest: the oldest is on the head's worker.

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
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CASES = ("one-pool", "three-pools", "pools-16", "pools-64")


def layout(case: str, waiters: int) -> tuple[dict[int, frozenset[str]], int, list[str | None], int]:
    """``case``'s workers (each one's adapters), slots per worker, the requests' models in
    turn, and how many wait."""
    if case.startswith("pools-"):
        pools = int(case.removeprefix("pools-"))
        serving = {w: frozenset({f"ad{w}"}) for w in range(1, pools + 1)}
        return serving, 1, [f"ad{w}" for w in serving], 2 * pools
    serving = {1: frozenset({"ad1"}), 2: frozenset({"ad2"}), 3: frozenset({"ad2"})}
    models: list[str | None] = [None] if case == "one-pool" else ["ad1", "ad2", None]
    return serving, 4, models, waiters


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
    serving, slots, models, waiters = layout(case, waiters)
    # With one worker per pool, freeing the oldest booking frees the head's worker (requests
    # go in the same rotation), a head-only queue's best case: there, a random one frees.
    spread = case.startswith("pools-")
    draw = random.Random(1)
    config = PipelineConfig(
        routing="query_only",
        router_mode="round_robin",
        max_inflight_per_worker=slots,
        max_queued_requests=waiters * 2,
    )

    async def run() -> dict[str, float]:
        engines = []
        for worker_id, adapters in serving.items():
            engine = MockEngine(worker_id)
            engine.adapters = adapters  # type: ignore[attr-defined]
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
                    pipeline.free(booked.pop(draw.randrange(len(booked)) if spread else 0))
                    await trio.testing.wait_all_tasks_blocked()
                    idle += len(serving) * slots - len(booked)
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


FIGURES = ("asks_per_free", "admitted_per_free", "idle_slots", "cpu_us_per_admitted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base",
        action="append",
        help="git revision to compare with (repeat for more; default: main)",
    )
    parser.add_argument("--waiters", type=int, default=64)
    parser.add_argument("--frees", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated, of " + str(CASES)
    )
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.waiters, args.frees)))
        return
    bases: list[str] = args.base or ["main"]
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}: choose among {list(CASES)}")
    with tempfile.TemporaryDirectory() as folder:
        sources: dict[str, Path] = {}
        for base in bases:
            checkout = Path(folder) / base
            checkout.mkdir()
            archive = subprocess.run(
                ["git", "archive", base], cwd=ROOT, check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(checkout)], input=archive, check=True)
            sources[base] = checkout
        sources["new"] = ROOT
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for index in range(args.rounds):
            order = list(sources) if index % 2 == 0 else list(reversed(sources))
            for case in cases:
                for name in order:
                    figures = measure(sources[name], case, args)
                    results.setdefault((case, name), []).append(figures)
                    print(json.dumps({"round": index, "case": case, "checkout": name} | figures))
    print(f"\n{args.frees} frees; medians of {args.rounds} rounds; ratios: new / each base")
    header = "".join(f"{name:>10}" for name in sources)
    ratios = "".join(f"{'/' + base:>10}" for base in bases)
    print(f"{'case':<12} {'figure':<20}{header}{ratios}")
    for case in cases:
        for figure in FIGURES:
            values = {
                name: statistics.median(r[figure] for r in results[(case, name)])
                for name in sources
            }
            row = "".join(f"{values[name]:>10.3f}" for name in sources)
            new = values["new"]
            row += "".join(
                f"{new / values[base] if values[base] else float('nan'):>10.2f}" for base in bases
            )
            print(f"{case:<12} {figure:<20}{row}")


if __name__ == "__main__":
    main()
