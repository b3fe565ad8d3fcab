"""``cache_salt`` (vLLM's per-request prefix-cache isolation, docs/http.md): validated at the
edge, sent to HTTP engines and over the worker protocol, honoured by the mock engine (its cache
and its KV events), and routed on: a salted request's overlap is with the blocks of requests
with the same salt only, never with the unsalted blocks of the same tokens (and the reverse).
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gateway_ext_proc import KV as GATEWAY_KV
from test_gateway_ext_proc import (
    exchange,
    immediate,
    load_is_zero,
    picking,
    request_body,
    request_headers,
)
from test_lora_routing import pick_record
from test_openai_engine import open_cluster
from test_whole_answers import pipeline_over, timed

from interlock import (
    Components,
    NoWorkersAvailable,
    PipelineConfig,
    RequestError,
    WorkerRefused,
    build_pipeline,
)
from interlock.actors import replay_selection
from interlock.engines.mock import MockEngine
from interlock.engines.openai import OpenAIEngine
from interlock.http._errors import HttpError
from interlock.http._openai import parse_request
from interlock.kv import kv_salt
from interlock.wire import PreprocessedRequest, RoutingHints
from interlock.wire._frames import Start, decode_body, encode_frame

KV = PipelineConfig(router_mode="kv", router_temperature=0.0)
BLOCK = KV.kv_block_size
SALTS = (None, "tenant-a", "tenant-b")


def prompt(family: int, turn: int = 0) -> list[int]:
    """Requests of one family share 4 blocks; the turn adds a block of its own."""
    return [family * 1000 + i for i in range(4 * BLOCK)] + [500 + turn] * BLOCK


async def run(pipeline: Any, request: PreprocessedRequest) -> tuple[int, int]:
    """Run ``request``; the worker that served it and the prompt tokens it found cached."""
    final = None
    async for output in pipeline.generate(request):
        final = output
    assert final is not None and final.usage is not None
    records = pipeline.transition_log.records(request.request_id)
    worker = next(r.decision for r in records if r.decision is not None).decode_worker_id
    return worker, final.usage.cached_tokens


# -- the request field --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("salt", "why"),
    [
        (1, "must be a non-empty string, got int"),
        ("", "must be a non-empty string, got ''"),
        ("x" * 129, "at most 128 characters"),
        ("a/b", "without '@', '/'"),
        ("a\0b", "or NUL"),
    ],
)
def test_a_bad_cache_salt_is_a_400_naming_the_field(salt: object, why: str) -> None:
    for kind, body in (
        ("completion", {"model": "m", "prompt": "hi"}),
        ("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ):
        with pytest.raises(HttpError) as caught:
            parse_request(kind, {**body, "cache_salt": salt}, max_model_len=100)
        assert caught.value.status == 400 and caught.value.param == "cache_salt"
        assert why in str(caught.value)
    with pytest.raises(RequestError, match=why):
        PreprocessedRequest(token_ids=(1,), cache_salt=salt)  # type: ignore[arg-type]


def test_a_cache_salt_is_parsed_and_sent_to_an_http_engine_on_both_paths() -> None:
    parsed = parse_request(
        "completion", {"model": "m", "prompt": "hi", "cache_salt": "t"}, max_model_len=100
    )
    assert parsed.cache_salt == "t"
    engine = OpenAIEngine("http://127.0.0.1:9", instance_id=1)
    request = PreprocessedRequest(token_ids=(1, 2), cache_salt="t")
    assert engine.request_body(request, stream=True)["cache_salt"] == "t"
    assert "cache_salt" not in engine.request_body(PreprocessedRequest(token_ids=(1,)), stream=True)


# -- the worker protocol ------------------------------------------------------------------


def test_a_cache_salt_travels_in_a_start_frame_and_is_left_out_while_unset() -> None:
    salted = Start(stream=1, request=PreprocessedRequest(token_ids=(1, 2), cache_salt="t"))
    assert decode_body(encode_frame(salted)[4:]) == salted
    plain = msgpack.unpackb(
        encode_frame(Start(stream=1, request=PreprocessedRequest(token_ids=(1,))))[4:]
    )
    assert "cache_salt" not in plain[1]["request"]  # what a version-4 worker decodes


async def test_a_worker_from_before_version_5_is_not_sent_a_salted_request(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("interlock.engines.remote._server.SUPPORTED_VERSIONS", (1, 2, 3, 4))
    async with pipeline_over(timed(1)) as pipeline:
        # Unsalted: served as before.
        await run(pipeline, PreprocessedRequest(token_ids=prompt(0), max_tokens=2, request_id="a"))
        # Salted: the router keeps it off the old worker (it would share the cache), and says
        # why when no other is left.
        salted = PreprocessedRequest(
            token_ids=prompt(0), max_tokens=2, request_id="b", cache_salt="t"
        )
        with pytest.raises(NoWorkersAvailable, match="protocol versions before 5"):
            await run(pipeline, salted)
        # The client's own refusal stays as the backstop, before anything is sent.
        remote = pipeline.workers[1]
        with pytest.raises(WorkerRefused, match="cannot carry cache_salt"):
            async with remote.open_stream(salted):
                pass


# -- routing and the engines' caches ------------------------------------------------------


@settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, max_examples=40
)
@given(
    requests=st.lists(
        st.tuples(st.integers(0, 2), st.sampled_from(SALTS), st.integers(0, 3)),
        min_size=1,
        max_size=12,
    )
)
async def test_salted_and_unsalted_requests_with_the_same_tokens_never_share_overlap(
    autojump_clock: trio.testing.MockClock, requests: list[tuple[int, str | None, int]]
) -> None:
    # Mock engines in process: their KV events reach the router's index; a cache large
    # enough that nothing is evicted, so every earlier request's blocks are still there.
    workers = [MockEngine(i, num_gpu_blocks=4096) for i in range(3)]
    served: dict[int, set[tuple[int, str | None]]] = {w.instance_id: set() for w in workers}
    async with build_pipeline(KV, Components(workers=workers)) as pipeline:
        for n, (family, salt, turn) in enumerate(requests):
            request = PreprocessedRequest(
                token_ids=prompt(family, turn), max_tokens=2, request_id=f"r{n}", cache_salt=salt
            )
            decision = await pipeline.query(request)
            overlaps = {c.worker_id: c.overlap_blocks for c in decision.selections[-1].candidates}
            for worker, blocks in overlaps.items():
                # Overlap exactly where the same family ran with the same salt.
                assert (blocks > 0) == ((family, salt) in served[worker]), (n, worker, served)
            worker, cached = await run(pipeline, request)
            # The engine's cache is as isolated as the index says.
            assert (cached > 0) == ((family, salt) in served[worker]), (n, worker, served)
            served[worker].add((family, salt))


async def test_http_engines_get_the_salt_and_each_tenant_is_routed_to_its_cache() -> None:
    # Real HTTP to mock engines behind vLLM's surface, their ZMQ KV events mirrored into the
    # router's index: the salt reaches the engine (its cache isolates it) and the router.
    config = KV.evolve(allow_request_worker_ids=True)
    async with open_cluster(config, kv_events=True) as cluster:
        pipeline = cluster.pipeline

        async def ask(n: int, salt: str | None, routing: RoutingHints | None = None) -> Any:
            request = PreprocessedRequest(
                token_ids=prompt(0, n),
                max_tokens=2,
                request_id=f"q{n}",
                cache_salt=salt,
                routing=routing,
            )
            return await run(pipeline, request)

        owner, cached = await ask(0, "tenant-a")
        assert cached == 0
        with trio.fail_after(30):
            # The engine's events arrive over ZMQ, on no event of ours: polled.
            while not (await pipeline.kv_blocks()).get(owner):  # noqa: ASYNC110
                await trio.sleep(0.01)
        # The same tokens unsalted, on the very engine that holds them salted: not shared.
        worker, cached = await ask(1, None, RoutingHints(backend_instance_id=owner))
        assert worker == owner and cached == 0
        # The tenant again: routed to its cache, and the engine finds it.
        worker, cached = await ask(2, "tenant-a")
        assert worker == owner and cached == 4 * BLOCK
        _, cached = await ask(3, "tenant-b")
        assert cached == 0


# -- the gateway's picker -------------------------------------------------------------------


async def test_the_picker_looks_a_salted_prompt_up_under_its_salt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Approximate KV mode: the index learns from the picks, under each pick's salt.
    async with picking(GATEWAY_KV.evolve(kv_events=False)) as p:
        text = "a long shared prompt " * 40

        async def pick(request_id: str, salt: str | None) -> Any:
            body: dict[str, Any] = {
                "model": "mock",
                "messages": [{"role": "user", "content": text}],
            }
            if salt is not None:
                body["cache_salt"] = salt
            ask = request_headers(extra=[("x-request-id", request_id)])
            answers = await exchange(p.picker, [ask, request_body(json.dumps(body).encode(), True)])
            return answers

        await pick("a1", "tenant-a")
        first = pick_record(p, "a1").chosen

        def overlapping(request_id: str) -> list[int]:
            return [c.worker_id for c in pick_record(p, request_id).candidates if c.overlap_blocks]

        await pick("plain", None)
        assert overlapping("plain") == []
        await pick("a2", "tenant-a")
        assert overlapping("a2") == [first]
        await pick("b", "tenant-b")
        assert overlapping("b") == []
        status, error = immediate(await pick("bad", ""))
        assert status == 400 and error["error"]["param"] == "cache_salt"
        assert await load_is_zero(p.pipeline)


async def test_a_salted_decision_records_the_salt_it_was_looked_up_under(
    autojump_clock: trio.testing.MockClock,
) -> None:
    workers = [MockEngine(i) for i in range(2)]
    async with build_pipeline(KV, Components(workers=workers)) as pipeline:
        plain = await pipeline.query(PreprocessedRequest(token_ids=prompt(0)))
        salted = await pipeline.query(PreprocessedRequest(token_ids=prompt(0), cache_salt="t"))
    assert "kv_salt" not in plain.selections[0].inputs
    record = salted.selections[0]
    assert record.inputs["kv_salt"] == f"{kv_salt(cache_salt='t'):016x}"
    assert replay_selection(record) == record.chosen
