"""Gray failures: a worker that stops making progress without closing anything.

A stream with no first token within ``first_token_timeout``, or no output for
``engine_idle_timeout`` after it, is stalled: it migrates like a crashed stream (each token
exactly once), and the router leaves the worker out of routing for ``outlier_ejection_time``
(Envoy-style outlier ejection), so new requests stop going to it. A client's bad request never
counts against a worker. The real-process versions (SIGSTOP of an `interlock worker`, of a
vLLM's engine core) are in tests/test_remote_workers_heartbeat.py and tests/engines/.
"""

from __future__ import annotations

import pytest
import trio
from helpers import prompt, run_request

from interlock import (
    Components,
    Pipeline,
    PipelineConfig,
    RequestError,
    WorkerGone,
    WorkerStalled,
    build_pipeline,
)
from interlock.actors import OutlierEjector
from interlock.engines.mock import MockEngine
from interlock.testing import check_invariants
from interlock.wire import PreprocessedRequest

REQUEST = PreprocessedRequest(token_ids=prompt(40), max_tokens=12)
FAST = PipelineConfig(
    router_mode="round_robin",
    migration_limit=1,
    first_token_timeout=3.0,
    engine_idle_timeout=2.0,
    outlier_ejection_time=30.0,
)


async def _unbroken_tokens() -> list[int]:
    async with build_pipeline(PipelineConfig(), Components(workers=[MockEngine(99)])) as p:
        return (await run_request(p, REQUEST))[0]


async def _stall_after_tokens(
    engine: MockEngine, pipeline: Pipeline, tokens: int, *, seconds: float = 86_400
) -> list[int]:
    """Run REQUEST on ``pipeline``, stalling ``engine`` for ``seconds`` once ``tokens``
    arrived."""
    received: list[int] = []
    stalled = False
    async for output in pipeline.generate(REQUEST):
        received.extend(output.token_ids)
        if len(received) >= tokens and not stalled:
            engine.stall(seconds)
            stalled = True
    return received


async def test_a_stream_whose_worker_freezes_mid_stream_migrates_with_every_token_once(
    autojump_clock: object,
) -> None:
    expected = await _unbroken_tokens()
    frozen, healthy = MockEngine(0), MockEngine(1)
    async with build_pipeline(FAST, Components(workers=[frozen, healthy])) as pipeline:
        started = trio.current_time()
        received = await _stall_after_tokens(frozen, pipeline, 4)
        took = trio.current_time() - started
        records = pipeline.transition_log.records("req-0")
        assert pipeline.stats.stalls == 1
    assert received == expected
    migrate = next(r for r in records if r.trigger == "migrate")
    assert migrate.worker_id == 0
    assert "made no progress" in migrate.detail
    # Caught by the inter-token deadline, not the client's patience.
    assert took < FAST.engine_idle_timeout + 5
    check_invariants(records, migration_limit=1)


async def test_no_first_token_within_first_token_timeout_is_a_stall(
    autojump_clock: object,
) -> None:
    expected = await _unbroken_tokens()
    frozen, healthy = MockEngine(0), MockEngine(1)
    frozen.stall(86_400)
    async with build_pipeline(FAST, Components(workers=[frozen, healthy])) as pipeline:
        tokens, _ = await run_request(pipeline, REQUEST)
        records = pipeline.transition_log.records("req-0")
    assert tokens == expected
    assert [r.worker_id for r in records if r.trigger == "migrate"] == [0]


async def test_without_migration_a_stall_fails_the_request_with_worker_stalled(
    autojump_clock: object,
) -> None:
    frozen = MockEngine(0)
    frozen.stall(86_400)
    config = FAST.evolve(migration_limit=0)
    async with build_pipeline(config, Components(workers=[frozen])) as pipeline:
        with pytest.raises(WorkerStalled, match=r"first_token_timeout=3\.0") as info:
            await run_request(pipeline, REQUEST)
    assert isinstance(info.value, WorkerGone)
    assert info.value.worker_id == 0


async def test_a_stalled_worker_gets_no_new_requests_until_its_ejection_ends(
    autojump_clock: object,
) -> None:
    frozen, healthy = MockEngine(0), MockEngine(1)
    async with build_pipeline(FAST, Components(workers=[frozen, healthy])) as pipeline:
        await _stall_after_tokens(frozen, pipeline, 2, seconds=10)
        ejected = await pipeline.worker_states()
        assert set(ejected) == {0} and 0 < ejected[0] <= 30.0
        chosen = []
        for _ in range(6):
            await run_request(pipeline, REQUEST)
            last = pipeline.transition_log.records(f"req-{len(chosen) + 1}")
            chosen.append(next(r.worker_id for r in last if r.trigger == "route"))
        assert chosen == [1] * 6, "round robin skips the ejected worker"
        await trio.sleep(31)
        assert await pipeline.worker_states() == {}
        routed = set()
        for index in range(7, 11):
            await run_request(pipeline, REQUEST)
            last = pipeline.transition_log.records(f"req-{index}")
            routed.add(next(r.worker_id for r in last if r.trigger == "route"))
        assert routed == {0, 1}


