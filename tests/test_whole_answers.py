"""A caller that needs only the whole answer (``generate(..., progress=False)``, what a
non-streamed HTTP answer uses) gets the same tokens in a few outputs over `interlock worker`
connections (protocol version 4's ``Start.hold``), loses no token when its stream breaks,
and is served as before by a worker from before version 4.

In-process: `MockEngine`s behind the worker's connection handler over in-memory streams
(test_remote_workers_heartbeat's `Worker`), on virtual time.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import trio
from test_remote_workers_heartbeat import Worker

from interlock import Components, PipelineConfig, build_pipeline
from interlock._pipeline import HOLD_OUTPUTS, Pipeline
from interlock.engines.mock import MockEngine, MockTiming, mock_continuation
from interlock.engines.remote import RemoteEngine
from interlock.testing import check_invariants
from interlock.wire import PreprocessedRequest
from interlock.wire._frames import ProtocolError, Start, decode_body, encode_frame

PROMPT = tuple(range(100, 148))
#: ~6 ms of virtual time per token: 200 tokens take over a second, two holds and more.
TOKENS = 200


def timed(instance_id: int, **kwargs: Any) -> MockEngine:
    return MockEngine(instance_id, timing=MockTiming(speedup_ratio=1.0), **kwargs)


@asynccontextmanager
async def pipeline_over(*engines: MockEngine, **config: Any) -> AsyncIterator[Pipeline]:
    """A pipeline whose workers are ``engines``, each behind its own worker connection."""
    async with AsyncExitStack() as stack:
        remotes = []
        for engine in engines:
            worker = await stack.enter_async_context(Worker(engine).running())
            remotes.append(
                RemoteEngine(
                    "worker", 1, instance_id=engine.instance_id, open_connection=worker.connect
                )
            )
        settings = PipelineConfig(**config)
        pipeline = await stack.enter_async_context(
            build_pipeline(settings, Components(workers=remotes))
        )
        yield pipeline


def request(request_id: str = "r") -> PreprocessedRequest:
    return PreprocessedRequest(token_ids=PROMPT, max_tokens=TOKENS, request_id=request_id)


def first_worker(records: list[Any]) -> int:
    worker_id: int = next(r.worker_id for r in records if r.trigger == "start_decode")
    return worker_id


async def outputs_of(pipeline: Pipeline, req: PreprocessedRequest, *, progress: bool) -> list[Any]:
    return [output async for output in pipeline.generate(req, progress=progress)]


def tokens_of(outputs: list[Any]) -> list[int]:
    return [token for output in outputs for token in output.token_ids]


async def test_a_whole_answer_comes_in_a_few_outputs_with_every_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with pipeline_over(timed(1)) as pipeline:
        started = trio.current_time()
        held = await outputs_of(pipeline, request(), progress=False)
        took = trio.current_time() - started
        streamed = await outputs_of(pipeline, request("s"), progress=True)
        records = pipeline.transition_log.records()
    expected = mock_continuation(PROMPT, TOKENS)
    assert tokens_of(held) == expected and tokens_of(streamed) == expected
    assert held[-1].finish_reason == "length" and held[-1].usage.completion_tokens == TOKENS
    # The first token at once, then at most one output per hold, then the last.
    assert took > 2 * HOLD_OUTPUTS
    assert len(held[0].token_ids) == 1
    assert len(held) <= 2 + math.ceil(took / HOLD_OUTPUTS)
    # A stream read as it comes gets a token an output.
    assert len(streamed) == TOKENS
    check_invariants(records)


async def test_the_hold_stays_well_inside_engine_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A quarter of the idle timeout: a held stream sends something every 0.1 s, so it is
    # never taken for a stalled one.
    async with pipeline_over(timed(1), engine_idle_timeout=0.4) as pipeline:
        held = await outputs_of(pipeline, request(), progress=False)
        assert pipeline.stats.stalls == 0
    assert tokens_of(held) == mock_continuation(PROMPT, TOKENS)
    assert len(held) > 2 + TOKENS * 0.006 / HOLD_OUTPUTS


async def test_what_a_worker_held_goes_before_the_engine_breaks_the_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Worker 1 crashes after 50 tokens: the 49 it held reach the frontend before the broken
    # stream does, so the migration folds all 50 into the prompt and generates none again.
    config = {"migration_limit": 1, "router_mode": "round_robin"}
    async with pipeline_over(timed(1, crash_after_tokens=50), timed(2), **config) as pipeline:
        held = await outputs_of(pipeline, request(), progress=False)
        records = pipeline.transition_log.records("r")
    assert tokens_of(held) == mock_continuation(PROMPT, TOKENS)
    migrations = [r for r in records if r.trigger == "migrate"]
    assert first_worker(records) == 1 and len(migrations) == 1
    plan = migrations[0].decision
    assert plan.request.token_ids == (*PROMPT, *mock_continuation(PROMPT, 50))
    check_invariants(records, migration_limit=1)


async def test_a_held_stream_whose_connection_is_lost_migrates_with_every_token_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The connection goes while worker 1 holds tokens: the frontend never saw them, and
    # the migrated request generates them again after the ones it has.
    config = {"migration_limit": 1, "router_mode": "round_robin"}
    async with pipeline_over(timed(1), timed(2), **config) as pipeline:
        outputs = []
        async with trio.open_nursery() as nursery:

            async def stop_worker_1() -> None:
                await trio.sleep(3 * HOLD_OUTPUTS / 2)
                await pipeline.remove_worker(1, stop=True)

            nursery.start_soon(stop_worker_1)
            async for output in pipeline.generate(request(), progress=False):
                outputs.append(output)
        records = pipeline.transition_log.records("r")
    assert tokens_of(outputs) == mock_continuation(PROMPT, TOKENS)
    assert first_worker(records) == 1
    assert sum(r.trigger == "migrate" for r in records) == 1
    check_invariants(records, migration_limit=1)


async def test_a_worker_from_before_version_4_sends_every_output(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("interlock.engines.remote._server.SUPPORTED_VERSIONS", (1, 2, 3))
    async with pipeline_over(timed(1)) as pipeline:
        held = await outputs_of(pipeline, request(), progress=False)
        engine = pipeline.engine(1)
        assert isinstance(engine, RemoteEngine) and engine._link is not None
        assert engine._link.welcome.version == 3
    assert tokens_of(held) == mock_continuation(PROMPT, TOKENS)
    assert len(held) == TOKENS


def test_hold_is_left_out_of_a_start_frame_while_it_is_0_and_checked_when_set() -> None:
    req = PreprocessedRequest(token_ids=(1, 2))
    plain = msgpack.unpackb(encode_frame(Start(stream=3, request=req))[4:])
    assert "hold" not in plain[1]  # what a version-3 worker decodes
    held = encode_frame(Start(stream=3, request=req, hold=0.25))
    assert decode_body(held[4:]) == Start(stream=3, request=req, hold=0.25)
    for bad in (-1.0, math.inf, math.nan, True, "0.5"):
        with pytest.raises((ValueError, TypeError), match="hold must be a finite number"):
            Start(stream=3, request=req, hold=bad)
    fields = {"stream": 3, "request": plain[1]["request"], "hold": -2.0}
    with pytest.raises(ProtocolError, match="hold"):
        decode_body(msgpack.packb(["start", fields]))
