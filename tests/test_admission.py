"""Admission control: at most ``max_inflight_per_worker`` requests on a worker, at most
``max_queued_requests`` waiting in the frontend for a slot (highest priority first, then
oldest), and `Overloaded` (HTTP 429 with Retry-After) beyond. Sheddable requests (negative
priority) never wait; migrations, named workers and gateway queries are not held back.

In-process, in virtual time; the HTTP status and header are checked against a real
`interlock serve` in tests/test_overload_http.py.
"""

from __future__ import annotations

import pytest
import trio
from helpers import prompt, run_request

from interlock import Components, Overloaded, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine
from interlock.wire import PreprocessedRequest, RoutingHints


def request(
    index: int, *, priority: int | None = None, max_tokens: int = 20
) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=f"r{index}",
        token_ids=prompt(40, start=1 + 100 * index),
        max_tokens=max_tokens,
        routing=RoutingHints(priority=priority) if priority is not None else None,
    )


class Peak:
    """The most requests running at once on each engine, sampled at every engine step."""

    def __init__(self, engines: list[MockEngine]) -> None:
        self.peak = {engine.instance_id: 0 for engine in engines}
        for engine in engines:
            engine.add_step_listener(lambda e=engine: self._sample(e))

    def _sample(self, engine: MockEngine) -> None:
        running = engine.running_requests + engine.waiting_requests
        self.peak[engine.instance_id] = max(self.peak[engine.instance_id], running)


async def run_all(pipeline, requests):  # type: ignore[no-untyped-def]
    """Start the requests one after the other (a millisecond apart, so they arrive in order);
    each result is its tokens or the `Overloaded` it raised."""
    results: list[object] = [None] * len(requests)

    async def one(index: int) -> None:
        try:
            results[index] = (await run_request(pipeline, requests[index]))[0]
        except Overloaded as exc:
            results[index] = exc

    async with trio.open_nursery() as nursery:
        for index in range(len(requests)):
            nursery.start_soon(one, index)
            await trio.sleep(0.001)
    return results


async def test_beyond_the_limit_requests_wait_and_beyond_the_queue_they_are_shed(
    autojump_clock: object,
) -> None:
    engines = [MockEngine(0), MockEngine(1)]
    peak = Peak(engines)
    config = PipelineConfig(max_inflight_per_worker=2, max_queued_requests=3)
    async with build_pipeline(config, Components(workers=engines)) as pipeline:
        results = await run_all(pipeline, [request(i) for i in range(12)])
        assert pipeline.queued == 0 and pipeline.in_flight == 0
        assert pipeline.shed == 5
    served = [r for r in results if isinstance(r, list)]
    shed = [r for r in results if isinstance(r, Overloaded)]
    # 2 workers x 2 slots run, 3 wait, the other 5 are answered at once.
    assert len(served) == 7 and len(shed) == 5
    assert all(len(tokens) == 20 for tokens in served)
    assert all("max_queued_requests=3" in str(exc) for exc in shed)
    assert all(exc.retry_after > 0 for exc in shed)
    assert peak.peak == {0: 2, 1: 2}


async def test_the_default_limit_is_what_the_worker_reports(autojump_clock: object) -> None:
    engines = [MockEngine(0, max_num_seqs=3)]
    peak = Peak(engines)
    async with build_pipeline(PipelineConfig(), Components(workers=engines)) as pipeline:
        results = await run_all(pipeline, [request(i) for i in range(10)])
    # Default queue: at least 8, so nothing is shed; the engine never queues itself.
    assert all(isinstance(r, list) for r in results)
    assert peak.peak == {0: 3}


async def test_a_limit_of_zero_turns_admission_control_off(autojump_clock: object) -> None:
    engines = [MockEngine(0, max_num_seqs=2)]
    peak = Peak(engines)
    config = PipelineConfig(max_inflight_per_worker=0, max_queued_requests=0)
    async with build_pipeline(config, Components(workers=engines)) as pipeline:
        results = await run_all(pipeline, [request(i) for i in range(8)])
    assert all(isinstance(r, list) for r in results)
    assert peak.peak == {0: 8}  # running and waiting in the engine itself


