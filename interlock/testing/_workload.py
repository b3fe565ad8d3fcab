"""Workloads and what they measure: run timed requests through a pipeline and report time to
first token, latencies and prefix-cache hits. Meant for virtual time, where the figures are
exact and the same on every run."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence

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
class RequestResult:
    """How one request of a workload went. Times in seconds of trio's clock; ``ttft`` and
    ``e2e`` are None when it failed before its first token or before its end, and ``error``
    then says why (``"WorkerGone: ..."``)."""

    index: int
    at: float
    ttft: float | None
    e2e: float | None
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    error: str | None = None


@attrs.frozen
class WorkloadReport:
    """What a workload measured. Times in seconds of trio's clock.

    ``ttft``, ``itl`` (gaps between outputs) and ``e2e`` come from the requests that
    completed, in the order they completed; ``duration`` runs from the start of the workload
    to the end of its last request.
    """

    ttft: tuple[float, ...]
    itl: tuple[float, ...]
    e2e: tuple[float, ...]
    prompt_tokens: int
    cached_tokens: int
    completed: int
    failed: int
    duration: float
    output_tokens: int = 0

    @property
    def requests(self) -> int:
        return self.completed + self.failed

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from a prefix cache, over all prompt tokens."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def throughput(self) -> float:
        """Output tokens of completed requests per second of ``duration``."""
        return self.output_tokens / self.duration if self.duration > 0 else 0.0

    def ttft_quantile(self, q: float) -> float:
        return _quantile(self.ttft, q)

    def itl_quantile(self, q: float) -> float:
        return _quantile(self.itl, q)

    def e2e_quantile(self, q: float) -> float:
        return _quantile(self.e2e, q)


async def run_workload(
    pipeline: Pipeline,
    requests: Iterable[TimedRequest],
    *,
    on_result: Callable[[RequestResult], None] | None = None,
) -> WorkloadReport:
    """Send each request at its time (relative to now), wait for all, and report.

    ``requests`` may be a sequence (any order) or a lazy iterable in time order: it is read
    one request ahead of the clock, so a generator that builds each request on demand keeps
    only the requests in flight in memory. ``on_result`` is called as each request ends.

    A request that fails counts in ``failed``; its latencies are left out. Returns when the last
    request has ended.

    Raises:
        ValueError: a lazy iterable whose times go backwards.
    """
    start = trio.current_time()
    now = trio.current_time
    ttft: list[float] = []
    itl: list[float] = []
    e2e: list[float] = []
    totals = [0, 0, 0, 0, 0]  # prompt, cached, completed, failed, output tokens

    async def one(index: int, timed: TimedRequest) -> None:
        began = last = now()
        first: float | None = None
        gaps: list[float] = []
        count = prompt = cached = 0
        try:
            async for output in pipeline.generate(timed.request):
                if output.token_ids:
                    t = now()
                    if first is None:
                        first = t - began
                    else:
                        gaps.append(t - last)
                    last = t
                    count += len(output.token_ids)
                usage = output.usage
                if usage is not None:
                    prompt = usage.prompt_tokens
                    cached = usage.cached_tokens
        except InterlockError as exc:
            totals[3] += 1
            if on_result is not None:
                on_result(
                    RequestResult(
                        index,
                        timed.at,
                        first,
                        None,
                        len(timed.request.token_ids),
                        0,
                        count,
                        f"{type(exc).__name__}: {exc}",
                    )
                )
            return
        elapsed = now() - began
        if first is not None:
            ttft.append(first)
        itl.extend(gaps)
        e2e.append(elapsed)
        totals[0] += prompt
        totals[1] += cached
        totals[2] += 1
        totals[4] += count
        if on_result is not None:
            on_result(RequestResult(index, timed.at, first, elapsed, prompt, cached, count))

    if isinstance(requests, Sequence):
        ordered: Iterable[tuple[int, TimedRequest]] = sorted(
            enumerate(requests), key=lambda pair: pair[1].at
        )
    else:
        ordered = enumerate(requests)
    out_of_order: str | None = None
    async with trio.open_nursery() as nursery:
        previous = -math.inf
        for index, timed in ordered:
            if timed.at < previous:
                out_of_order = (
                    f"request #{index} arrives at {timed.at}s, before request #{index - 1} "
                    f"({previous}s): a lazy workload must be in time order (or pass a sequence)"
                )
                nursery.cancel_scope.cancel()
                break
            previous = timed.at
            await trio.sleep_until(start + timed.at)
            nursery.start_soon(one, index, timed)
    if out_of_order is not None:
        raise ValueError(out_of_order)
    return WorkloadReport(
        ttft=tuple(ttft),
        itl=tuple(itl),
        e2e=tuple(e2e),
        prompt_tokens=totals[0],
        cached_tokens=totals[1],
        completed=totals[2],
        failed=totals[3],
        duration=trio.current_time() - start,
        output_tokens=totals[4],
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
