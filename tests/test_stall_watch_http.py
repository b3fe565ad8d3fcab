"""Stalls of HTTP engines' streams (`OpenAIEngine`, what ``interlock serve --engine ID=URL``
puts in front of vLLM), watched by the pipeline's `StallWatch` as `RemoteEngine`'s are: the
stream's ``fail_waiting`` closes its connection to end a read of the body.

As with a scope per wait: a stall at exactly the deadline (before the first token, and mid
stream), with the same message, migrating with every token once; the stalled connection is
closed (the engine sees the client go) and never reused; a consumer slower than
``engine_idle_timeout`` is not a stall (the outputs that reached the connection meanwhile are
taken at its next wait), and one that gives up at the deadline counts none.
Real HTTP on loopback, on virtual time: interlock's mock engine behind vLLM's HTTP surface
(`serve_mock_openai`, which sends its head with the first token), and a scripted engine that
sends its head at once and then nothing, as vLLM does before a first token that never comes.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from helpers import wait_until
from test_engine_connections import listening
from test_engine_misbehaving import SSE_HEAD, WHOLE, scripted_engine, sse_chunk, token_chunk
from test_whole_answers import PROMPT, first_worker, timed, tokens_of

from interlock import Components, PipelineConfig, WorkerStalled, build_pipeline
from interlock.engines.mock import (
    MockEngine,
    MockOpenAIServer,
    mock_continuation,
    serve_mock_openai,
)
from interlock.engines.openai import OpenAIEngine
from interlock.testing import check_invariants
from interlock.wire import PreprocessedRequest

TIMEOUTS = {"first_token_timeout": 3.0, "engine_idle_timeout": 2.0}
#: ~6 ms of virtual time a token (`timed`): the stream is well under way when it freezes.
TOKENS = 60


def request(request_id: str = "r") -> PreprocessedRequest:
    return PreprocessedRequest(token_ids=PROMPT, max_tokens=TOKENS, request_id=request_id)


def http_engine(url: str, instance_id: int) -> OpenAIEngine:
    # No health polls during a test: a frozen engine's stream is the pipeline's to judge.
    return OpenAIEngine(url, instance_id=instance_id, health_interval=600)


@asynccontextmanager
async def over_http(
    *mocks: MockEngine, **config: Any
) -> AsyncIterator[tuple[Any, dict[int, MockOpenAIServer], dict[int, OpenAIEngine]]]:
    """A pipeline over `OpenAIEngine`s, each in front of one of ``mocks`` behind vLLM's HTTP
    surface."""
    async with trio.open_nursery() as nursery:
        servers: dict[int, MockOpenAIServer] = {}
        for mock in mocks:
            servers[mock.instance_id] = await nursery.start(serve_mock_openai, mock)
        engines = {i: http_engine(s.url, i) for i, s in servers.items()}
        components = Components(workers=list(engines.values()))
        async with build_pipeline(PipelineConfig(**config), components) as pipeline:
            yield pipeline, servers, engines
        nursery.cancel_scope.cancel()


async def test_an_http_engine_frozen_mid_stream_stalls_migrates_and_drops_its_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mocks = {1: timed(1), 2: timed(2)}
    async with over_http(
        *mocks.values(), router_mode="round_robin", migration_limit=1, **TIMEOUTS
    ) as (pipeline, servers, engines):
        outputs = []
        frozen_at = None
        async for output in pipeline.generate(request(), progress=True):
            outputs.append(output)
            if frozen_at is None and len(tokens_of(outputs)) >= 5:
                frozen = first_worker(pipeline.transition_log.records("r"))
                mocks[frozen].stall(86_400)
                frozen_at = trio.current_time()
        assert pipeline._stalls._nursery is None, "the legs were not watched by the StallWatch"
        assert pipeline.stats.stalls == 1 and pipeline.stats.migrations == 1
        records = pipeline.transition_log.records()
        # The stalled connection was closed (the engine saw the client go and aborted the
        # request), not given back to the pool.
        await wait_until(lambda: servers[frozen].stats.aborted == 1)
        connections = engines[frozen]._connections
        assert connections is not None and connections._idle == []
    assert tokens_of(outputs) == mock_continuation(PROMPT, TOKENS)
    assert outputs[-1].finish_reason == "length"
    migrated = [r for r in records if r.trigger == "migrate"]
    assert len(migrated) == 1
    # The watch's message, with the worker's whole silence: the idle deadline, to the tick.
    assert f"worker {frozen} made no progress for 2s (first_token_timeout=3.0, " in (
        migrated[0].detail or ""
    )
    check_invariants(records)


async def test_a_consumer_slower_than_the_idle_timeout_is_not_a_stalled_http_engine(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with over_http(timed(1), migration_limit=0, **TIMEOUTS) as (pipeline, servers, _):
        outputs = []
        async for output in pipeline.generate(request(), progress=True):
            outputs.append(output)
            if len(outputs) in (1, 20):
                # Kept past engine_idle_timeout while the engine goes on producing.
                await trio.sleep(5)
        assert pipeline.stats.stalls == 0
        assert servers[1].stats.aborted == 0
    assert tokens_of(outputs) == mock_continuation(PROMPT, TOKENS)
    assert outputs[-1].finish_reason == "length"


@asynccontextmanager
async def silent_engine(
    first: tuple[bytes, ...] = (SSE_HEAD,), **config: Any
) -> AsyncIterator[tuple[Any, OpenAIEngine, list[int], list[trio.Event]]]:
    """A pipeline over one engine that answers its first completion with the pieces of
    ``first`` (the SSE head), a second apart, and then nothing (until the client closes the
    connection, which sets that request's event), and every later one whole; with the list
    its connections are counted in."""
    closed: list[trio.Event] = []

    async def completion(stream: trio.SocketStream) -> str | None:
        if closed:
            await stream.send_all(SSE_HEAD + WHOLE)
            return None
        event = trio.Event()
        closed.append(event)
        for i, piece in enumerate(first):
            if i:
                await trio.sleep(1)
            await stream.send_all(piece)
        if await stream.receive_some(100) == b"":
            event.set()
        return "close"

    handler, connections = scripted_engine(completion)
    async with trio.open_nursery() as nursery, listening(handler) as url:
        engine = http_engine(url, 1)
        async with build_pipeline(
            PipelineConfig(**config), Components(workers=[engine])
        ) as pipeline:
            yield pipeline, engine, connections, closed
        nursery.cancel_scope.cancel()


async def test_an_http_engine_silent_after_its_head_stalls_at_first_token_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with silent_engine(migration_limit=0, **TIMEOUTS) as (
        pipeline,
        engine,
        connections,
        closed,
    ):
        started = trio.current_time()
        with pytest.raises(WorkerStalled) as caught:
            async for _ in pipeline.generate(request(), progress=True):
                pass
        assert trio.current_time() - started == pytest.approx(3.0)
        assert str(caught.value).startswith(
            "worker 1 made no progress for 3s (first_token_timeout=3.0, engine_idle_timeout=2.0)"
        )
        assert pipeline.stats.stalls == 1
        assert pipeline._stalls._nursery is None, "the leg was not watched by the StallWatch"
        # The engine saw its connection close, and the next request goes over a new one.
        with trio.fail_after(1):
            await closed[0].wait()
        assert engine._connections is not None and engine._connections._idle == []
        opened = len(connections)
        async with engine.open_stream(PreprocessedRequest(token_ids=PROMPT, max_tokens=3)) as s:
            assert tokens_of([o async for o in s]) == [1, 2, 3]
        assert len(connections) == opened + 1


@pytest.mark.parametrize("whole", [True, False])
async def test_after_a_slow_consumer_only_a_whole_output_on_the_connection_is_progress(
    autojump_clock: trio.testing.MockClock, whole: bool
) -> None:
    # The engine sent a token, then a second one whole or only its first bytes, then froze;
    # the consumer held the first past engine_idle_timeout. Its next wait takes a whole
    # output from the connection without waiting; bytes that make none are no progress.
    second = token_chunk(2) if whole else token_chunk(2)[:12]
    sent = (SSE_HEAD + token_chunk(1), second)
    async with silent_engine(sent, migration_limit=0, **TIMEOUTS) as (
        pipeline,
        _,
        _,
        closed,
    ):
        outputs = []
        with pytest.raises(WorkerStalled) as caught:
            async for output in pipeline.generate(request(), progress=True):
                outputs.append(output)
                if len(outputs) == 1:
                    await trio.sleep(5)
        assert tokens_of(outputs) == ([1, 2] if whole else [1])
        # The silence since the last output: the idle deadline after the second token, or
        # the consumer's hold of the first.
        silence = "2s" if whole else "5s"
        assert str(caught.value).startswith(f"worker 1 made no progress for {silence} ")
        assert pipeline.stats.stalls == 1
        with trio.fail_after(1):
            await closed[0].wait()


async def test_a_consumer_that_gives_up_as_an_http_engine_stalls_counts_no_stall(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The caller's own cancellation at the very instant of first_token_timeout: the request
    # ends cancelled and no stall is counted, whichever of the two wake-ups trio runs first
    # (several requests: trio orders them by its seeded shuffle).
    counted = []
    for i in range(4):
        async with silent_engine(migration_limit=0, **TIMEOUTS) as (pipeline, _, _, closed):
            with trio.move_on_after(TIMEOUTS["first_token_timeout"]) as gave_up:
                async for _ in pipeline.generate(request(f"r{i}"), progress=True):
                    pass
            assert gave_up.cancelled_caught
            assert pipeline.stats.cancelled == 1
            counted.append(pipeline.stats.stalls)
            with trio.fail_after(1):
                await closed[0].wait()  # the connection closed either way
    assert counted == [0] * 4


async def test_fail_waiting_ends_a_read_with_its_error_once_and_never_after_the_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with silent_engine() as (_, engine, _, closed):
        stall = WorkerStalled("frozen", worker_id=1)
        async with engine.open_stream(request()) as stream:
            raised: list[BaseException] = []

            async def read() -> None:
                try:
                    await stream.__anext__()
                except WorkerStalled as exc:
                    raised.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                assert stream.fail_waiting(stall)
                assert not stream.fail_waiting(stall)  # its error is already waiting
            assert raised == [stall]
            assert not stream.fail_waiting(stall)  # the stream has ended
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
        with trio.fail_after(1):
            await closed[0].wait()
        # A stream read to its end has nothing to interrupt.
        async with engine.open_stream(PreprocessedRequest(token_ids=PROMPT, max_tokens=3)) as s:
            assert tokens_of([o async for o in s]) == [1, 2, 3]
            assert not s.fail_waiting(stall)


@asynccontextmanager
async def a_read_waiting(max_tokens: int) -> AsyncIterator[tuple[Any, int, list[Any]]]:
    """An HTTP engine's stream past its first token, a read of its next output waiting in a
    task of its own (which puts what that read returns or raises in the list), and the file
    descriptor of the engine's end of the connection (bytes written to it reach the read's
    socket without a checkpoint: trio has not woken the read when the test goes on)."""
    servers: list[trio.SocketStream] = []

    async def completion(stream: trio.SocketStream) -> str | None:
        await stream.send_all(SSE_HEAD + token_chunk(1))
        servers.append(stream)
        await trio.sleep_forever()
        return None

    handler, _ = scripted_engine(completion)
    async with trio.open_nursery() as nursery, listening(handler) as url:
        engine = http_engine(url, 1)
        await nursery.start(engine.run)
        leg = PreprocessedRequest(token_ids=PROMPT, max_tokens=max_tokens)
        async with engine.open_stream(leg) as stream:
            assert tokens_of([await stream.__anext__()]) == [1]
            got: list[Any] = []

            async def read() -> None:
                try:
                    got.append(await stream.__anext__())
                except WorkerStalled as exc:
                    got.append(exc)

            async with trio.open_nursery() as readers:
                readers.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                yield stream, servers[0].socket.fileno(), got
        nursery.cancel_scope.cancel()


async def test_fail_waiting_takes_the_final_output_that_reached_the_connection_while_a_read_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A read of the body waits; the engine's last token, its finish reason and [DONE] reach
    # the socket, and the watch's deadline passes in that same instant, before trio wakes the
    # read (the watch's task and the woken reader in one batch, the watch run first). As with
    # a scope, whose cancel cannot undo a wake-up already due (and as between reads, where
    # fail_waiting takes what reached the connection), the finished answer is taken: no
    # stall, no healthy engine ejected, no complete answer migrated.
    stall = WorkerStalled("frozen", worker_id=1)
    async with a_read_waiting(max_tokens=2) as (stream, engine_end, got):
        final = token_chunk(2, "length") + sse_chunk("[DONE]") + b"0\r\n\r\n"
        os.write(engine_end, final)
        failed = stream.fail_waiting(stall)
    assert not failed, "the final output on the connection was dropped for a stall"
    assert tokens_of(got) == [2] and got[0].finish_reason == "length"


async def test_fail_waiting_spares_a_read_woken_by_part_of_an_output_once_then_fails_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # As above, but what reaches the socket is half of the next output's chunk and then the
    # engine freezes. The first fail_waiting cannot tell (it reads nothing) and lets the
    # woken read take the bytes; the read then waits for the rest, and the watch's re-check
    # (its second fail_waiting in the same wait) must end it with the stall, not wait forever,
    # even if more bytes came meanwhile.
    stall = WorkerStalled("frozen", worker_id=1)
    async with a_read_waiting(max_tokens=3) as (stream, engine_end, got):
        chunk = token_chunk(2)
        os.write(engine_end, chunk[: len(chunk) // 2])
        assert not stream.fail_waiting(stall)
        # The woken read took the half chunk and waits for the rest.
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        # Spared once per wait: an engine dribbling bytes that make no output still stalls
        # at the re-check.
        os.write(engine_end, chunk[len(chunk) // 2 :][:1])
        assert stream.fail_waiting(stall)
    assert got == [stall]
