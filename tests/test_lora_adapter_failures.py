"""LoRA adapter requests when things go wrong (docs/engines.md#lora-adapters): a bad model, an
engine that crashes, leaves, is ejected or unloads the adapter, a named worker without it, a
full engine: never answered by the base model, a 4xx or 503 rather than a 500."""

from __future__ import annotations

import contextlib

import attrs
import pytest
import trio
import trio.testing
from helpers import prompt
from opentelemetry.trace import SpanKind
from test_gateway_ext_proc import (
    KV,
    chat_body,
    exchange,
    immediate,
    picking,
    request_body,
    request_headers,
    set_headers,
)
from test_http_harness import serving
from test_lora_routing import DESTINATION, adapter_body, serve
from test_tracing import traced_app

from interlock import Components, InterlockError, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine
from interlock.engines.openai import OpenAIEngine
from interlock.wire import PreprocessedRequest, RoutingHints

TOKENS = list(range(1, 41))
REQUEST = PreprocessedRequest(token_ids=prompt(40), max_tokens=12)


@pytest.mark.parametrize("model", [["tiny"], {"a": 1}])
async def test_route_with_an_unhashable_model_is_a_4xx_not_a_500(model: object) -> None:
    async with serving(route_api=True) as served, served.client() as client:
        answer = await client.post("/v1/route", json={"token_ids": TOKENS, "model": model})
    assert 400 <= answer.status_code < 500, answer.text


# -- an adapter's request must never reach an engine that does not serve it ----------------------


def _lora_workers(*workers: MockEngine, serving: dict[int, str]) -> list[MockEngine]:
    for worker in workers:
        worker.adapters = frozenset(  # type: ignore[attr-defined]
            n for n in serving.get(worker.instance_id, "").split(",") if n
        )
    return list(workers)


@pytest.mark.parametrize("removed", [False, True], ids=["crashed", "removed"])
async def test_an_adapter_stream_does_not_migrate_to_an_engine_without_the_adapter(
    autojump_clock: object, removed: bool
) -> None:
    # Engine 1, the only one serving 'ad1', crashes after 5 tokens (or is removed, as a drain
    # or discovery does, while the stream is open).
    first = MockEngine(1, crash_after_tokens=None if removed else 5)
    workers = _lora_workers(first, MockEngine(2), serving={1: "ad1"})
    request = attrs.evolve(REQUEST, model="ad1")
    async with build_pipeline(
        PipelineConfig(migration_limit=1), Components(workers=workers)
    ) as pipeline:
        outputs = 0
        with contextlib.suppress(InterlockError):
            async for _ in pipeline.generate(request):
                outputs += 1
                if removed and outputs == 1:
                    await pipeline.remove_worker(1, stop=True)
        records = pipeline.transition_log.records("req-0")
    routed = [r.decision.decode_worker_id for r in records if r.trigger == "route" and r.decision]
    # Expected: the stream fails (no engine serves 'ad1' any more), never continued by engine 2.
    assert routed == [1], routed


def test_an_adapter_unloaded_after_the_pick_is_not_sent_as_the_base_model() -> None:
    engine = OpenAIEngine("http://127.0.0.1:9", instance_id=1, model="tiny")
    engine.adapters = frozenset({"ad1"})
    request = PreprocessedRequest(token_ids=(1, 2), model="ad1")
    # The router picked this engine for 'ad1'; then its next scrape reads /v1/models without it.
    engine.adapters = frozenset()
    assert engine.request_body(request, stream=True)["model"] == "ad1"


