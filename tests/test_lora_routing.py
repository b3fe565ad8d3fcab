"""LoRA-aware routing (docs/engines.md#lora-adapters): a request whose ``model`` names a LoRA
adapter goes only to the engines that serve it (their ``/v1/models``), those where it is running
first, then those with room for one more adapter, then those where it waits (llm-d's
``lora-affinity-scorer`` tiers, from ``vllm:lora_requests_info``); a name no engine serves is the
404 of an unknown model, and serving engines outside the request's candidates a 503. The same rule
for the picker and ``interlock serve``: it lives in the router.

The engine's side is read from what a real vLLM 0.32 (CPU) printed with ``--enable-lora
--max-loras 1 --lora-modules ad1=... ad2=...`` (tests/engines/test_vllm_lora.py runs it); the
routing is driven in-process under virtual time through the picker, over mock workers given the
adapters and LoRA state an `OpenAIEngine` would read.
"""

from __future__ import annotations

import functools
import gc
import json
import weakref
from typing import Any

import httpx
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from helpers import prompt
from hypothesis import HealthCheck, given, settings
from test_engine_connections import answer, listening, read_request
from test_gateway_ext_proc import (
    KV,
    body_back,
    chat_body,
    exchange,
    immediate,
    load_is_zero,
    picking,
    request_body,
    request_headers,
    set_headers,
)

from interlock import Components, PipelineConfig, PrefillFailed, build_pipeline
from interlock.actors import AFFINITY, adapter_affinity
from interlock.engines.mock import MockEngine, mock_token_pool
from interlock.engines.openai import EngineMetrics, LoraState, OpenAIEngine, parse_engine_metrics
from interlock.engines.openai._models import adapters_in, model_cards
from interlock.gateway._rewrite import MODEL_REWRITE_HEADERS, model_rewrite
from interlock.http import Preprocessor, build_app, serve_http
from interlock.wire import PreprocessedRequest, WorkerChanged

DESTINATION = "x-gateway-destination-endpoint"

#: ``/metrics`` of vLLM 0.32 (CPU) after requests for ``tiny``, ``ad1``, ``ad2``, ``ad1``: one
#: series per state it was in, the newest (the largest value: when it was set) the state now.
VLLM_LORA_METRICS = """\
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="1",running_lora_adapters="",waiting_lora_adapters=""} 1.7966672305779445e+09
vllm:lora_requests_info{max_lora="1",running_lora_adapters="ad1",waiting_lora_adapters="ad1"} 1.7966672305365744e+09
vllm:lora_requests_info{max_lora="1",running_lora_adapters="ad2",waiting_lora_adapters="ad2"} 1.7966672301543946e+09
"""  # noqa: E501

#: The same engine's ``/v1/models`` (trimmed to the fields read).
VLLM_MODELS = {
    "object": "list",
    "data": [
        {"id": "tiny", "object": "model", "root": "/models/tiny", "parent": None},
        {"id": "ad1", "object": "model", "root": "/adapters/ad1", "parent": "tiny"},
        {"id": "ad2", "object": "model", "root": "/adapters/ad2", "parent": "tiny"},
    ],
}


# -- what an engine says ----------------------------------------------------------------------


def test_the_newest_lora_series_is_the_engines_state_now() -> None:
    lines = VLLM_LORA_METRICS.splitlines()
    assert parse_engine_metrics(VLLM_LORA_METRICS).lora == LoraState(max_loras=1)
    # Without the newest series, the one before it is the state.
    older = "\n".join(lines[:2] + lines[3:])
    assert parse_engine_metrics(older).lora == LoraState(
        max_loras=1, running=frozenset({"ad1"}), waiting=frozenset({"ad1"})
    )
    assert parse_engine_metrics("vllm:num_requests_running 0\n").lora is None


