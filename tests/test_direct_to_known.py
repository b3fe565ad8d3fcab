"""routing='direct_to_known' (REQ 2): requests go to the workers they name; no selection."""

from __future__ import annotations

import pytest
from helpers import prompt, run_request

from interlock import (
    Components,
    PipelineConfig,
    PrefillFailed,
    RequestError,
    build_pipeline,
)
from interlock.engines.mock import MockEngine
from interlock.testing import check_invariants
from interlock.wire import PreprocessedRequest, RoutingHints

DIRECT = PipelineConfig(routing="direct_to_known")


def _to(**hints: int) -> PreprocessedRequest:
    return PreprocessedRequest(token_ids=prompt(), max_tokens=4, routing=RoutingHints(**hints))


async def test_each_request_runs_on_the_worker_it_names(autojump_clock: object) -> None:
    workers = [MockEngine(i) for i in (1, 2, 3)]
    async with build_pipeline(DIRECT, Components(workers=workers)) as pipeline:
        for target in (3, 3, 1):
            await run_request(pipeline, _to(backend_instance_id=target))
        records = pipeline.transition_log.records()
    assert [w.requests_started for w in workers] == [1, 0, 2]
    routes = [r.decision for r in records if r.trigger == "route"]
    assert all(s.policy == "preselected" for d in routes for s in d.selections), (
        "a selection policy ran in direct_to_known mode"
    )


async def test_decode_worker_id_names_the_worker_too(autojump_clock: object) -> None:
    workers = [MockEngine(1), MockEngine(2)]
    async with build_pipeline(DIRECT, Components(workers=workers)) as pipeline:
        await run_request(pipeline, _to(decode_worker_id=2))
    assert [w.requests_started for w in workers] == [0, 1]


async def test_named_prefill_worker_runs_the_prefill_leg(autojump_clock: object) -> None:
    decode = [MockEngine(1, role="decode"), MockEngine(2, role="decode")]
    prefill = [MockEngine(5, role="prefill"), MockEngine(6, role="prefill")]
    components = Components(workers=decode, prefill_workers=prefill)
    async with build_pipeline(DIRECT, components) as pipeline:
        tokens, _ = await run_request(pipeline, _to(prefill_worker_id=6, decode_worker_id=2))
        path = pipeline.transition_log.path("req-0")
    assert len(tokens) == 4
    assert [e.requests_started for e in (*decode, *prefill)] == [0, 1, 0, 1]
    assert "prefilling" in path and "prefilled" in path


async def test_missing_worker_id_names_the_field(autojump_clock: object) -> None:
    async with build_pipeline(DIRECT, Components(workers=[MockEngine(1)])) as pipeline:
        with pytest.raises(RequestError) as info:
            await run_request(pipeline, PreprocessedRequest(token_ids=prompt()))
        assert info.value.field == "backend_instance_id"
        with pytest.raises(RequestError) as info:
            await pipeline.query(PreprocessedRequest(token_ids=prompt()))
        assert info.value.field == "backend_instance_id"


@pytest.mark.parametrize(
    ("hints", "field"),
    [
        ({"backend_instance_id": 99}, "backend_instance_id"),
        ({"decode_worker_id": 99}, "decode_worker_id"),
        ({"backend_instance_id": 1, "prefill_worker_id": 99}, "prefill_worker_id"),
        # A prefill worker named as the decode worker is unknown in that role.
        ({"backend_instance_id": 5}, "backend_instance_id"),
    ],
)
async def test_unknown_worker_id_names_the_field_and_disturbs_nothing(
    autojump_clock: object, hints: dict[str, int], field: str
) -> None:
    workers = [MockEngine(1)]
    prefill = [MockEngine(5, role="prefill")]
    async with build_pipeline(
        DIRECT, Components(workers=workers, prefill_workers=prefill)
    ) as pipeline:
        with pytest.raises(RequestError) as info:
            await run_request(pipeline, _to(**hints))
        assert info.value.field == field
        assert str(hints[field]) in str(info.value)
        assert workers[0].requests_started == prefill[0].requests_started == 0
        assert await pipeline.load() == {}
        tokens, _ = await run_request(pipeline, _to(backend_instance_id=1))
        assert len(tokens) == 4
        check_invariants(pipeline.transition_log)


async def test_failed_named_prefill_worker_fails_the_request(autojump_clock: object) -> None:
    decode = [MockEngine(1, role="decode")]
    prefill = [MockEngine(5, role="prefill")]
    prefill[0].refuse_new()
    components = Components(workers=decode, prefill_workers=prefill)
    async with build_pipeline(DIRECT, components) as pipeline:
        with pytest.raises(PrefillFailed, match="does not change the caller's plan"):
            await run_request(pipeline, _to(prefill_worker_id=5, decode_worker_id=1))
        assert decode[0].requests_started == 0
        assert pipeline.transition_log.path("req-0")[-1] == "failed"


async def test_enforce_disagg_requires_a_named_prefill_worker(autojump_clock: object) -> None:
    config = DIRECT.evolve(enforce_disagg=True)
    async with build_pipeline(config, Components(workers=[MockEngine(1)])) as pipeline:
        with pytest.raises(RequestError) as info:
            await run_request(pipeline, _to(backend_instance_id=1))
    assert info.value.field == "prefill_worker_id"
