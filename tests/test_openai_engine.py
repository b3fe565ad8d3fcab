"""OpenAIEngine: interlock in front of OpenAI-compatible servers over real HTTP on loopback.

The servers are interlock's mock engine behind vLLM's HTTP surface (`serve_mock_openai`), with
the faults a real vLLM shows on the wire; tests/engines/ runs the same behaviours against real
vLLM processes.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
from helpers import qwen3_tokenizer, wait_until

from interlock import (
    Components,
    PipelineConfig,
    RequestError,
    WorkerGone,
    build_pipeline,
)
from interlock.engines.mock import (
    MockEngine,
    MockOpenAIServer,
    MockTiming,
    mock_continuation,
    parse_faults,
    serve_mock_openai,
)
from interlock.engines.mock._kv_publisher import publish_vllm_kv_events
from interlock.engines.openai import KvEventFeed, OpenAIEngine
from interlock.engines.remote import TokenizerMismatch, WorkerMismatch, WorkerUnreachable
from interlock.processing import ByteTokenizer
from interlock.wire import ChatRequest, PreprocessedRequest

PROMPT = tuple(range(40, 140))
ZERO = MockTiming.zero()


@attrs.frozen
class Cluster:
    pipeline: Any
    servers: dict[int, MockOpenAIServer]
    engines: dict[int, OpenAIEngine]


@asynccontextmanager
async def open_cluster(
    config: PipelineConfig,
    *,
    faults: dict[int, str] | None = None,
    roles: Sequence[str] = ("agg", "agg"),
    engine_options: dict[str, Any] | None = None,
    kv_events: bool = False,
) -> AsyncIterator[Cluster]:
    """Mock engines behind vLLM's HTTP surface, ids 1..N, and a pipeline over OpenAIEngines."""
    faults = faults or {}
    async with trio.open_nursery() as nursery:
        feed = None
        if kv_events:
            feed = KvEventFeed("tcp://127.0.0.1:0")
            await nursery.start(feed.run)
        servers: dict[int, MockOpenAIServer] = {}
        replays: dict[int, str | None] = {}
        for index, role in enumerate(roles, start=1):
            mock = MockEngine(index, role, timing=ZERO, keep_block_tokens=kv_events)  # type: ignore[arg-type]
            servers[index] = await nursery.start(
                lambda task_status, m=mock, i=index: serve_mock_openai(
                    m,
                    faults=parse_faults(faults[i]) if i in faults else (),
                    task_status=task_status,
                )
            )
            replays[index] = None
            if feed is not None:
                publisher = await nursery.start(
                    lambda task_status, m=mock: publish_vllm_kv_events(
                        m,
                        feed.endpoint,
                        replay_endpoint="tcp://127.0.0.1:*",
                        task_status=task_status,
                    )
                )
                replays[index] = publisher.replay_endpoint
        engines = {
            i: OpenAIEngine(
                server.url,
                instance_id=i,
                role=server.engine.role,
                block_size=config.kv_block_size,
                health_interval=0.05,
                kv_events=feed,
                kv_replay_endpoint=replays[i],
                **(engine_options or {}),
            )
            for i, server in servers.items()
        }
        workers = [e for e in engines.values() if e.role != "prefill"]
        prefill = [e for e in engines.values() if e.role == "prefill"]
        components = Components(workers=workers, prefill_workers=prefill)
        async with build_pipeline(config, components) as pipeline:
            yield Cluster(pipeline, servers, engines)
        nursery.cancel_scope.cancel()


async def generate(pipeline: Any, request: PreprocessedRequest) -> tuple[list[int], Any]:
    tokens: list[int] = []
    final = None
    async for output in pipeline.generate(request):
        tokens += output.token_ids
        final = output
    return tokens, final


async def test_a_request_runs_on_the_engine_and_its_ids_come_back() -> None:
    async with open_cluster(PipelineConfig(router_mode="round_robin")) as cluster:
        tokens, final = await generate(
            cluster.pipeline, PreprocessedRequest(token_ids=PROMPT, max_tokens=12)
        )
    assert tokens == mock_continuation(PROMPT, 12)
    assert final.finish_reason == "length"
    assert final.usage.prompt_tokens == len(PROMPT)
    assert final.usage.completion_tokens == 12


