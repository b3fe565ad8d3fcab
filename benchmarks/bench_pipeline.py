"""Throughput of the full in-process pipeline against calling the engine directly.

Both runs use the same zero-time mock workers on one core, in the same process, back to back,
so the ratio is meaningful on a noisy machine even when the absolute figures are not.

    python benchmarks/bench_pipeline.py [--requests N] [--concurrency C] [--max-tokens T]
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine, MockTiming
from interlock.wire import PreprocessedRequest

PROMPT = tuple(range(1, 257))


def _engines(n: int) -> list[MockEngine]:
    return [MockEngine(i, timing=MockTiming.zero()) for i in range(n)]


async def _drive(n_requests: int, concurrency: int, one_request) -> float:  # type: ignore[no-untyped-def]
    remaining = iter(range(n_requests))

    async def client() -> None:
        for _ in remaining:
            await one_request()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(client)
    return time.perf_counter() - start


async def direct(args: argparse.Namespace) -> float:
    engines = _engines(args.workers)
    request = PreprocessedRequest(token_ids=PROMPT, max_tokens=args.max_tokens)
    turn = 0

    async def one() -> None:
        nonlocal turn
        engine = engines[turn % len(engines)]
        turn += 1
        async with engine.open_stream(request) as stream:
            async for _ in stream:
                pass

    async with trio.open_nursery() as nursery:
        for e in engines:
            await nursery.start(e.run)
        elapsed = await _drive(args.requests, args.concurrency, one)
        nursery.cancel_scope.cancel()
    return elapsed


async def pipeline(args: argparse.Namespace, config: PipelineConfig) -> float:
    request = PreprocessedRequest(token_ids=PROMPT, max_tokens=args.max_tokens)
    async with build_pipeline(config, Components(workers=_engines(args.workers))) as p:

        async def one() -> None:
            async for _ in p.generate(request):
                pass

        return await _drive(args.requests, args.concurrency, one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configs = {
        "discover/round_robin": PipelineConfig(),
        "discover/round_robin+migration": PipelineConfig(migration_limit=3),
        "discover/random": PipelineConfig(router_mode="random"),
    }
    base = statistics.median(trio.run(direct, args) for _ in range(args.repeats))
    n = args.requests
    print(
        f"{n} requests, concurrency {args.concurrency}, {args.workers} zero-time workers, "
        f"{args.max_tokens} output token(s), 256-token prompt; median of {args.repeats}"
    )
    print(f"{'path':34} {'req/s':>10} {'µs/req':>8} {'overhead µs':>12} {'ratio':>6}")
    print(f"{'engine called directly':34} {n / base:10.0f} {base / n * 1e6:8.1f} {'':>12} {1:6.2f}")
    for name, config in configs.items():
        took = statistics.median(trio.run(pipeline, args, config) for _ in range(args.repeats))
        overhead = (took - base) / n * 1e6
        print(
            f"{name:34} {n / took:10.0f} {took / n * 1e6:8.1f} {overhead:12.1f} {took / base:6.2f}"
        )


if __name__ == "__main__":
    main()