async def test_a_worker_that_leaves_and_rejoins_while_ejected_stays_ejected(
    autojump_clock: object,
) -> None:
    # A frozen engine's health check times out too, so it flaps out of and back into
    # membership: that must not wipe its ejection.
    frozen, healthy = MockEngine(0), MockEngine(1)
    async with build_pipeline(FAST, Components(workers=[frozen, healthy])) as pipeline:
        await _stall_after_tokens(frozen, pipeline, 2, seconds=10)
        assert set(await pipeline.worker_states()) == {0}
        frozen.leave()
        await trio.sleep(1)
        frozen.rejoin()
        await trio.sleep(1)
        ejected = await pipeline.worker_states()
        assert set(ejected) == {0} and 0 < ejected[0] < 30.0
        for index in range(1, 5):
            await run_request(pipeline, REQUEST)
            last = pipeline.transition_log.records(f"req-{index}")
            assert next(r.worker_id for r in last if r.trigger == "route") == 1
        await trio.sleep(31)
        assert await pipeline.worker_states() == {}


async def test_when_every_worker_is_ejected_the_router_still_uses_them(
    autojump_clock: object,
) -> None:
    only = MockEngine(0)
    config = FAST.evolve(migration_limit=0)
    async with build_pipeline(config, Components(workers=[only])) as pipeline:
        only.stall(5)
        with pytest.raises(WorkerStalled):
            await run_request(pipeline, REQUEST)
        assert set(await pipeline.worker_states()) == {0}
        await trio.sleep(2)  # the stall is over; the ejection is not
        assert set(await pipeline.worker_states()) == {0}
        tokens, final = await run_request(pipeline, REQUEST)
    assert len(tokens) == 12 and final.finish_reason == "length"


async def test_a_clients_bad_request_never_ejects_a_worker(autojump_clock: object) -> None:
    engine = MockEngine(0, max_model_len=64)
    too_long = PreprocessedRequest(token_ids=prompt(100), max_tokens=4)
    async with build_pipeline(FAST, Components(workers=[engine])) as pipeline:
        for _ in range(20):
            with pytest.raises(RequestError):
                await run_request(pipeline, too_long)
        assert await pipeline.worker_states() == {}


async def test_zero_timeouts_and_ejection_time_turn_the_deadlines_off(
    autojump_clock: object,
) -> None:
    frozen = MockEngine(0)
    config = PipelineConfig(
        first_token_timeout=None, engine_idle_timeout=None, outlier_ejection_time=0.0
    )
    async with build_pipeline(config, Components(workers=[frozen])) as pipeline:
        frozen.stall(600)
        tokens, _ = await run_request(pipeline, REQUEST)
        assert pipeline.stats.stalls == 0
        assert trio.current_time() >= 600
    assert len(tokens) == 12


# --- the ejection rules (OutlierEjector, synchronous) ----------------------------------------


def test_a_stall_ejects_at_once_and_broken_streams_after_the_threshold_within_the_window() -> None:
    ejector = OutlierEjector(ejection_time=30.0, failures=3)
    assert ejector.failed(1, 0.0, stalled=True) == 30.0
    assert ejector.is_ejected(1, 29.9) and not ejector.is_ejected(1, 30.0)
    assert ejector.failed(2, 0.0, stalled=False) is None
    assert ejector.failed(2, 10.0, stalled=False) is None
    assert ejector.failed(2, 20.0, stalled=False) == 30.0
    # Failures spread wider than the window never add up to an ejection.
    for second in range(0, 400, 31):
        assert ejector.failed(3, float(second), stalled=False) is None
    assert ejector.ejected(25.0) == {1: 5.0, 2: 25.0}


def test_each_ejection_in_a_row_lasts_longer_and_calm_periods_take_it_back() -> None:
    ejector = OutlierEjector(ejection_time=10.0, failures=5)
    assert ejector.failed(1, 0.0, stalled=True) == 10.0
    # Failures while ejected are old news (streams opened before the ejection).
    assert ejector.failed(1, 5.0, stalled=True) is None
    assert ejector.failed(1, 10.0, stalled=True) == 20.0
    assert ejector.failed(1, 30.0, stalled=True) == 30.0
    # Two calm periods after the last ejection ended (at 60): back down by two.
    assert ejector.failed(1, 80.0, stalled=True) == 20.0
    for at in range(100, 1000, 100):
        ejector.failed(1, float(at) + 200, stalled=True)
    assert max(ejector.ejected(1100.0).values(), default=0) <= 100.0
    ejector.forget(1, 2000.0)
    assert ejector.failed(1, 2000.0, stalled=True) == 10.0


def test_a_worker_that_leaves_while_ejected_is_remembered_until_its_ejection_ends() -> None:
    ejector = OutlierEjector(ejection_time=10.0, failures=5)
    assert ejector.failed(1, 0.0, stalled=True) == 10.0
    ejector.forget(1, 4.0)
    assert ejector.is_ejected(1, 9.0)
    ejector.forget(1, 10.0)
    assert ejector.known() == []


def test_an_ejection_time_of_zero_never_ejects() -> None:
    ejector = OutlierEjector(ejection_time=0.0, failures=1)
    assert ejector.failed(1, 0.0, stalled=True) is None
    assert ejector.ejected(0.0) == {}
