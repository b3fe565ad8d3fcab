"""Migration: a broken stream continues on another worker, each token exactly once, in order."""

from __future__ import annotations

import pytest
from helpers import prompt, run_request

from interlock import (
    Components,
    NoWorkersAvailable,
    PipelineConfig,
    WorkerGone,
    WorkerRefused,
    build_pipeline,
)
from interlock.engines.mock import MockEngine
from interlock.testing import check_invariants
from interlock.wire import PreprocessedRequest

REQUEST = PreprocessedRequest(token_ids=prompt(40), max_tokens=12)


async def _unbroken_tokens() -> list[int]:
    async with build_pipeline(PipelineConfig(), Components(workers=[MockEngine(99)])) as p:
        return (await run_request(p, REQUEST))[0]


async def test_migrated_stream_equals_an_unbroken_one(autojump_clock: object) -> None:
    expected = await _unbroken_tokens()
    workers = [MockEngine(1, crash_after_tokens=5), MockEngine(2)]
    async with build_pipeline(
        PipelineConfig(migration_limit=1), Components(workers=workers)
    ) as pipeline:
        tokens, final = await run_request(pipeline, REQUEST)
        records = pipeline.transition_log.records("req-0")
    assert tokens == expected
    assert final.usage is not None and final.usage.completion_tokens == 12
    migrate = next(r for r in records if r.trigger == "migrate")
    assert migrate.worker_id == 1
    assert migrate.decision.folded_tokens == 5
    assert migrate.decision.request.max_tokens == 7
    assert migrate.decision.request.token_ids == REQUEST.token_ids + tuple(expected[:5])
    reroute = records[records.index(migrate) + 1]
    assert reroute.trigger == "route" and reroute.decision.decode_worker_id == 2
    assert 1 in reroute.decision.selections[0].excluded
    check_invariants(records, migration_limit=1)


async def test_migration_is_bounded_by_the_limit(autojump_clock: object) -> None:
    workers = [MockEngine(i, crash_after_tokens=2) for i in (1, 2, 3)] + [MockEngine(4)]
    async with build_pipeline(
        PipelineConfig(migration_limit=2), Components(workers=workers)
    ) as pipeline:
        received: list[int] = []
        with pytest.raises(WorkerGone) as info:
            async for output in pipeline.generate(REQUEST):
                received.extend(output.token_ids)
        records = pipeline.transition_log.records("req-0")
    assert len(received) == 6, "every token generated before the last break must arrive"
    assert sum(r.trigger == "migrate" for r in records) == 2
    assert records[-1].dst == "failed"
    assert any("migration_limit=2 reached" in note for note in info.value.__notes__)
    check_invariants(records, migration_limit=2)


async def test_without_migration_a_break_reaches_the_caller(autojump_clock: object) -> None:
    workers = [MockEngine(1, crash_after_tokens=3), MockEngine(2)]
    async with build_pipeline(PipelineConfig(), Components(workers=workers)) as pipeline:
        received: list[int] = []
        with pytest.raises(WorkerGone) as info:
            async for output in pipeline.generate(REQUEST):
                received.extend(output.token_ids)
        assert info.value.worker_id == 1
        assert len(received) == 3
        assert await pipeline.load() == {}


async def test_a_refused_new_stream_moves_elsewhere(autojump_clock: object) -> None:
    workers = [MockEngine(1), MockEngine(2)]
    workers[0].refuse_new()
    async with build_pipeline(
        PipelineConfig(migration_limit=1), Components(workers=workers)
    ) as pipeline:
        tokens, _ = await run_request(pipeline, REQUEST)
    assert tokens == await _unbroken_tokens()
    assert workers[1].requests_started == 1


async def test_refusal_without_migration_fails(autojump_clock: object) -> None:
    workers = [MockEngine(1)]
    workers[0].refuse_new()
    async with build_pipeline(PipelineConfig(), Components(workers=workers)) as pipeline:
        with pytest.raises(WorkerRefused):
            await run_request(pipeline, REQUEST)


async def test_max_seq_len_stops_migration(autojump_clock: object) -> None:
    config = PipelineConfig(migration_limit=3, migration_max_seq_len=42)
    workers = [MockEngine(1, crash_after_tokens=4), MockEngine(2)]
    async with build_pipeline(config, Components(workers=workers)) as pipeline:
        with pytest.raises(WorkerGone) as info:
            await run_request(pipeline, REQUEST)
    assert any("migration_max_seq_len=42" in note for note in info.value.__notes__)


async def test_no_worker_left_to_migrate_to(autojump_clock: object) -> None:
    workers = [MockEngine(1, crash_after_tokens=4)]
    async with build_pipeline(
        PipelineConfig(migration_limit=2), Components(workers=workers)
    ) as pipeline:
        with pytest.raises(NoWorkersAvailable):
            await run_request(pipeline, REQUEST)
        assert pipeline.transition_log.path("req-0")[-1] == "failed"


async def test_disaggregated_migration_redoes_prefill(autojump_clock: object) -> None:
    decode = [MockEngine(1, role="decode", crash_after_tokens=3), MockEngine(2, role="decode")]
    prefill = [MockEngine(5, role="prefill")]
    async with build_pipeline(
        PipelineConfig(migration_limit=1), Components(workers=decode, prefill_workers=prefill)
    ) as pipeline:
        tokens, _ = await run_request(pipeline, REQUEST)
        triggers = [r.trigger for r in pipeline.transition_log.records("req-0")]
    assert tokens == await _unbroken_tokens()
    assert triggers.count("start_prefill") == 2
    assert prefill[0].requests_started == 2
