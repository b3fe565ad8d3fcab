"""cache_salt across a fleet and the API's edges: salted requests skip workers too old to carry
the salt, no record holds the raw salt, a salt that is not UTF-8 is a 400 (not a router crash),
/v1/route takes it, and a first block filled while decoding keeps its salt."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from test_http_harness import serving
from test_remote_workers_heartbeat import Worker
from test_route_api import TOKENS

from interlock import (
    Components,
    NoWorkersAvailable,
    PipelineConfig,
    PrefillFailed,
    RequestError,
    build_pipeline,
)
from interlock.engines.mock import MockEngine, MockTiming
from interlock.engines.remote import RemoteEngine
from interlock.kv import kv_salt
from interlock.wire import PreprocessedRequest, RoutingHints


def _old(worker: Worker) -> Worker:
    """``worker`` speaking protocol version 4 at most (a worker from before cache_salt)."""
    handshake = worker.hub._handshake

    async def clamped(conn: Any) -> Any:
        answer = await handshake(conn)
        if answer is None:
            return None
        hello, version, proof = answer
        return hello, min(version, 4), proof

    worker.hub._handshake = clamped
    return worker


@pytest.mark.parametrize("mode", ["kv", "round_robin"])
async def test_salted_requests_in_a_mixed_version_fleet_all_succeed(
    autojump_clock: trio.testing.MockClock, mode: str
) -> None:
    # A rolling upgrade: worker 1 still speaks version 4, worker 2 version 5. Migration off
    # (the default). Every salted request can be served by worker 2. Today: router_mode kv
    # sends every one to worker 1 (the cost ties, the lowest id wins) and all four fail with
    # WorkerRefused (a 503 worker_refused over HTTP); round_robin fails every other one.
    engines = [MockEngine(i, timing=MockTiming(speedup_ratio=1.0)) for i in (1, 2)]
    async with AsyncExitStack() as stack:
        remotes = []
        for engine in engines:
            worker = Worker(engine)
            if engine.instance_id == 1:
                _old(worker)
            worker = await stack.enter_async_context(worker.running())
            remotes.append(
                RemoteEngine(
                    "worker", 1, instance_id=engine.instance_id, open_connection=worker.connect
                )
            )
        pipeline = await stack.enter_async_context(
            build_pipeline(PipelineConfig(router_mode=mode), Components(workers=remotes))
        )
        failures = []
        for n in range(4):
            request = PreprocessedRequest(
                token_ids=tuple(range(1, 65)), max_tokens=2, request_id=f"s{n}", cache_salt="t"
            )
            try:
                async for _ in pipeline.generate(request):
                    pass
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
        assert failures == []


async def test_a_salted_request_with_only_older_workers_names_the_version(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No worker can carry the salt: the router says so (not a worker's refusal at stream
    # open), and a request naming an older worker is a RequestError naming the field.
    engine = MockEngine(1, timing=MockTiming(speedup_ratio=1.0))
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(_old(Worker(engine)).running())
        remote = RemoteEngine("worker", 1, instance_id=1, open_connection=worker.connect)
        pipeline = await stack.enter_async_context(
            build_pipeline(
                PipelineConfig(router_mode="kv", allow_request_worker_ids=True),
                Components(workers=[remote]),
            )
        )
        request = PreprocessedRequest(token_ids=tuple(range(1, 65)), max_tokens=2, cache_salt="t")
        with pytest.raises(NoWorkersAvailable, match="protocol versions before 5"):
            await pipeline.query(request)
        named = attrs.evolve(request, routing=RoutingHints(backend_instance_id=1))
        with pytest.raises(RequestError, match="speaks protocol version 4") as caught:
            await pipeline.query(named)
        assert caught.value.field == "backend_instance_id"
        # Unsalted, the same worker serves.
        async for _ in pipeline.generate(attrs.evolve(request, cache_salt=None)):
            pass


async def test_a_salted_request_skips_an_older_prefill_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Disaggregated: the prefill leg's worker gets the request too, so a version-4 prefill
    # worker is left out as a decode worker would be (enforce_disagg: PrefillFailed).
    engines = [
        MockEngine(1, "decode", timing=MockTiming(speedup_ratio=1.0)),
        MockEngine(2, "prefill", timing=MockTiming(speedup_ratio=1.0)),
    ]
    async with AsyncExitStack() as stack:
        remotes = []
        for engine in engines:
            worker = Worker(engine)
            if engine.role == "prefill":
                _old(worker)
            worker = await stack.enter_async_context(worker.running())
            remotes.append(
                RemoteEngine(
                    "worker",
                    1,
                    instance_id=engine.instance_id,
                    role=engine.role,
                    open_connection=worker.connect,
                )
            )
        pipeline = await stack.enter_async_context(
            build_pipeline(
                PipelineConfig(router_mode="kv", enforce_disagg=True),
                Components(workers=remotes[:1], prefill_workers=remotes[1:]),
            )
        )
        request = PreprocessedRequest(token_ids=tuple(range(1, 65)), max_tokens=2, cache_salt="t")
        with pytest.raises(PrefillFailed, match="no prefill worker is available"):
            await pipeline.query(request)
        unsalted = await pipeline.query(attrs.evolve(request, cache_salt=None))
        assert unsalted.prefill_worker_id == 2


async def test_the_route_api_takes_a_cache_salt() -> None:
    # A salted request served, then routed: the same salt counts its blocks, no salt or
    # another salt none (an unsalted answer would count false overlap).
    config = PipelineConfig(router_mode="kv")
    async with serving(config, route_api=True, workers=2) as served, served.client() as client:
        done = await client.post(
            "/v1/completions",
            json={"model": "mock", "prompt": TOKENS, "max_tokens": 1, "cache_salt": "t"},
        )
        assert done.status_code == 200, done.text

        async def overlap(**salt: str) -> int:
            answer = await client.post("/v1/route", json={"token_ids": TOKENS, **salt})
            assert answer.status_code == 200, answer.text
            blocks: int = answer.json()["overlap_blocks"]
            return blocks

        blocks = len(TOKENS) // config.kv_block_size
        # (The worker's KV events reach the router's mailbox before its answer ends.)
        assert await overlap(cache_salt="t") == blocks > 0
        assert await overlap() == 0
        assert await overlap(cache_salt="u") == 0
        bad = await client.post("/v1/route", json={"token_ids": TOKENS, "cache_salt": "a/b"})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "cache_salt"
        # The same OpenAI-style error body as the completions endpoint's for the same salt.
        refused = await client.post(
            "/v1/completions",
            json={"model": "mock", "prompt": TOKENS, "max_tokens": 1, "cache_salt": "a/b"},
        )
        assert refused.status_code == 400
        assert bad.json() == refused.json()


async def test_no_transition_record_holds_the_raw_cache_salt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A migration of a salted request (its worker crashes mid-stream): the MigrationPlan's
    # request is in the records; docs/routing.md: records name the kv_salt, "never the
    # cache_salt itself".
    secret = "tenant-secret-salt"
    engines = [MockEngine(i, timing=MockTiming(speedup_ratio=1.0)) for i in (1, 2)]
    async with build_pipeline(
        PipelineConfig(router_mode="kv", migration_limit=1), Components(workers=engines)
    ) as pipeline:
        request = PreprocessedRequest(
            token_ids=tuple(range(1, 65)), max_tokens=8, request_id="m", cache_salt=secret
        )
        crashed = False
        async for _ in pipeline.generate(request):
            if not crashed:
                crashed = True
                first = next(
                    r.worker_id
                    for r in pipeline.transition_log.records("m")
                    if r.trigger == "start_decode"
                )
                engines[first - 1].crash()
        records = pipeline.transition_log.records("m")
        assert any(r.trigger == "migrate" for r in records)
        assert secret not in repr(records)
        dumped = json.dumps([r.to_json_dict() for r in records])
        assert secret not in dumped
        assert f"{kv_salt(None, secret):016x}" in dumped  # named by its kv_salt instead


async def test_a_cache_salt_with_a_lone_surrogate_is_refused_not_a_router_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The HTTP edge refuses lone surrogates while parsing JSON; the Python API (embedding,
    # docs/embedding.md) takes the request as the validator let it through.
    workers = [MockEngine(i) for i in range(2)]
    async with build_pipeline(
        PipelineConfig(router_mode="kv"), Components(workers=workers)
    ) as pipeline:
        try:
            request = PreprocessedRequest(token_ids=tuple(range(40)), cache_salt="\ud800")
        except RequestError:
            return  # refused as a bad field: fine
        await pipeline.query(request)  # today: ActorCrashed (UnicodeEncodeError in kv_salt)


async def _served(pipeline: Any, request: PreprocessedRequest) -> tuple[list[int], int]:
    generated: list[int] = []
    cached = -1
    async for output in pipeline.generate(request):
        generated.extend(output.token_ids)
        if output.usage is not None:
            cached = output.usage.cached_tokens
    return generated, cached


async def test_a_first_block_filled_while_decoding_keeps_its_salt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Not a bug today: a test gap. Dropping the salt of a block the decode fills
    # (MockEngine's `salt = _salt_of(seq.request) if parent is None else None` -> None) passed
    # every test of the change; this one fails on that mutant.
    block = PipelineConfig().kv_block_size
    engine = MockEngine(1, num_gpu_blocks=4096)
    async with build_pipeline(
        PipelineConfig(router_mode="kv"), Components(workers=[engine])
    ) as pipeline:
        short = tuple(range(1, block // 2 + 1))  # half a block: block 0 fills while decoding
        generated, _ = await _served(
            pipeline,
            PreprocessedRequest(token_ids=short, max_tokens=block, cache_salt="t", request_id="a"),
        )
        first_block = (*short, *generated)[:block]
        assert len(first_block) == block
        again = (*first_block, *range(500, 500 + block))
        _, cached = await _served(
            pipeline, PreprocessedRequest(token_ids=again, max_tokens=1, request_id="plain")
        )
        assert cached == 0  # unsalted: never the salted block
        _, cached = await _served(
            pipeline,
            PreprocessedRequest(token_ids=again, max_tokens=1, cache_salt="t", request_id="b"),
        )
        assert cached == block  # the same salt: shared