async def test_an_adapter_whose_engine_is_away_is_503_not_404(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        serve(p, {3: "ad1"})
        answers = await exchange(p.picker, [request_headers(), adapter_body()])
        assert set_headers(answers[0], "request_headers")[DESTINATION] == p.endpoint(3)
        # Engine 3 leaves routing for a while (as an `OpenAIEngine` whose health check fails).
        p.workers[2].leave()
        await p.pipeline.membership_settled()
        status, error = immediate(await exchange(p.picker, [request_headers(), adapter_body()]))
        assert status == 503, (status, error)


async def test_an_adapter_whose_engines_are_all_ejected_goes_to_an_ejected_one_as_documented(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """docs/engines.md#lora-adapters: every serving engine ejected is not "none left" (503):
    as for any request, the router uses an ejected one (panic mode), and still only one that
    serves the adapter (the review found the doc promising a 503; the doc was wrong)."""
    async with picking(KV.evolve(outlier_failures=1, outlier_ejection_time=600)) as p:
        serve(p, {3: "ad1"})
        p.pipeline.report_failed_stream(3)  # engine 3, the only one serving 'ad1', is ejected
        assert 3 in await p.pipeline.worker_states()
        answers = await exchange(p.picker, [request_headers(), adapter_body()])
        picked = set_headers(answers[0], "request_headers")[DESTINATION]
        assert picked == p.endpoint(3), picked


async def test_an_adapter_request_waiting_for_its_engine_does_not_block_the_base_model(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking(KV.evolve(max_inflight_per_worker=1)) as p:
        serve(p, {1: "ad1"})
        held = PreprocessedRequest(token_ids=(1, 2, 3), request_id="held", model="ad1")
        decision = await p.pipeline.query(held, book=True, admit=True)
        assert decision.decode_worker_id == 1  # engine 1, the only one with 'ad1', is full
        async with trio.open_nursery() as nursery:
            # An 'ad1' request waits for engine 1 (rightly: engines 2 and 3 do not serve it).
            waiting = request_headers(extra=[("x-request-id", "ad1-waits")])
            nursery.start_soon(exchange, p.picker, [waiting, adapter_body()])
            await trio.testing.wait_all_tasks_blocked()
            # A base-model request: engines 2 and 3 have room.
            base = request_headers(extra=[("x-request-id", "base")])
            with trio.fail_after(60):
                answers = await exchange(p.picker, [base, request_body(chat_body(), True)])
            destination = set_headers(answers[0], "request_headers")[DESTINATION]
            assert destination.split(",")[0] in {p.endpoint(2), p.endpoint(3)}
            p.pipeline.free("held")
            nursery.cancel_scope.cancel()


async def test_a_named_worker_without_the_adapter_is_refused_for_the_adapter(
    autojump_clock: object,
) -> None:
    workers = _lora_workers(MockEngine(1), MockEngine(2), serving={1: "ad1"})
    request = attrs.evolve(REQUEST, model="ad1", routing=RoutingHints(backend_instance_id=2))
    async with build_pipeline(
        PipelineConfig(routing="direct_to_known"), Components(workers=workers)
    ) as pipeline:
        with pytest.raises(InterlockError) as info:
            async for _ in pipeline.generate(request):
                pass
    assert "ad1" in str(info.value), str(info.value)


async def test_an_adapter_request_is_traced_under_the_adapters_name(
    autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(MockEngine, "adapters", frozenset({"ad1"}), raising=False)
    async with traced_app() as (client, exporter, _):
        answer = await client.post(
            "/v1/chat/completions",
            json={"model": "ad1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert answer.status_code == 200 and answer.json()["model"] == "ad1"
        spans = exporter.get_finished_spans()
    server = next(s for s in spans if s.kind == SpanKind.SERVER)
    legs = [s.name for s in spans if s.kind == SpanKind.CLIENT]
    assert (server.attributes or {})["gen_ai.request.model"] == "ad1"
    assert legs == ["chat ad1"], legs


async def test_a_queued_adapter_request_is_not_routed_to_an_engine_without_the_adapter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking(KV.evolve(max_inflight_per_worker=1)) as p:
        serve(p, {1: "ad1"})
        held = PreprocessedRequest(token_ids=(1, 2, 3), request_id="held", model="ad1")
        assert (await p.pipeline.query(held, book=True, admit=True)).decode_worker_id == 1
        answers: list[object] = []

        async def ask() -> None:
            waiting = request_headers(extra=[("x-request-id", "ad1-waits")])
            answers.extend(await exchange(p.picker, [waiting, adapter_body()]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            assert not answers  # queued behind engine 1, the only one serving 'ad1'
            # Engine 1 leaves (its health check fails, a drain, discovery).
            await p.pipeline.remove_worker(1)
            p.pipeline.free("held")
        if not answers[0].HasField("immediate_response"):  # type: ignore[attr-defined]
            picked = set_headers(answers[0], "request_headers")[DESTINATION]
            pytest.fail(f"the 'ad1' request was sent to {picked}, which does not serve 'ad1'")
        assert immediate(answers)[0] == 503