def test_adapter_lists_are_split_at_commas_and_trimmed() -> None:
    text = (
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a, b,,c ",'
        'waiting_lora_adapters=" d"} 5\n'
    )
    lora = parse_engine_metrics(text).lora
    assert lora == LoraState(max_loras=4, running=frozenset("abc"), waiting=frozenset("d"))
    assert not lora.has_room()  # 3 running + 1 waiting = max_loras
    assert LoraState(max_loras=5, running=frozenset("abc"), waiting=frozenset("d")).has_room()
    assert not LoraState().has_room()  # max_loras unknown: no room to count on


def test_the_model_list_gives_the_adapters_not_the_base_model() -> None:
    cards = model_cards(200, json.dumps(VLLM_MODELS).encode())
    assert adapters_in(cards, "tiny") == {"ad1", "ad2"}
    for status, raw in [(200, b"[1]"), (200, b"{"), (500, b"{}"), (200, b'{"data": 3}')]:
        assert model_cards(status, raw) == []


def test_an_adapter_request_is_sent_to_the_engine_as_that_model() -> None:
    """The engine always gets the adapter's name, listed or not (one unloaded since the pick is
    the engine's 404 to give, never its base model's text), and its base model's for None."""
    engine = OpenAIEngine("http://127.0.0.1:9", instance_id=1, model="tiny")
    engine.adapters = frozenset({"ad1"})
    for adapter in ("ad1", "ad2"):
        body = engine.request_body(
            PreprocessedRequest(token_ids=(1, 2), model=adapter), stream=True
        )
        assert body["model"] == adapter
    base = engine.request_body(PreprocessedRequest(token_ids=(1, 2)), stream=True)
    assert base["model"] == "tiny"