async def test_frontend_postprocessing_stops_on_a_stop_token_and_the_engine_aborts() -> None:
    expected = mock_continuation(PROMPT, 200)
    stop = expected[5]
    slow = {1: "slow:seconds=0.01", 2: "slow:seconds=0.01"}
    async with open_cluster(PipelineConfig(router_mode="round_robin"), faults=slow) as cluster:
        request = PreprocessedRequest(token_ids=PROMPT, max_tokens=200, stop_token_ids=[stop])
        tokens, final = await generate(cluster.pipeline, request)
        assert tokens == expected[: expected.index(stop)]
        assert final.finish_reason == "stop"
        # The frontend closed the stream early: the engine aborted the rest, freeing the slot.
        await wait_until(lambda: any(s.stats.aborted for s in cluster.servers.values()))
        assert all(s.engine.active_requests == 0 for s in cluster.servers.values())


@pytest.mark.parametrize(
    "fault",
    ["reset:after=3", "eof:after=3", "error:after=3", "http500", "reset:after=0"],
)
async def test_a_broken_stream_migrates_and_every_token_arrives_once(fault: str) -> None:
    config = PipelineConfig(router_mode="round_robin", migration_limit=2)
    async with open_cluster(
        config, faults={1: f"{fault}{',' if ':' in fault else ':'}times=1"}
    ) as cluster:
        results = [
            await generate(cluster.pipeline, PreprocessedRequest(token_ids=PROMPT, max_tokens=10))
            for _ in range(2)
        ]
        assert cluster.pipeline.stats.migrations == 1
    for tokens, final in results:
        assert tokens == mock_continuation(PROMPT, 10)
        assert final.finish_reason == "length"


async def test_without_migration_a_broken_stream_fails_after_the_tokens_that_came() -> None:
    config = PipelineConfig(router_mode="round_robin")
    async with open_cluster(config, faults={1: "eof:after=4", 2: "eof:after=4"}) as cluster:
        tokens: list[int] = []
        # A clean close without the last chunk: what a killed vLLM API server sends.
        with pytest.raises(WorkerGone, match=r"engine [12] at .* after 4 tokens"):
            async for output in cluster.pipeline.generate(
                PreprocessedRequest(token_ids=PROMPT, max_tokens=10)
            ):
                tokens += output.token_ids
    assert tokens == mock_continuation(PROMPT, 10)[:4]


async def test_a_stalled_engine_is_a_broken_stream_after_the_idle_timeout() -> None:
    config = PipelineConfig(router_mode="round_robin", migration_limit=1, engine_idle_timeout=0.5)
    async with open_cluster(config, faults={1: "stall:after=2,times=1"}) as cluster:
        tokens, final = await generate(
            cluster.pipeline, PreprocessedRequest(token_ids=PROMPT, max_tokens=8)
        )
    assert tokens == mock_continuation(PROMPT, 8)
    assert final.finish_reason == "length"


async def test_a_request_the_engine_rejects_is_the_requests_fault() -> None:
    async with open_cluster(PipelineConfig(router_mode="round_robin")) as cluster:
        too_long = PreprocessedRequest(token_ids=PROMPT, max_tokens=40_000)
        with pytest.raises(RequestError, match="rejected the request"):
            await generate(cluster.pipeline, too_long)
        assert cluster.pipeline.stats.migrations == 0


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (PreprocessedRequest(token_ids=PROMPT, detokenize=True, stop=["\ud800"]), "stop"),
        (
            PreprocessedRequest(
                token_ids=PROMPT,
                detokenize=True,
                chat=ChatRequest(
                    messages=[{"role": "user", "content": "hi"}],
                    chat_template_kwargs={"x": math.nan},
                ),
            ),
            "chat",
        ),
        (
            PreprocessedRequest(
                token_ids=PROMPT,
                detokenize=True,
                chat=ChatRequest(messages=[{"role": "user", "content": "hi", "name": "\udc00"}]),
            ),
            "chat",
        ),
    ],
)
async def test_a_request_with_no_json_to_send_is_the_requests_fault(
    request_: PreprocessedRequest, field: str
) -> None:
    # The HTTP frontend refuses these fields; built in-process, they reached the body's
    # encoder, whose UnicodeEncodeError or ValueError came out as if the engine had failed.
    async with open_cluster(PipelineConfig(router_mode="round_robin")) as cluster:
        engine = cluster.engines[1]
        with pytest.raises(RequestError, match="cannot be sent to engine 1") as refused:
            async with engine.open_stream(request_) as stream:
                [output async for output in stream]
        assert refused.value.field == field
        # Nothing was sent; the engine serves the next request.
        async with engine.open_stream(PreprocessedRequest(token_ids=PROMPT, max_tokens=3)) as s:
            assert [t for o in [o async for o in s] for t in o.token_ids] == mock_continuation(
                PROMPT, 3
            )


