"""routing='query_only' (REQ 2): answer with the prompt tokens and the selected workers; run
nothing, book nothing."""

from __future__ import annotations

import pytest
import trio
from helpers import prompt

from interlock import Components, PipelineConfig, RequestError, build_pipeline
from interlock.engines.mock import MockEngine
from interlock.testing import check_invariants
from interlock.wire import PreprocessedRequest, RoutingHints

QUERY_ONLY = PipelineConfig(routing="query_only")


async def test_aggregated_answer_names_one_worker_for_both_roles(autojump_clock: object) -> None:
    workers = [MockEngine(i) for i in (10, 11, 12)]
    async with build_pipeline(QUERY_ONLY, Components(workers=workers)) as pipeline:
        decisions = [
            await pipeline.query(PreprocessedRequest(token_ids=prompt())) for _ in range(6)
        ]
        load = await pipeline.load()
    assert [d.decode_worker_id for d in decisions] == [10, 11, 12, 10, 11, 12]
    for decision in decisions:
        assert decision.prefill_worker_id == decision.decode_worker_id
        assert not decision.disaggregated
        assert decision.token_ids == tuple(prompt())
    assert all(w.requests_started == 0 for w in workers), "a query-only request executed"
    assert load == {}, "a query-only request booked load"


async def test_disaggregated_answer_names_prefill_and_decode(autojump_clock: object) -> None:
    workers = [MockEngine(1, role="decode"), MockEngine(2, role="decode")]
    prefill = [MockEngine(7, role="prefill")]
    components = Components(workers=workers, prefill_workers=prefill)
    async with build_pipeline(QUERY_ONLY, components) as pipeline:
        decision = await pipeline.query(PreprocessedRequest(token_ids=prompt()))
    assert decision.disaggregated
    assert decision.prefill_worker_id == 7
    assert decision.decode_worker_id in (1, 2)
    assert [s.leg for s in decision.selections] == ["prefill", "decode"]
    assert all(w.requests_started == 0 for w in (*workers, *prefill))


async def test_paths_end_routed_to_done_without_execution(autojump_clock: object) -> None:
    async with build_pipeline(QUERY_ONLY, Components(workers=[MockEngine(1)])) as pipeline:
        for _ in range(3):
            await pipeline.query(PreprocessedRequest(token_ids=prompt()))
        log = pipeline.transition_log
        grouped = check_invariants(log)
        for request_id in grouped:
            assert log.path(request_id) == ["received", "preprocessed", "routed", "done"]


async def test_generate_is_refused(autojump_clock: object) -> None:
    async with build_pipeline(QUERY_ONLY, Components(workers=[MockEngine(1)])) as pipeline:
        with pytest.raises(RequestError, match="query_only") as info:
            async for _ in pipeline.generate(PreprocessedRequest(token_ids=prompt())):
                pass
    assert info.value.field == "routing"


@pytest.mark.parametrize("field", ["backend_instance_id", "prefill_worker_id", "decode_worker_id"])
async def test_worker_ids_in_the_request_are_refused(autojump_clock: object, field: str) -> None:
    hinted = PreprocessedRequest(token_ids=prompt(), routing=RoutingHints(**{field: 1}))
    async with build_pipeline(QUERY_ONLY, Components(workers=[MockEngine(1)])) as pipeline:
        with pytest.raises(RequestError) as info:
            await pipeline.query(hinted)
        assert info.value.field == field
        # Nothing else was disturbed: the next query is answered.
        assert (await pipeline.query(PreprocessedRequest(token_ids=prompt()))).decode_worker_id == 1


@pytest.mark.parametrize("routing", ["query_only", "discover"])
async def test_a_booking_query_cancelled_before_its_answer_leaves_no_load(
    autojump_clock: object, routing: str
) -> None:
    # Cancelled while its Route waits in the disagg actor's mailbox: the router books it on
    # arrival, so the pipeline frees it behind the Route (a gateway dropping its stream).
    workers = [MockEngine(0), MockEngine(1)]
    config = PipelineConfig(routing=routing, router_mode="round_robin")  # type: ignore[arg-type]
    async with build_pipeline(config, Components(workers=workers)) as pipeline:
        for n in range(3):
            request = PreprocessedRequest(token_ids=prompt(40), request_id=f"gone-{n}")
            with trio.CancelScope() as scope:
                scope.cancel()
                await pipeline.query(request, book=True)
            await trio.sleep(1)
            assert await pipeline.load() == {}
        kept = await pipeline.query(PreprocessedRequest(token_ids=prompt(40)), book=True)
        assert set(await pipeline.load()) == {kept.decode_worker_id}


async def test_a_request_cancelled_before_its_route_is_answered_leaves_no_load(
    autojump_clock: object,
) -> None:
    config = PipelineConfig(router_mode="round_robin")
    async with build_pipeline(config, Components(workers=[MockEngine(0)])) as pipeline:
        outputs = pipeline.generate(PreprocessedRequest(token_ids=prompt(40), max_tokens=4))
        with trio.CancelScope() as scope:
            scope.cancel()
            await outputs.__anext__()
        await outputs.aclose()
        await trio.sleep(1)
        assert await pipeline.load() == {}
