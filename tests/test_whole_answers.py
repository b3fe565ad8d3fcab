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

import httpx
import msgpack  # type: ignore[import-untyped]
import pytest
import trio
from test_remote_workers_heartbeat import Worker

from interlock import Components, PipelineConfig, build_pipeline
from interlock._errors import WorkerGone
from interlock._pipeline import HOLD_OUTPUTS, Pipeline
from interlock.engines.mock import MockEngine, MockTiming, mock_continuation
from interlock.engines.remote import RemoteEngine
from interlock.http import Preprocessor, build_app
from interlock.http._metrics import HttpMetrics
from interlock.testing import check_invariants
from interlock.wire import EngineOutput, PreprocessedRequest
from interlock.wire._frames import ProtocolError, Start, decode_body, encode_frame

PROMPT = tuple(range(100, 148))
#: ~6 ms of virtual time per token: 200 tokens take over a second, two holds and more.
TOKENS = 200
#: Token ids the default preprocessor decodes to letters (an HTTP answer's text).
LETTERS = list(range(97, 123))


def timed(instance_id: int, **kwargs: Any) -> MockEngine:
    return MockEngine(instance_id, timing=MockTiming(speedup_ratio=1.0), **kwargs)


@asynccontextmanager
async def pipeline_over(*engines: MockEngine, **config: Any) -> AsyncIterator[Pipeline]:
    """A pipeline whose workers are ``engines``, each behind its own worker connection (those
    of role ``"prefill"`` its prefill workers)."""
    async with AsyncExitStack() as stack:
        remotes = []
        for engine in engines:
            worker = await stack.enter_async_context(Worker(engine).running())
            remotes.append(
                RemoteEngine(
                    "worker",
                    1,
                    instance_id=engine.instance_id,
                    role=engine.role,
                    open_connection=worker.connect,
                )
            )
        settings = PipelineConfig(**config)
        components = Components(
            workers=[r for r in remotes if r.role != "prefill"],
            prefill_workers=[r for r in remotes if r.role == "prefill"],
        )
        pipeline = await stack.enter_async_context(build_pipeline(settings, components))
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


class Pausing:
    """A MockEngine whose streams pause ``pause`` seconds after output number ``after``: an
    engine that is slow there, not stalled."""

    def __init__(self, inner: MockEngine, after: int, pause: float) -> None:
        self._inner, self._after, self._pause = inner, after, pause

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @asynccontextmanager
    async def _stream(self, req: PreprocessedRequest) -> AsyncIterator[AsyncIterator[Any]]:
        async with self._inner.open_stream(req) as outputs:

            async def paused() -> AsyncIterator[Any]:
                n = 0
                async for output in outputs:
                    n += 1
                    if n == self._after + 1:
                        await trio.sleep(self._pause)
                    yield output

            yield paused()

    def open_stream(self, req: PreprocessedRequest) -> Any:
        return self._stream(req)


@pytest.mark.parametrize("progress", [True, False])
async def test_a_slow_but_live_engine_is_not_taken_for_a_stalled_one(
    autojump_clock: trio.testing.MockClock, progress: bool
) -> None:
    # engine_idle_timeout=20 (the default): hold 0.5 s. At ~6 ms a token, output 80 comes
    # ~0.48 s after the first, inside the hold, so the worker holds it; then the engine is
    # silent 19.6 s (< 20). The worker sends what it holds when the hold ends, so the
    # frontend sees no more silence than the engine's own.
    engine = Pausing(timed(1), after=80, pause=19.6)
    async with pipeline_over(engine, engine_idle_timeout=20.0) as pipeline:  # type: ignore[arg-type]
        try:
            outputs = await outputs_of(pipeline, request(), progress=progress)
        except WorkerGone as exc:
            pytest.fail(f"progress={progress}: {exc!r}; stalls={pipeline.stats.stalls}")
        assert pipeline.stats.stalls == 0
    assert tokens_of(outputs) == mock_continuation(PROMPT, TOKENS)
    if not progress:
        # Still a few outputs: the first token, one per hold, the last.
        assert len(outputs) <= 6


