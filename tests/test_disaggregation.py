"""Disaggregation (REQ 3): decided per request from prefill-worker availability; a failed
prefill leg falls back to aggregated unless enforce_disagg."""

from __future__ import annotations

import pytest
import trio
from helpers import prompt, run_request

from interlock import Components, PipelineConfig, PrefillFailed, build_pipeline
from interlock.engines.mock import MockEngine
from interlock.testing import check_invariants
from interlock.wire import PreprocessedRequest


def _request(n: int = 6) -> PreprocessedRequest:
    return PreprocessedRequest(token_ids=prompt(64), max_tokens=n)


async def test_prefill_leg_runs_with_one_token_then_decode_continues(
    autojump_clock: object,
) -> None:
    decode = [MockEngine(1, role="decode")]
    prefill = [MockEngine(2, role="prefill")]
    async with build_pipeline(
        PipelineConfig(), Components(workers=decode, prefill_workers=prefill)
    ) as pipeline:
        tokens, final = await run_request(pipeline, _request())
        path = pipeline.transition_log.path("req-0")
    assert path == [
        "received", "preprocessed", "routed", "prefilling", "prefilled", "decoding", "done"
    ]  # fmt: skip
    assert prefill[0].tokens_emitted == 1, "the prefill leg must ask for exactly one token"
    assert decode[0].tokens_emitted == 6
    assert tokens == await _aggregated_tokens(6)
    assert final.usage is not None and final.usage.completion_tokens == 6


async def _aggregated_tokens(n: int) -> list[int]:
    config = PipelineConfig()
    async with build_pipeline(config, Components(workers=[MockEngine(9)])) as pipeline:
        return (await run_request(pipeline, _request(n)))[0]


async def test_without_prefill_workers_requests_run_aggregated(autojump_clock: object) -> None:
    async with build_pipeline(PipelineConfig(), Components(workers=[MockEngine(1)])) as pipeline:
        await run_request(pipeline, _request())
        route = next(r for r in pipeline.transition_log if r.trigger == "route")
    assert not route.decision.disaggregated
    assert route.decision.split_reason == "no prefill worker registered"


async def test_split_follows_prefill_workers_joining_and_leaving(autojump_clock: object) -> None:
    prefill = MockEngine(5, role="prefill")
    async with build_pipeline(PipelineConfig(), Components(workers=[MockEngine(1)])) as pipeline:
        await run_request(pipeline, _request())
        await pipeline.add_worker(prefill)
        await trio.testing.wait_all_tasks_blocked()
        await run_request(pipeline, _request())
        prefill.leave()
        await trio.testing.wait_all_tasks_blocked()
        await run_request(pipeline, _request())
        routes = [r.decision for r in pipeline.transition_log if r.trigger == "route"]
    assert [d.disaggregated for d in routes] == [False, True, False]


async def test_failed_prefill_falls_back_to_aggregated(autojump_clock: object) -> None:
    decode = [MockEngine(1, role="decode")]
    prefill = [MockEngine(2, role="prefill")]
    prefill[0].refuse_new()
    async with build_pipeline(
        PipelineConfig(), Components(workers=decode, prefill_workers=prefill)
    ) as pipeline:
        tokens, _ = await run_request(pipeline, _request())
        records = pipeline.transition_log.records("req-0")
        assert pipeline.stats.fallbacks == 1
    assert [r.trigger for r in records] == [
        "preprocess", "route", "start_prefill", "fall_back", "start_decode", "finish"
    ]  # fmt: skip
    fallback = records[3]
    assert not fallback.decision.disaggregated
    assert "refuses" in (fallback.detail or "")
    assert tokens == await _aggregated_tokens(6)
    check_invariants(records)


async def test_prefill_crash_mid_leg_falls_back(autojump_clock: object) -> None:
    decode = [MockEngine(1, role="decode")]
    prefill = [MockEngine(2, role="prefill", crash_after_tokens=1)]
    async with build_pipeline(
        PipelineConfig(), Components(workers=decode, prefill_workers=prefill)
    ) as pipeline:
        tokens, _ = await run_request(pipeline, _request())
    assert len(tokens) == 6
    assert decode[0].requests_started == 1


async def test_enforce_disagg_fails_without_prefill_workers(autojump_clock: object) -> None:
    config = PipelineConfig(enforce_disagg=True)
    async with build_pipeline(config, Components(workers=[MockEngine(1)])) as pipeline:
        with pytest.raises(PrefillFailed, match="no prefill worker"):
            await run_request(pipeline, _request())
        with pytest.raises(PrefillFailed):
            await pipeline.query(_request())
        assert pipeline.transition_log.path("req-0")[-1] == "failed"


async def test_enforce_disagg_fails_when_the_prefill_leg_fails(autojump_clock: object) -> None:
    config = PipelineConfig(enforce_disagg=True)
    decode = [MockEngine(1, role="decode")]
    prefill = [MockEngine(2, role="prefill")]
    prefill[0].refuse_new()
    async with build_pipeline(
        config, Components(workers=decode, prefill_workers=prefill)
    ) as pipeline:
        with pytest.raises(PrefillFailed, match="enforce_disagg=True forbids"):
            await run_request(pipeline, _request())
        assert decode[0].requests_started == 0
        assert await pipeline.load() == {}