async def test_an_engine_sees_adapters_loaded_and_unloaded_at_run_time() -> None:
    """A raw HTTP server standing for a vLLM whose adapters change (``/v1/load_lora_adapter``):
    the engine's ``adapters`` and LoRA state follow its ``/v1/models`` and ``/metrics``, and
    each change is announced (`WorkerChanged`: the admission queue's pools changed)."""
    cards: list[dict[str, Any]] = [{"id": "tiny", "parent": None}]
    metrics = ['vllm:lora_requests_info{max_lora="2",running_lora_adapters=""} 1']
    listed_send, listed = trio.open_memory_channel[None](100)

    async def handler(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        async with stream:
            while (head := await read_request(stream, buffer)) is not None:
                line = head.split(b"\r\n", 1)[0]
                if line.startswith(b"GET /health"):
                    await stream.send_all(answer("200 OK", b""))
                elif line.startswith(b"GET /metrics"):
                    await stream.send_all(answer("200 OK", "\n".join(metrics).encode(), "text"))
                elif line.startswith(b"GET /v1/models"):
                    await stream.send_all(answer("200 OK", json.dumps({"data": cards}).encode()))
                    listed_send.send_nowait(None)
                else:
                    await stream.send_all(answer("404 Not Found", b"{}"))

    async def listed_twice() -> None:
        # The engine asks again only once it has read the answer before.
        for _ in range(2):
            await listed.receive()

    async with trio.open_nursery() as nursery, listening(handler) as url:
        engine = OpenAIEngine(url, instance_id=1, model="tiny", health_interval=0.001)
        await nursery.start(engine.run)
        assert engine.adapters == frozenset()
        changes: list[Any] = []
        engine.add_listener(lambda e: changes.append(e) if isinstance(e, WorkerChanged) else None)
        cards.append({"id": "ad1", "parent": "tiny"})
        metrics.append('vllm:lora_requests_info{max_lora="2",running_lora_adapters="ad1"} 2')
        with trio.fail_after(30):
            await listed_twice()
        assert engine.adapters == {"ad1"} and changes == [WorkerChanged(1)]
        assert engine.metrics is not None and engine.metrics.lora == LoraState(
            max_loras=2, running=frozenset({"ad1"})
        )
        del cards[1]
        with trio.fail_after(30):
            await listed_twice()
        assert engine.adapters == frozenset() and changes == [WorkerChanged(1)] * 2
        nursery.cancel_scope.cancel()


# -- the rewrite header --------------------------------------------------------------------------


def test_llm_ds_rewrite_header_is_read_first_and_an_empty_one_rewrites_nothing() -> None:
    new, old = MODEL_REWRITE_HEADERS
    assert new == "x-llm-d-model-name-rewrite"
    assert model_rewrite({old: "a"}) == "a"
    assert model_rewrite({new: "b"}) == "b"
    assert model_rewrite({new: "b", old: "a"}) == "b"
    # llm-d takes the first header present, even empty: no rewrite, the old one not read.
    assert model_rewrite({new: "", old: "a"}) is None
    assert model_rewrite({}) is None


async def test_the_llm_d_header_rewrites_the_body_to_an_adapter_and_picks_its_engine(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        serve(p, {2: "ad1"})
        headers = request_headers(extra=[("x-llm-d-model-name-rewrite", "ad1")])
        for _ in range(3):
            answers = await exchange(p.picker, [headers, request_body(chat_body(), True)])
            assert set_headers(answers[0], "request_headers")[DESTINATION] == p.endpoint(2)
            assert json.loads(body_back(answers)[0])["model"] == "ad1"
        assert await load_is_zero(p.pipeline)


# -- the pick --------------------------------------------------------------------------------------


def serve(p: Any, adapters: dict[int, str], states: dict[int, LoraState] | None = None) -> None:
    """Give the picker's mock workers the adapters (and LoRA state) an `OpenAIEngine` reads
    from a vLLM's /v1/models and /metrics."""
    for worker in p.workers:
        names = adapters.get(worker.instance_id, "")
        worker.adapters = frozenset(n for n in names.split(",") if n)
        lora = (states or {}).get(worker.instance_id)
        worker.metrics = EngineMetrics(lora=lora) if lora is not None else None


def adapter_body(model: str = "ad1") -> Any:
    return request_body(chat_body(model=model), True)


def pick_record(p: Any, request_id: str) -> Any:
    records = [r for r in p.pipeline.transition_log.records() if r.request_id == request_id]
    decision = next(r.decision for r in records if r.decision is not None)
    return decision.selections[-1]


async def test_an_adapter_goes_only_where_it_is_served_and_the_record_says_why(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        serve(p, {1: "ad1,ad2", 3: "ad1"})
        for n in range(6):
            headers = request_headers(extra=[("x-request-id", f"r{n}")])
            answers = await exchange(p.picker, [headers, adapter_body()])
            # The pick and its fallbacks: serving engines only.
            destination = set_headers(answers[0], "request_headers")[DESTINATION]
            assert set(destination.split(",")) <= {p.endpoint(1), p.endpoint(3)}
        record = pick_record(p, "r0")
        assert record.inputs["lora"] == {"adapter": "ad1", "tiers": {"1": "full", "3": "full"}}
        assert "LoRA adapter 'ad1'" in record.reason
        # The base model's requests may still go anywhere.
        headers = request_headers(extra=[("x-request-id", "base")])
        await exchange(p.picker, [headers, request_body(chat_body(), True)])
        record = pick_record(p, "base")
        assert {c.worker_id for c in record.candidates} == {1, 2, 3}
        assert "lora" not in record.inputs
        assert await load_is_zero(p.pipeline)


async def test_an_unserved_name_is_404_and_serving_engines_outside_the_subset_503(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        serve(p, {3: "ad1"})
        status, error = immediate(
            await exchange(p.picker, [request_headers(), adapter_body("ad9")])
        )
        assert status == 404 and error["error"]["code"] == "model_not_found"
        assert "'ad1'" in error["error"]["message"]  # the adapters served are named
        subset = [p.endpoint(1), p.endpoint(2)]
        status, error = immediate(
            await exchange(
                p.picker,
                [request_headers(subset=subset), adapter_body()],
            )
        )
        assert status == 503 and "LoRA adapter 'ad1'" in error["error"]["message"]
        # The engine stops serving it (unloaded): its name is unknown again.
        serve(p, {})
        status, _ = immediate(await exchange(p.picker, [request_headers(), adapter_body()]))
        assert status == 404
        assert await load_is_zero(p.pipeline)


async def test_an_adapter_finds_its_own_kv_overlap_and_never_the_base_models(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Approximate KV mode: the index learns where prompts went from the picks themselves,
    # keyed by the adapter's salt (`kv_salt`) as a real vLLM keys its blocks.
    async with picking(KV.evolve(kv_events=False)) as p:
        serve(p, {1: "ad1", 2: "ad1", 3: "ad1"})
        text = "a long shared prompt " * 40

        async def pick(request_id: str, model: str = "mock") -> Any:
            ask = request_headers(extra=[("x-request-id", request_id)])
            await exchange(p.picker, [ask, request_body(chat_body(text, model=model), True)])
            return pick_record(p, request_id)

        base = (await pick("warm")).chosen
        assert [c.worker_id for c in (await pick("base-again")).candidates if c.overlap_blocks] == [
            base
        ]
        first = await pick("adapter", "ad1")
        # The base model's blocks are not the adapter's: no overlap, weight kept.
        assert all(c.overlap_blocks == 0 for c in first.candidates), (base, first)
        assert first.inputs["kv"]["overlap_score_weight"] == 1.0
        again = await pick("adapter-again", "ad1")
        assert [c.worker_id for c in again.candidates if c.overlap_blocks] == [first.chosen]
        assert again.chosen == first.chosen
        if first.chosen != base:
            # And the base model's requests never see the adapter's blocks.
            last = await pick("base-last")
            assert [c.worker_id for c in last.candidates if c.overlap_blocks] == [base]


async def test_a_full_engine_running_the_adapter_yields_to_one_with_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    running = LoraState(max_loras=2, running=frozenset({"ad1", "x"}))
    room = LoraState(max_loras=2, running=frozenset({"y"}))
    async with picking(KV.evolve(max_inflight_per_worker=1)) as p:
        serve(p, {1: "ad1", 2: "ad1"}, {1: running, 2: room})
        # One request in flight on engine 1 fills it (one slot).
        held = PreprocessedRequest(token_ids=(1, 2, 3), request_id="held", model="ad1")
        decision = await p.pipeline.query(held, book=True, admit=True)
        assert decision.decode_worker_id == 1
        headers = request_headers(extra=[("x-request-id", "next")])
        # Virtual time: queued behind engine 1 (the wrong answer) fails here, not hangs.
        with trio.fail_after(60):
            answers = await exchange(p.picker, [headers, adapter_body()])
        assert set_headers(answers[0], "request_headers")[DESTINATION] == p.endpoint(2)
        assert pick_record(p, "next").reason.startswith("LoRA adapter 'ad1' room on [2]")
        p.pipeline.free("held")
        assert await load_is_zero(p.pipeline)


_STATES = st.builds(
    LoraState,
    max_loras=st.none() | st.integers(min_value=0, max_value=3),
    running=st.frozensets(st.sampled_from(["ad1", "x", "y"]), max_size=3),
    waiting=st.frozensets(st.sampled_from(["ad1", "x", "z"]), max_size=3),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    served=st.lists(st.booleans(), min_size=3, max_size=3),
    states=st.lists(st.none() | _STATES, min_size=3, max_size=3),
)
async def test_the_pick_is_a_serving_engine_of_the_best_tier(
    autojump_clock: trio.testing.MockClock,
    served: list[bool],
    states: list[LoraState | None],
) -> None:
    async with picking() as p:
        adapters = {i + 1: "ad1" for i, s in enumerate(served) if s}
        lora = {i + 1: s for i, s in enumerate(states) if s is not None}
        serve(p, adapters, lora)
        headers = request_headers(extra=[("x-request-id", "r")])
        answers = await exchange(p.picker, [headers, adapter_body()])
        if not adapters:
            assert immediate(answers)[0] == 404
            return
        chosen = pick_record(p, "r").chosen
        assert chosen in adapters
        tier = {w: adapter_affinity(p.workers[w - 1], "ad1") for w in adapters}
        assert AFFINITY[tier[chosen]] == max(AFFINITY[t] for t in tier.values())
        destination = set_headers(answers[0], "request_headers")[DESTINATION].split(",")
        assert destination[0] == p.endpoint(chosen)
        # The fallbacks are of the same tier: the others are not candidates.
        assert {tier[int(e.split(":")[0].rsplit(".", 1)[1])] for e in destination} == {tier[chosen]}
        assert await load_is_zero(p.pipeline)


@pytest.mark.parametrize(
    ("state", "tier"),
    [
        (LoraState(max_loras=1, running=frozenset({"ad1"})), "running"),
        (LoraState(max_loras=2, running=frozenset({"x"})), "room"),
        (LoraState(max_loras=1, running=frozenset({"x"}), waiting=frozenset({"ad1"})), "waiting"),
        (LoraState(max_loras=1, running=frozenset({"x"})), "full"),
        (None, "full"),
    ],
)
def test_llm_ds_tiers(state: LoraState | None, tier: str) -> None:
    class Engine:
        metrics = EngineMetrics(lora=state) if state is not None else None

    assert adapter_affinity(Engine(), "ad1") == tier


_RUNNING = LoraState(max_loras=1, running=frozenset({"ad1"}))
_ROOM = LoraState(max_loras=2, running=frozenset({"x"}))
_WAITING = LoraState(max_loras=1, running=frozenset({"x"}), waiting=frozenset({"ad1"}))
_FULL = LoraState(max_loras=1, running=frozenset({"x"}))


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ({1: _WAITING, 2: _ROOM, 3: _RUNNING}, 3),
        ({1: _WAITING, 2: _ROOM, 3: _FULL}, 2),
        ({1: _FULL, 2: _WAITING, 3: _FULL}, 2),
        ({1: _FULL, 2: _FULL, 3: _WAITING}, 3),
    ],
)
async def test_the_tiers_go_running_then_room_then_waiting_then_full(
    autojump_clock: trio.testing.MockClock, states: dict[int, LoraState], expected: int
) -> None:
    """llm-d's order, pinned by literal picks (the property above checks against `AFFINITY`
    itself, so a wrong order there would pass it)."""
    async with picking() as p:
        serve(p, {1: "ad1", 2: "ad1", 3: "ad1"}, states)
        answers = await exchange(p.picker, [request_headers(), adapter_body()])
        assert set_headers(answers[0], "request_headers")[DESTINATION] == p.endpoint(expected)


async def test_an_adapters_pick_teaches_the_approximate_index_no_base_model_blocks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Approximate KV mode learns where prompts went from the picks; an adapter's prompt is
    not the base model's blocks (vLLM hashes them with the adapter's name), so a base-model
    request with the same prompt afterwards finds no overlap it left."""
    async with picking(KV.evolve(kv_events=False)) as p:
        serve(p, {2: "ad1"})
        text = "a long shared prompt " * 40
        ask = request_headers(extra=[("x-request-id", "adapter")])
        await exchange(p.picker, [ask, request_body(chat_body(text, model="ad1"), True)])
        assert pick_record(p, "adapter").chosen == 2
        ask = request_headers(extra=[("x-request-id", "base")])
        await exchange(p.picker, [ask, request_body(chat_body(text), True)])
        record = pick_record(p, "base")
        assert all(c.overlap_blocks == 0 for c in record.candidates), record.candidates


async def test_a_disaggregated_adapter_request_prefills_and_decodes_where_it_is_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Prefill engines 10 (serves ad1, no LoRA state: full), 11 (does not serve it) and 12
    # (runs it); decode engines 1 (does not serve it) and 2 (serves it).
    prefill = [MockEngine(i, role="prefill") for i in (10, 11, 12)]
    decode = [MockEngine(i, role="decode") for i in (1, 2)]
    adapters = {10: "ad1", 12: "ad1", 2: "ad1"}
    for worker in (*prefill, *decode):
        worker.adapters = frozenset(adapters.get(worker.instance_id, "").split(",")) - {""}  # type: ignore[attr-defined]
    prefill[2].metrics = EngineMetrics(lora=_RUNNING)  # type: ignore[attr-defined]
    config = PipelineConfig(router_mode="round_robin")
    async with build_pipeline(
        config, Components(workers=decode, prefill_workers=prefill)
    ) as pipeline:
        for n in range(4):
            request = PreprocessedRequest(token_ids=prompt(64), request_id=f"r{n}", model="ad1")
            decision = await pipeline.query(request)
            assert decision.disaggregated
            assert (decision.prefill_worker_id, decision.decode_worker_id) == (12, 2)
            lora = decision.selections[0].inputs["lora"]
            assert lora == {"adapter": "ad1", "tiers": {"10": "full", "12": "running"}}
        # No prefill engine serves 'ad2': served aggregated where it is served, not prefilled
        # by the base model.
        decode[0].adapters = frozenset({"ad2"})  # type: ignore[attr-defined]
        request = PreprocessedRequest(token_ids=prompt(64), request_id="other", model="ad2")
        decision = await pipeline.query(request)
        assert not decision.disaggregated and decision.decode_worker_id == 1


async def test_an_adapter_of_an_engine_that_came_and_went_since_the_start_is_503_not_404(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The frontend remembers the adapters of every engine it saw registered (it watches the
    pipeline's workers), not only of those there when it started or when it last looked."""
    async with picking() as p:
        late = MockEngine(4)
        late.adapters = frozenset({"ad7"})  # type: ignore[attr-defined]
        await p.pipeline.add_worker(late)
        late.leave()  # away (as an unhealthy `OpenAIEngine`), not removed
        await p.pipeline.membership_settled()
        status, error = immediate(
            await exchange(p.picker, [request_headers(), adapter_body("ad7")])
        )
        assert status == 503, (status, error)
        status, _ = immediate(await exchange(p.picker, [request_headers(), adapter_body("ad8")]))
        assert status == 404


async def test_the_model_endpoints_agree_with_chat_on_an_adapter_only_an_away_engine_serves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``/v1/models`` lists what a request may use now (OpenAI's "currently available", vLLM's
    loaded adapters); ``/v1/models/{name}`` answers what a chat request naming it gets: 200
    while an engine serves it, 503 while only engines away do (retry), 404 once they are
    removed for good."""
    preprocessor = Preprocessor.default()
    base, late = (MockEngine(i, token_pool=mock_token_pool(preprocessor.tokenizer)) for i in (1, 4))
    late.adapters = frozenset({"ad7"})  # type: ignore[attr-defined]
    components = Components(workers=[base, late], tokenizer=preprocessor.tokenizer)
    async with build_pipeline(PipelineConfig(), components) as pipeline:
        app = build_app(pipeline, model="mock", preprocessor=preprocessor)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:

            async def answers() -> tuple[list[str], int, int]:
                listed = (await client.get("/v1/models")).json()["data"]
                looked_up = await client.get("/v1/models/ad7")
                chat = {"model": "ad7", "messages": [{"role": "user", "content": "hi"}]}
                chatted = await client.post("/v1/chat/completions", json={**chat, "max_tokens": 2})
                return [m["id"] for m in listed], looked_up.status_code, chatted.status_code

            assert await answers() == (["mock", "ad7"], 200, 200)
            late.leave()  # away (as an unhealthy `OpenAIEngine`), not removed
            await pipeline.membership_settled()
            assert await answers() == (["mock"], 503, 503)
            error = (await client.get("/v1/models/ad7")).json()["error"]
            assert error["code"] == "no_workers_available" and "'ad7'" in error["message"]
            await pipeline.remove_worker(4, stop=True)
            assert await answers() == (["mock"], 404, 404)


@pytest.mark.parametrize("away_first", [False, True])
async def test_an_adapter_of_an_engine_removed_for_good_is_404_and_the_engine_is_released(
    autojump_clock: trio.testing.MockClock, away_first: bool
) -> None:
    """An engine removed for good (`Pipeline.remove_worker`, as discovery does when its record
    is deleted), routable or away when it goes, is forgotten: its adapters are unknown models
    (404, not a 503 that says to retry forever), and the frontend holds no reference to it
    (engine churn must not grow memory)."""
    async with picking() as p:
        late = MockEngine(7)
        late.adapters = frozenset({"ad7"})  # type: ignore[attr-defined]
        await p.pipeline.add_worker(late)
        if away_first:
            late.leave()
            await p.pipeline.membership_settled()
        await p.pipeline.remove_worker(7, stop=True)
        status, error = immediate(
            await exchange(p.picker, [request_headers(), adapter_body("ad7")])
        )
        assert status == 404, (status, error)
        await trio.testing.wait_all_tasks_blocked()  # its run task ends once cancelled
        gone = weakref.ref(late)
        del late
        gc.collect()
        assert gone() is None, [type(r).__name__ for r in gc.get_referrers(gone())]


@pytest.mark.parametrize("served", [False, True])
async def test_a_pipeline_does_not_keep_an_apps_frontend_alive(
    autojump_clock: trio.testing.MockClock, served: bool
) -> None:
    """An app's frontend follows the pipeline's workers for its whole life, served (its ASGI
    lifespan run, as `serve_http` does) or not (the gateway's picker reads the frontend of an
    app it never serves); the pipeline, which may outlive the app, holds it weakly: once the
    app is gone, so is its frontend, and with it the pipeline's calls to it."""
    preprocessor = Preprocessor.default()
    components = Components(workers=[MockEngine(1)], tokenizer=preprocessor.tokenizer)
    async with build_pipeline(PipelineConfig(), components) as pipeline:
        await trio.testing.wait_all_tasks_blocked()  # the actors have started their watches
        watchers = pipeline._registry._watchers  # the membership's: one more per live frontend
        before = len(watchers)
        app = build_app(pipeline, model="mock", preprocessor=preprocessor)
        frontend = weakref.ref(app.state.frontend)
        assert len(watchers) == before + 1
        if served:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(serve_http, app, "127.0.0.1", 0, shutdown_trigger=stop.wait)
                )
                stop.set()
        del app
        gc.collect()
        assert frontend() is None, [type(r).__name__ for r in gc.get_referrers(frontend())]
        assert len(watchers) == before  # its watch stopped with it
        await pipeline.remove_worker(1, stop=True)  # a change: no call to the frontend gone


async def test_a_pipeline_does_not_keep_an_apps_metrics_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """docs/embedding.md: "a pipeline that outlives its apps neither keeps one alive nor calls
    one that is gone". `build_app` hooks its app's `HttpMetrics` into the pipeline's
    ``queue_time_observers``, and nothing takes it out: every app built over a pipeline that
    outlives it stays alive there (its metrics), and is called for every later request."""
    preprocessor = Preprocessor.default()
    components = Components(workers=[MockEngine(1)], tokenizer=preprocessor.tokenizer)
    async with build_pipeline(PipelineConfig(), components) as pipeline:
        observers = len(pipeline.queue_time_observers)
        app = build_app(pipeline, model="mock", preprocessor=preprocessor)
        metrics = weakref.ref(app.state.metrics)
        del app
        gc.collect()
        assert len(pipeline.queue_time_observers) == observers
        assert metrics() is None, [type(r).__name__ for r in gc.get_referrers(metrics())]


async def test_enforced_disaggregation_without_a_prefill_engine_for_the_adapter_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    decode = MockEngine(1, role="decode")
    decode.adapters = frozenset({"ad1"})  # type: ignore[attr-defined]
    config = PipelineConfig(enforce_disagg=True)
    components = Components(workers=[decode], prefill_workers=[MockEngine(2, role="prefill")])
    async with build_pipeline(config, components) as pipeline:
        request = PreprocessedRequest(token_ids=prompt(64), model="ad1")
        with pytest.raises(PrefillFailed, match="serves the LoRA adapter 'ad1'"):
            await pipeline.query(request)
