"""Admission control under overload: goodput and admitted latency at 1x, 2x and 3x capacity,
with interlock's admission control on (the defaults) and off (``max_inflight_per_worker=0``,
and no stall deadlines), in one run.

A cluster of mock engines (the reference timing model, ``max_num_seqs`` 8 each) runs in
virtual time (trio's MockClock), so the figures are the policy's, not the machine's: the same
on every run and every machine. First a calibration: closed-loop load with exactly one request
per engine slot measures the cluster's capacity (requests per second). Then Poisson arrivals at
0.5x (the unloaded baseline), 1x, 2x and 3x that rate for ``--seconds`` each, every request the
same shape (``--prompt`` tokens in, ``--output`` out). Reported per load and mode: requests
admitted and shed, admitted latency p50/p99 and their ratio to the unloaded p99, and goodput:
requests per second that completed within the SLO (twice the unloaded p99). A shed request is
answered at once (429 over HTTP) and counts as not good.

    python benchmarks/bench_overload.py [--workers 4] [--seconds 60] [--prompt 512]
        [--output 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from typing import Any

import trio
import trio.testing

from interlock import Components, Overloaded, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine, MockTiming

MAX_NUM_SEQS = 8
LOADS = (0.5, 1.0, 2.0, 3.0)
MODES = {
    "on": PipelineConfig(),
    # Without admission control requests wait inside the engines, where their first token
    # can take longer than first_token_timeout: that is overload, not a stalled engine, so
    # the deadlines are off too (with them on, the overloaded engines get ejected in turn).
    "off": PipelineConfig(
        max_inflight_per_worker=0, first_token_timeout=None, engine_idle_timeout=None
    ),
}


def engines(workers: int) -> list[MockEngine]:
    return [
        MockEngine(i, max_num_seqs=MAX_NUM_SEQS, timing=MockTiming(speedup_ratio=1.0))
        for i in range(workers)
    ]


def prompt(rng: random.Random, length: int) -> tuple[int, ...]:
    # Distinct prompts: no prefix caching flatters either mode.
    return tuple(rng.randrange(1, 30_000) for _ in range(length))


async def one(pipeline: Any, tokens: tuple[int, ...], output: int) -> float | None:
    """Run one request; its latency in seconds, or None when it was shed."""
    from interlock.wire import PreprocessedRequest

    started = trio.current_time()
    request = PreprocessedRequest(token_ids=tokens, max_tokens=output, ignore_eos=True)
    try:
        async for _ in pipeline.generate(request):
            pass
    except Overloaded:
        return None
    return trio.current_time() - started


async def capacity(args: argparse.Namespace) -> float:
    """Requests per second the cluster completes with every slot busy (closed loop)."""
    rng = random.Random(args.seed)
    done = 0
    async with build_pipeline(MODES["off"], Components(workers=engines(args.workers))) as p:
        deadline = trio.current_time() + args.seconds

        async def loop() -> None:
            nonlocal done
            while trio.current_time() < deadline:
                await one(p, prompt(rng, args.prompt), args.output)
                done += 1

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(args.workers * MAX_NUM_SEQS):
                nursery.start_soon(loop)
        return done / (trio.current_time() - start)


async def open_loop(args: argparse.Namespace, mode: str, rate: float) -> list[float | None]:
    """Poisson arrivals at ``rate`` for ``args.seconds``; every request's latency (None: shed)."""
    rng = random.Random(args.seed + int(rate * 1000))
    results: list[float | None] = []
    async with build_pipeline(MODES[mode], Components(workers=engines(args.workers))) as p:

        async def run(tokens: tuple[int, ...]) -> None:
            results.append(await one(p, tokens, args.output))

        async with trio.open_nursery() as nursery:
            end = trio.current_time() + args.seconds
            while trio.current_time() < end:
                nursery.start_soon(run, prompt(rng, args.prompt))
                await trio.sleep(rng.expovariate(rate))
    return results


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def main(args: argparse.Namespace) -> None:
    rate = await capacity(args)
    print(
        f"cluster: {args.workers} mock engines x max_num_seqs {MAX_NUM_SEQS}, prompt "
        f"{args.prompt} / output {args.output} tokens; capacity {rate:.2f} requests/s "
        f"(closed loop, every slot busy); {args.seconds:g} s of Poisson arrivals per row, "
        "virtual time"
    )
    baseline = await open_loop(args, "on", LOADS[0] * rate)
    unloaded_p99 = percentile([r for r in baseline if r is not None], 0.99)
    slo = 2 * unloaded_p99
    print(f"unloaded (0.5x) p99 latency {unloaded_p99:.2f} s; SLO for goodput: {slo:.2f} s\n")
    header = (
        f"{'load':>5} {'admission':>9} {'sent':>6} {'shed':>6} {'p50 s':>7} {'p99 s':>7} "
        f"{'p99/unloaded':>12} {'goodput/s':>9} {'goodput/capacity':>16}"
    )
    print(header)
    print("-" * len(header))
    for load in LOADS[1:]:
        for mode in MODES:
            results = await open_loop(args, mode, load * rate)
            admitted = [r for r in results if r is not None]
            good = sum(1 for r in admitted if r <= slo) / args.seconds
            print(
                f"{load:>4g}x {mode:>9} {len(results):>6} {len(results) - len(admitted):>6} "
                f"{statistics.median(admitted):>7.2f} {percentile(admitted, 0.99):>7.2f} "
                f"{percentile(admitted, 0.99) / unloaded_p99:>12.2f} {good:>9.2f} "
                f"{good / rate:>16.2f}"
            )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse(), clock=trio.testing.MockClock(autojump_threshold=0))
