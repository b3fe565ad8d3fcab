"""Workloads and what they measure: run timed requests through a pipeline and report time to
first token, latencies and prefix-cache hits. Meant for virtual time, where the figures are
exact and the same on every run."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import attrs
import trio

from .._errors import InterlockError
from .._pipeline import Pipeline
from ..wire import PreprocessedRequest


@attrs.frozen
class TimedRequest:
    """``request`` arrives ``at`` seconds after the workload starts."""

    at: float
    request: PreprocessedRequest


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


@attrs.frozen
class WorkloadReport:
    """What a workload measured. Times in seconds of trio's clock."""

    ttft: tuple[float, ...]
    itl: tuple[float, ...]
    e2e: tuple[float, ...]
    prompt_tokens: int
    cached_tokens: int
    completed: int
    failed: int
    duration: float

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from a prefix cache, over all prompt tokens."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def ttft_quantile(self, q: float) -> float:
        return _quantile(self.ttft, q)

    def itl_quantile(self, q: float) -> float:
        return _quantile(self.itl, q)

    def e2e_quantile(self, q: float) -> float:
        return _quantile(self.e2e, q)


async def run_workload(pipeline: Pipeline, requests: Sequence[TimedRequest]) -> WorkloadReport:
    """Send each request at its time (relative to now), wait for all, and report.

    A request that fails counts in ``failed``; its latencies are left out. Returns when the last
    request has ended.
    """
    start = trio.current_time()
    ttft: list[float] = []
    itl: list[float] = []
    e2e: list[float] = []
    totals = {"prompt": 0, "cached": 0, "completed": 0, "failed": 0}

    async def one(timed: TimedRequest) -> None:
        await trio.sleep_until(start + timed.at)
        began = last = trio.current_time()
        first = True
        try:
            async for output in pipeline.generate(timed.request):
                now = trio.current_time()
                if output.token_ids:
                    if first:
                        ttft.append(now - began)
                        first = False
                    else:
                        itl.append(now - last)
                    last = now
                if output.usage is not None:
                    totals["prompt"] += output.usage.prompt_tokens
                    totals["cached"] += output.usage.cached_tokens
        except InterlockError:
            totals["failed"] += 1
            return
        e2e.append(trio.current_time() - began)
        totals["completed"] += 1

    async with trio.open_nursery() as nursery:
        for timed in requests:
            nursery.start_soon(one, timed)
    return WorkloadReport(
        ttft=tuple(ttft),
        itl=tuple(itl),
        e2e=tuple(e2e),
        prompt_tokens=totals["prompt"],
        cached_tokens=totals["cached"],
        completed=totals["completed"],
        failed=totals["failed"],
        duration=trio.current_time() - start,
    )


def shared_prefix_workload(
    *,
    seed: int,
    requests: int,
    rate: float,
    families: int = 12,
    prefix_tokens: int = 4000,
    own_tokens: tuple[int, int] = (200, 2000),
    output_tokens: tuple[int, int] = (16, 128),
    popularity: float = 1.2,
) -> list[TimedRequest]:
    """Poisson arrivals at ``rate`` per second of requests that each start with one of
    ``families`` long prefixes (a system prompt, a document, a conversation so far), chosen
    with Zipf-like popularity (weight ``1 / rank**popularity``), followed by their own tokens.

    Deterministic for a given ``seed``.
    """
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** popularity for rank in range(families)]
    prefixes = [
        [family * 1_000_003 % 2**31 + i for i in range(prefix_tokens)] for family in range(families)
    ]
    at = 0.0
    timed = []
    for _ in range(requests):
        at += rng.expovariate(rate)
        family = rng.choices(range(families), weights)[0]
        own = [rng.randrange(1, 30_000) for _ in range(rng.randint(*own_tokens))]
        timed.append(
            TimedRequest(
                at,
                PreprocessedRequest(
                    token_ids=prefixes[family] + own, max_tokens=rng.randint(*output_tokens)
                ),
            )
        )
    return timed
