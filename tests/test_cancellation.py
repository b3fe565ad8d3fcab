"""Cancelling a request (breaking out, or cancelling the task) stops it on its worker and
frees everything booked for it."""

from __future__ import annotations

import trio
from helpers import prompt

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine
from interlock.testing import check_invariants
from interlock.wire import PreprocessedRequest

LONG = PreprocessedRequest(token_ids=prompt(64), max_tokens=1000)


async def test_breaking_out_frees_the_worker_and_the_load(autojump_clock: object) -> None:
    worker = MockEngine(1)
    async with build_pipeline(PipelineConfig(), Components(workers=[worker])) as pipeline:
        stream = pipeline.generate(LONG)
        received = 0
        async for output in stream:
            received += len(output.token_ids)
            if received == 3:
                break
        await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert worker.active_requests == 0
        assert worker.requests_cancelled == 1
        assert await pipeline.load() == {}
        assert pipeline.in_flight == 0
        assert pipeline.transition_log.path("req-0")[-1] == "cancelled"
        check_invariants(pipeline.transition_log)


async def test_cancelling_the_task_frees_the_worker(autojump_clock: object) -> None:
    worker = MockEngine(1)
    async with build_pipeline(PipelineConfig(), Components(workers=[worker])) as pipeline:
        with trio.move_on_after(0.2):
            async for _ in pipeline.generate(LONG):
                pass
        await trio.testing.wait_all_tasks_blocked()
        assert worker.active_requests == 0
        assert await pipeline.load() == {}
        assert pipeline.stats.cancelled == 1
        assert pipeline.transition_log.path("req-0")[-1] == "cancelled"


async def test_cancelling_during_prefill_never_starts_decode(autojump_clock: object) -> None:
    decode = MockEngine(1, role="decode")
    prefill = MockEngine(2, role="prefill")
    prefill.stall(10.0)
    config = PipelineConfig()
    components = Components(workers=[decode], prefill_workers=[prefill])
    async with build_pipeline(config, components) as pipeline:
        with trio.move_on_after(1.0):
            async for _ in pipeline.generate(LONG):
                pass
        await trio.testing.wait_all_tasks_blocked()
        assert decode.requests_started == 0
        assert prefill.active_requests == 0
        assert pipeline.transition_log.path("req-0")[-2:] == ["prefilling", "cancelled"]
        assert await pipeline.load() == {}


async def test_closing_the_pipeline_ends_open_requests(autojump_clock: object) -> None:
    worker = MockEngine(1)
    outcome: list[BaseException] = []

    async def consume(pipeline: object) -> None:
        try:
            async for _ in pipeline.generate(LONG):  # type: ignore[attr-defined]
                pass
        except BaseException as exc:
            outcome.append(exc)
            raise

    with trio.move_on_after(5):
        async with build_pipeline(PipelineConfig(), Components(workers=[worker])) as pipeline:
            pipeline._nursery.start_soon(consume, pipeline)
            await trio.sleep(0.5)
    assert worker.active_requests == 0
    assert pipeline.in_flight == 0
    assert outcome and isinstance(outcome[0], trio.Cancelled)
    check_invariants(pipeline.transition_log)