async def test_waiting_requests_start_highest_priority_first_then_oldest(
    autojump_clock: object,
) -> None:
    engine = MockEngine(0)
    config = PipelineConfig(max_inflight_per_worker=1, max_queued_requests=10)
    priorities = [None, 0, 0, 5, 1, 5, None]
    async with build_pipeline(config, Components(workers=[engine])) as pipeline:
        await run_all(pipeline, [request(i, priority=p) for i, p in enumerate(priorities)])
        started = [
            record.request_id
            for record in pipeline.transition_log.records()
            if record.trigger == "start_decode"
        ]
    # r0 took the slot at once; then priority 5 (oldest first), 1, then the 0s by age.
    assert started == ["r0", "r3", "r5", "r4", "r1", "r2", "r6"]


async def test_a_sheddable_request_is_refused_at_once_when_every_worker_is_full(
    autojump_clock: object,
) -> None:
    engine = MockEngine(0)
    config = PipelineConfig(max_inflight_per_worker=1, max_queued_requests=10)
    async with build_pipeline(config, Components(workers=[engine])) as pipeline:
        results = await run_all(pipeline, [request(0), request(1, priority=-1)])
        assert isinstance(results[1], Overloaded) and "sheddable" in str(results[1])
        # With room, a sheddable request runs like any other.
        tokens, _ = await run_request(pipeline, request(2, priority=-1))
    assert len(tokens) == 20


async def test_a_request_naming_its_worker_is_not_held_back(autojump_clock: object) -> None:
    engine = MockEngine(0)
    peak = Peak([engine])
    config = PipelineConfig(
        max_inflight_per_worker=1, max_queued_requests=0, allow_request_worker_ids=True
    )
    named = [
        PreprocessedRequest(
            token_ids=prompt(40, start=i * 100 + 1),
            max_tokens=5,
            routing=RoutingHints(backend_instance_id=0),
        )
        for i in range(4)
    ]
    async with build_pipeline(config, Components(workers=[engine])) as pipeline:
        results = await run_all(pipeline, named)
    assert all(isinstance(r, list) for r in results)
    assert peak.peak == {0: 4}


async def test_a_migrating_request_is_not_held_back_by_the_queue(autojump_clock: object) -> None:
    engines = [MockEngine(0, crash_after_tokens=3), MockEngine(1)]
    config = PipelineConfig(
        router_mode="round_robin",
        migration_limit=1,
        max_inflight_per_worker=1,
        max_queued_requests=0,
    )
    async with build_pipeline(config, Components(workers=engines)) as pipeline:
        # Both slots taken; the request on worker 0 breaks and moves onto worker 1's
        # full slot rather than waiting (or being shed): it was admitted already.
        results = await run_all(pipeline, [request(0), request(1)])
        assert pipeline.stats.migrations == 1
    assert [len(r) for r in results if isinstance(r, list)] == [20, 20]


async def test_cancelled_waiters_leave_the_queue_and_pass_their_turn_on(
    autojump_clock: object,
) -> None:
    engine = MockEngine(0)
    config = PipelineConfig(max_inflight_per_worker=1, max_queued_requests=5)
    async with build_pipeline(config, Components(workers=[engine])) as pipeline:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_request, pipeline, request(0, max_tokens=200))
            await trio.sleep(0.01)
            with trio.move_on_after(0.5):
                await run_request(pipeline, request(1))
            assert pipeline.queued == 0
            tokens, _ = await run_request(pipeline, request(2))
        assert pipeline.in_flight == 0 and pipeline.queued == 0
    assert len(tokens) == 20


@pytest.mark.parametrize("bad", [-1, 1.5, "8"])
def test_bad_limits_are_config_errors(bad: object) -> None:
    from interlock import ConfigError

    with pytest.raises(ConfigError, match="max_inflight_per_worker"):
        PipelineConfig(max_inflight_per_worker=bad)  # type: ignore[arg-type]