async def test_held_streams_sharing_a_connection_each_flush_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Three answers on one worker connection, started at different times (so their holds
    # end at different times): each one's held tokens still go when its own hold ends, so
    # none is taken for a stalled one.
    engine = Pausing(timed(1), after=80, pause=19.6)
    async with pipeline_over(engine, engine_idle_timeout=20.0) as pipeline:  # type: ignore[arg-type]
        answers: dict[str, list[Any]] = {}

        async def answer(request_id: str, delay: float) -> None:
            await trio.sleep(delay)
            answers[request_id] = await outputs_of(pipeline, request(request_id), progress=False)

        async with trio.open_nursery() as nursery:
            for n, delay in enumerate((0.0, 0.13, 0.29)):
                nursery.start_soon(answer, f"r{n}", delay)
        assert pipeline.stats.stalls == 0
    for outputs in answers.values():
        assert tokens_of(outputs) == mock_continuation(PROMPT, TOKENS)
        assert len(outputs) <= 8


class Scripted:
    """A `MockEngine` whose streams send one token at each of the given times from the
    stream's start (the last one finishing it), chosen by the prompt's first token."""

    def __init__(self, inner: MockEngine, scripts: dict[int, list[float]]) -> None:
        self._inner, self._scripts = inner, scripts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @asynccontextmanager
    async def _stream(self, req: PreprocessedRequest) -> AsyncIterator[AsyncIterator[Any]]:
        times = self._scripts[req.token_ids[0]]
        start = trio.current_time()

        async def outputs() -> AsyncIterator[EngineOutput]:
            for n, at in enumerate(times):
                await trio.sleep_until(start + at)
                last = n == len(times) - 1
                yield EngineOutput(token_ids=(500 + n,), finish_reason="length" if last else None)

        yield outputs()

    def open_stream(self, req: PreprocessedRequest) -> Any:
        return self._stream(req)


# 0.01: the second answer's hold ends within the first's early flush (the flusher passes
# over it while it holds nothing); 0.05: outside it.
@pytest.mark.parametrize("second_start", [0.01, 0.05])
async def test_a_token_made_as_its_hold_ends_early_is_not_held_through_a_pause(
    autojump_clock: trio.testing.MockClock, second_start: float
) -> None:
    # The second answer's engine makes a token 5 ms before its hold ends, then pauses 19.6 s
    # (< engine_idle_timeout: slow, not stalled). The token must go at once, not with the
    # engine's next output 19.6 s later (the frontend would see 20.1 s of silence).
    engine = Scripted(timed(1), {1: [0.0, 0.1, 0.6], 2: [0.0, 0.495, 0.495 + 19.6]})
    async with pipeline_over(engine, engine_idle_timeout=20.0) as pipeline:  # type: ignore[arg-type]
        answers: dict[int, list[Any]] = {}

        async def answer(first: int, delay: float) -> None:
            await trio.sleep(delay)
            req = PreprocessedRequest(
                token_ids=(first, 7, 8, 9), max_tokens=3, request_id=f"r{first}"
            )
            answers[first] = await outputs_of(pipeline, req, progress=False)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, 1, 0.0)
            nursery.start_soon(answer, 2, second_start)
        assert pipeline.stats.stalls == 0
    assert tokens_of(answers[2]) == [500, 501, 502]


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


async def itl_readings(stream: bool) -> tuple[int, float]:
    """``interlock_inter_token_latency_seconds``'s count and mean after one 200-token
    completion over an interlock worker, streamed or not."""
    metrics = HttpMetrics()
    preprocessor = Preprocessor.default()
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(Worker(timed(1, token_pool=LETTERS)).running())
        remote = RemoteEngine("worker", 1, instance_id=1, open_connection=worker.connect)
        components = Components(
            workers=[remote], tokenizer=preprocessor.tokenizer, transition_sinks=[metrics]
        )
        pipeline = await stack.enter_async_context(build_pipeline(PipelineConfig(), components))
        app = build_app(pipeline, metrics=metrics, preprocessor=preprocessor)
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
        )
        body = {
            "model": "mock",
            "prompt": "hello world",
            "max_tokens": TOKENS,
            "ignore_eos": True,
            "stream": stream,
        }
        answer = await client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
    count = sum(metrics.itl.counts)
    return count, metrics.itl.total / count


async def test_a_whole_answer_reads_the_engines_inter_token_latency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A held output of k tokens after a gap g is k readings of g/k: the same count as the
    # streamed answer's, and its mean (the engine's ~6 ms a token), not one hold-sized gap.
    streamed_count, streamed_mean = await itl_readings(stream=True)
    whole_count, whole_mean = await itl_readings(stream=False)
    assert streamed_count == whole_count == TOKENS - 1
    assert streamed_mean / 2 < whole_mean < 2 * streamed_mean, (streamed_mean, whole_mean)