async def test_prefill_and_decode_legs_hand_over_kv_transfer_params_verbatim() -> None:
    config = PipelineConfig(router_mode="round_robin")
    async with open_cluster(config, roles=("decode", "prefill")) as cluster:
        request = PreprocessedRequest(token_ids=PROMPT, max_tokens=6, request_id="pd-1")
        tokens, _ = await generate(cluster.pipeline, request)
        decode, prefill = cluster.servers[1], cluster.servers[2]
        assert cluster.pipeline.stats.disaggregated == 1
        assert tokens == mock_continuation(PROMPT, 6)
        handed = decode.stats.last_kv_transfer_params_received
        assert handed is not None
        assert handed["do_remote_prefill"] is True
        assert handed["remote_engine_id"] == prefill.engine_uuid
        assert "pd-1" in handed["remote_request_id"]


async def test_an_engine_that_stops_answering_health_leaves_routing_and_comes_back() -> None:
    async with open_cluster(PipelineConfig(router_mode="round_robin")) as cluster:
        pipeline, server = cluster.pipeline, cluster.servers[1]
        server.engine.crash()  # /health answers 503 until it restarts
        await wait_until(lambda: 1 not in pipeline.workers)
        # The registry drops it first; the router learns it by message.
        await pipeline.membership_settled()
        for _ in range(3):
            decision = await pipeline.query(PreprocessedRequest(token_ids=PROMPT, max_tokens=2))
            assert decision.decode_worker_id == 2
        server.engine.restart()
        await wait_until(lambda: 1 in pipeline.workers)


async def test_an_engine_with_another_block_size_is_refused_at_start() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_mock_openai(
                MockEngine(1, timing=ZERO, block_size=32), task_status=task_status
            )
        )
        engine = OpenAIEngine(server.url, instance_id=1, block_size=16)
        with pytest.raises(WorkerMismatch, match=r"blocks of 32 tokens.*--kv-block-size 32"):
            await engine.run()
        nursery.cancel_scope.cancel()


async def test_an_engine_with_another_tokenizer_is_refused_at_start() -> None:
    qwen = qwen3_tokenizer()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_mock_openai(
                MockEngine(1, timing=ZERO, tokenizer=ByteTokenizer()), task_status=task_status
            )
        )
        engine = OpenAIEngine(server.url, instance_id=1, tokenizer=qwen)
        with pytest.raises(TokenizerMismatch, match="tokenizes the probe text"):
            await engine.run()
        # The same tokenizer on both sides passes.
        same = OpenAIEngine(server.url, instance_id=1, tokenizer=ByteTokenizer())
        await nursery.start(same.run)
        nursery.cancel_scope.cancel()


async def test_an_engine_that_never_answers_is_unreachable() -> None:
    engine = OpenAIEngine("http://127.0.0.1:9", instance_id=1, connect_timeout=0.3)
    with pytest.raises(WorkerUnreachable, match="did not answer GET /health"):
        await engine.run()


async def test_kv_routing_follows_the_engines_own_kv_events() -> None:
    config = PipelineConfig(router_mode="kv", router_temperature=0.0)
    async with open_cluster(config, kv_events=True) as cluster:
        pipeline = cluster.pipeline
        system = list(range(1000, 1256))  # 16 blocks of 16 shared by both requests
        first = PreprocessedRequest(token_ids=[*system, 1, 2, 3], max_tokens=4)
        await generate(pipeline, first)
        (owner,) = {w for w, e in cluster.servers.items() if e.engine.requests_finished}

        async def indexed() -> bool:
            blocks = await pipeline.kv_blocks()
            return len(blocks.get(owner, ())) >= 16

        with trio.fail_after(10):
            while not await indexed():  # noqa: ASYNC110 (the router answers; no event)
                await trio.sleep(0.01)
        for turn in range(3):
            follow_up = PreprocessedRequest(token_ids=[*system, 7, turn], max_tokens=4)
            decision = await pipeline.query(follow_up)
            assert decision.decode_worker_id == owner
            _, final = await generate(pipeline, follow_up)
            assert final.usage.cached_tokens >= 256
