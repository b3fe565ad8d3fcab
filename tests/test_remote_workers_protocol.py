"""`RemoteEngine` against `serve_worker` in the same process, over real loopback sockets (real
clock: an autojumping clock would fire every timeout while a socket waits): the handshake, the
stream life cycle, cancellation, events, and connections that break or misbehave."""

from __future__ import annotations

import argparse
import functools
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from interlock import WorkerGone, WorkerRefused
from interlock.engines.mock import MockEngine, MockTiming, mock_continuation, mock_token_pool
from interlock.engines.remote import (
    RemoteEngine,
    TokenizerMismatch,
    WorkerAddress,
    WorkerMismatch,
    WorkerUnreachable,
    serve_worker,
)
from interlock.engines.remote._cli import add_arguments, build_engine
from interlock.engines.remote._connection import FrameConnection
from interlock.engines.remote._server import _Hub
from interlock.kv import KvStored
from interlock.processing import ByteTokenizer, tokenizer_fingerprint
from interlock.wire import (
    EngineOutput,
    FrameParser,
    PreprocessedRequest,
    ProtocolError,
    WorkerJoined,
    WorkerLeft,
    encode_frame,
)
from interlock.wire._frames import Goodbye, Hello, Start, Welcome

PROMPT = tuple(range(100, 140))
TIMEOUT = 10


def zero_time(instance_id: int = 1, **kwargs: Any) -> MockEngine:
    return MockEngine(instance_id, timing=MockTiming.zero(), **kwargs)


def slow(instance_id: int = 1) -> MockEngine:
    # About 6 ms per token: a long request is still running when the test acts on it.
    return MockEngine(instance_id, timing=MockTiming(speedup_ratio=1.0))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@asynccontextmanager
async def served(engine: Any, **kwargs: Any) -> AsyncIterator[WorkerAddress]:
    async with trio.open_nursery() as nursery:
        address: WorkerAddress = await nursery.start(
            functools.partial(serve_worker, engine, **kwargs)
        )
        yield address
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected(engine: RemoteEngine) -> AsyncIterator[RemoteEngine]:
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine
        nursery.cancel_scope.cancel()


def remote(address: WorkerAddress, instance_id: int = 1, **kwargs: Any) -> RemoteEngine:
    return RemoteEngine(address.host, address.port, instance_id=instance_id, **kwargs)


class Events:
    """Collects an engine's events; `wait_for` waits for one of a type."""

    def __init__(self, engine: Any) -> None:
        self.seen: list[Any] = []
        self._changed = trio.Event()
        engine.add_listener(self._on_event)

    def _on_event(self, event: Any) -> None:
        self.seen.append(event)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, kind: type[Any], count: int = 1) -> None:
        while sum(type(e) is kind for e in self.seen) < count:
            await self._changed.wait()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition that no event announces (an engine's counters), bounded by the
    caller's fail_after."""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(0.005)


async def collect(engine: Any, request: PreprocessedRequest) -> list[EngineOutput]:
    async with engine.open_stream(request) as stream:
        return [output async for output in stream]


# -- the handshake -----------------------------------------------------------------------------


async def test_a_stream_over_the_wire_equals_the_engine_called_directly() -> None:
    request = PreprocessedRequest(token_ids=PROMPT, max_tokens=12, detokenize=True)
    with trio.fail_after(TIMEOUT):
        async with served(zero_time()) as address, connected(remote(address)) as engine:
            outputs = await collect(engine, request)
            assert engine.capacity is not None and engine.capacity.kv_blocks == 16_384
    assert [t for o in outputs for t in o.token_ids] == mock_continuation(PROMPT, 12)
    assert outputs[-1].finish_reason == "length"
    assert outputs[-1].usage is not None and outputs[-1].usage.completion_tokens == 12
    assert outputs[0].text is not None


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        ({"instance_id": 2}, "is instance 1 .* expects instance 2"),
        ({"role": "decode"}, "role 'agg'.* expects .*role 'decode'"),
        ({"block_size": 32}, "blocks of 16 tokens.* expects .*blocks of 32 tokens"),
    ],
)
async def test_a_worker_that_is_not_the_one_configured_is_a_clear_error(
    expected: dict[str, Any], message: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(zero_time(1)) as address:
            engine = remote(address, **({"instance_id": 1} | expected))
            with pytest.raises(WorkerMismatch, match=message):
                await engine.run()


BUILTIN = tokenizer_fingerprint(ByteTokenizer())


def builtin_worker(instance_id: int = 1) -> MockEngine:
    """A worker like ``interlock worker --tokenizer builtin``."""
    tokenizer = ByteTokenizer()
    pool = mock_token_pool(tokenizer)
    return zero_time(instance_id, tokenizer=tokenizer, vocab_size=259, token_pool=pool)


def test_the_welcome_reports_the_tokenizer_and_the_ids_the_worker_generates() -> None:
    def welcome(engine: MockEngine) -> Welcome:
        return _Hub(engine, handshake_timeout=1, max_frame_size=1 << 20).welcome(1)

    plain = welcome(zero_time())
    assert (plain.tokenizer, plain.vocab_size) == (None, 32_000)
    builtin = welcome(builtin_worker())
    pool = mock_token_pool(ByteTokenizer())
    assert (builtin.tokenizer, builtin.vocab_size) == (BUILTIN, max(pool) + 1)


@pytest.mark.parametrize(
    ("worker", "expected", "message"),
    [
        (
            zero_time,
            {"tokenizer": BUILTIN, "vocab_size": 259},
            r"instance 1\) has no tokenizer and generates token ids up to 31999, but this "
            r"frontend's tokenizer is builtin:259:\w+ \(ids 0..258\).*start the worker with "
            r"--tokenizer builtin",
        ),
        (
            builtin_worker,
            {"tokenizer": "hf:151669:0123456789abcdef", "vocab_size": 151_669},
            r"decodes with tokenizer builtin:259:\w+, but this frontend's tokenizer is "
            r"hf:151669:0123456789abcdef .*start the worker with --tokenizer PATH naming",
        ),
        (
            zero_time,
            {"vocab_size": 259},
            r"has no tokenizer .* frontend's tokenizer has ids 0..258.*--tokenizer builtin or",
        ),
        (
            # Its ids fit the frontend's vocabulary, but they are no tokenizer's tokens.
            zero_time,
            {"tokenizer": "hf:151669:0123456789abcdef", "vocab_size": 151_669},
            r"has no tokenizer and generates token ids up to 31999, but this frontend's "
            r"tokenizer is hf:151669:0123456789abcdef",
        ),
    ],
)
async def test_a_worker_with_another_tokenizer_is_a_tokenizer_mismatch(
    worker: Callable[[], MockEngine], expected: dict[str, Any], message: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with served(worker()) as address:
            with pytest.raises(TokenizerMismatch, match=message) as caught:
                await remote(address, **expected).run()
    assert isinstance(caught.value, WorkerMismatch)


async def test_a_worker_with_the_frontend_tokenizer_or_ids_within_it_connects() -> None:
    within = zero_time(2, token_pool=range(100))  # no tokenizer, but ids 0..99 decode
    with trio.fail_after(TIMEOUT):
        async with served(builtin_worker()) as first, served(within) as second:
            engine = remote(first, 1, tokenizer=BUILTIN, vocab_size=259)
            async with connected(engine):
                assert engine.connected
            # A frontend that knows only its vocabulary's size checks only the ids.
            async with connected(remote(second, 2, vocab_size=259)) as engine:
                assert engine.connected
            # Without the frontend's tokenizer nothing is checked, as before.
            async with served(zero_time(3)) as third, connected(remote(third, 3)) as engine:
                assert engine.connected


async def test_an_unreachable_worker_fails_after_connect_timeout() -> None:
    engine = RemoteEngine("127.0.0.1", free_port(), instance_id=1, connect_timeout=0.3)
    with trio.fail_after(TIMEOUT), pytest.raises(WorkerUnreachable, match="within connect_timeout"):
        await engine.run()


async def test_run_waits_for_a_worker_that_is_not_up_yet() -> None:
    port = free_port()
    engine = RemoteEngine("127.0.0.1", port, instance_id=1, connect_timeout=5)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.run)
            await trio.sleep(0.2)  # the worker starts late: run keeps retrying meanwhile
            assert not engine.connected
            await nursery.start(functools.partial(serve_worker, zero_time(), port=port))
            await wait_until(lambda: engine.connected)
            assert await collect(engine, PreprocessedRequest(token_ids=PROMPT, max_tokens=3))
            nursery.cancel_scope.cancel()


async def test_no_common_protocol_version_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("interlock.engines.remote._server.SUPPORTED_VERSIONS", (99,))
    with trio.fail_after(TIMEOUT):
        async with served(zero_time()) as address:
            with pytest.raises(
                ProtocolError, match=r"frontend speaks \[1, 2, 3, 4, 5\], this worker speaks"
            ):
                await remote(address).run()


async def test_a_silent_peer_is_dropped_after_the_handshake_timeout() -> None:
    with trio.fail_after(TIMEOUT):
        async with served(zero_time(), handshake_timeout=0.2) as address:
            stream = await trio.open_tcp_stream(address.host, address.port)
            received = await _read_until_closed(stream)
    assert received == [Goodbye(reason="no hello within 0.2s")]


# -- streams -----------------------------------------------------------------------------------


async def test_a_refusal_reaches_the_stream_as_worker_refused() -> None:
    worker = zero_time()
    worker.refuse_new()
    with trio.fail_after(TIMEOUT):
        async with served(worker) as address, connected(remote(address)) as engine:
            with pytest.raises(WorkerRefused, match="refuses new requests"):
                await collect(engine, PreprocessedRequest(token_ids=PROMPT, max_tokens=3))
            worker.refuse_new(False)
            assert await collect(engine, PreprocessedRequest(token_ids=PROMPT, max_tokens=3))


async def test_a_prompt_too_long_for_the_worker_is_refused_with_the_reason() -> None:
    worker = MockEngine(1, timing=MockTiming.zero(), max_model_len=32)
    with trio.fail_after(TIMEOUT):
        async with served(worker) as address, connected(remote(address)) as engine:
            with pytest.raises(WorkerRefused, match="leaves no room for output"):
                await collect(engine, PreprocessedRequest(token_ids=list(range(40)), max_tokens=3))
            # The connection is fine: the next request that fits runs.
            assert await collect(engine, PreprocessedRequest(token_ids=PROMPT[:8], max_tokens=3))


def test_the_worker_command_shapes_its_engine_scheduler() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--id",
            "3",
            "--max-num-batched-tokens",
            "512",
            "--no-chunked-prefill",
            "--max-model-len",
            "4096",
        ]
    )
    engine = build_engine(args)
    assert (engine.max_num_batched_tokens, engine.enable_chunked_prefill) == (512, False)
    assert engine.max_model_len == 4096
    defaults = build_engine(parser.parse_args(["--id", "3"]))
    assert (defaults.max_num_batched_tokens, defaults.enable_chunked_prefill) == (8192, True)


async def test_a_worker_crash_breaks_the_stream_and_withdraws_the_worker() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            served(zero_time(crash_after_tokens=4)) as address,
            connected(remote(address)) as engine,
        ):
            events = Events(engine)
            received: list[int] = []
            with pytest.raises(WorkerGone, match="went away after"):
                async with engine.open_stream(
                    PreprocessedRequest(token_ids=PROMPT, max_tokens=50)
                ) as stream:
                    async for output in stream:
                        received += output.token_ids
            await events.wait_for(WorkerLeft)
            assert engine.connected and not engine.registered
            with pytest.raises(WorkerRefused, match="is down"):
                await collect(engine, PreprocessedRequest(token_ids=PROMPT, max_tokens=3))
    assert received == mock_continuation(PROMPT, 4)[: len(received)]


async def test_leave_and_rejoin_travel_as_events() -> None:
    worker = zero_time()
    with trio.fail_after(TIMEOUT):
        async with served(worker) as address, connected(remote(address)) as engine:
            events = Events(engine)
            assert engine.registered
            worker.leave()
            await events.wait_for(WorkerLeft)
            assert not engine.registered
            worker.rejoin()
            await events.wait_for(WorkerJoined)
            assert engine.registered
        # A frontend connecting while the worker is withdrawn learns it from the welcome.
        worker.leave()
        async with served(worker) as address, connected(remote(address)) as engine:
            assert engine.connected and not engine.registered


async def test_leaving_a_stream_early_frees_its_slot_on_the_worker() -> None:
    worker = slow()
    with trio.fail_after(TIMEOUT):
        async with served(worker) as address, connected(remote(address)) as engine:
            async with engine.open_stream(
                PreprocessedRequest(token_ids=PROMPT, max_tokens=10_000)
            ) as stream:
                await stream.__anext__()
                await stream.__anext__()
                assert worker.active_requests == 1
                assert len((await engine.snapshot()).active) == 1
            # __aexit__ only queued the cancel frame; the worker acts on it shortly.
            await wait_until(lambda: worker.active_requests == 0)
            assert (await engine.snapshot()).active == ()
    assert worker.requests_cancelled == 1


async def test_a_frontend_that_disconnects_cancels_all_its_streams() -> None:
    worker = slow()
    broken: list[BaseException] = []

    async def consume(engine: RemoteEngine) -> None:
        try:
            await collect(engine, PreprocessedRequest(token_ids=PROMPT, max_tokens=10_000))
        except WorkerGone as exc:
            broken.append(exc)

    with trio.fail_after(TIMEOUT):
        async with served(worker) as address, trio.open_nursery() as streams:
            async with connected(remote(address)) as engine:
                for _ in range(3):
                    streams.start_soon(consume, engine)
                await wait_until(lambda: worker.active_requests == 3)
            # The engine stopped: its connection closed, its streams broke here...
            await wait_until(lambda: len(broken) == 3)
            # ...and the worker cancelled them.
            await wait_until(lambda: worker.active_requests == 0)
    assert worker.requests_cancelled == 3


async def test_a_snapshot_over_the_wire_equals_the_engines_own() -> None:
    worker = zero_time()
    with trio.fail_after(TIMEOUT):
        async with served(worker) as address, connected(remote(address)) as engine:
            await collect(engine, PreprocessedRequest(token_ids=PROMPT, max_tokens=20))
            over_the_wire = await engine.snapshot()
            assert over_the_wire == await worker.snapshot()
    assert over_the_wire.kv_blocks and all(type(b) is KvStored for b in over_the_wire.kv_blocks)


async def test_every_frontend_gets_every_kv_event() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            served(zero_time()) as address,
            connected(remote(address)) as first,
            connected(remote(address)) as second,
        ):
            seen = [Events(first), Events(second)]
            await collect(first, PreprocessedRequest(token_ids=PROMPT, max_tokens=40))
            # Events precede a snapshot reply on the same connection.
            await first.snapshot()
            await second.snapshot()
    assert seen[0].seen == seen[1].seen
    assert any(type(e) is KvStored for e in seen[0].seen)


# -- broken connections ------------------------------------------------------------------------


async def test_a_lost_connection_breaks_streams_and_the_engine_comes_back() -> None:
    worker = slow()
    port = free_port()
    engine = RemoteEngine("127.0.0.1", port, instance_id=1, max_backoff=0.05)
    events = Events(engine)
    request = PreprocessedRequest(token_ids=PROMPT, max_tokens=10_000)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = trio.CancelScope()
            await nursery.start(_serve_in, server, worker, port)
            await nursery.start(engine.run)
            async with engine.open_stream(request) as stream:
                await stream.__anext__()
                server.cancel()  # the worker goes away mid-stream
                with pytest.raises(WorkerGone, match=r"lost the connection after \d+ outputs"):
                    async for _ in stream:
                        pass
            await events.wait_for(WorkerLeft)
            assert not engine.registered
            with pytest.raises(WorkerRefused, match="is not connected"):
                await collect(engine, request)
            with pytest.raises(WorkerGone, match="is not connected"):
                await engine.snapshot()
            # Back on the same port: the engine reconnects and rejoins by itself (its second
            # WorkerJoined; the first came with the first connection).
            await nursery.start(_serve_in, trio.CancelScope(), worker, port)
            await events.wait_for(WorkerJoined, count=2)
            assert engine.registered and engine.connections == 2
            assert await collect(engine, PreprocessedRequest(token_ids=PROMPT, max_tokens=3))
            nursery.cancel_scope.cancel()


async def _serve_in(
    scope: trio.CancelScope, worker: MockEngine, port: int, *, task_status: Any
) -> None:
    with scope:
        await serve_worker(worker, port=port, task_status=task_status)


async def test_garbage_from_a_worker_closes_the_connection_and_the_engine_reconnects() -> None:
    connections = 0

    async def fake_worker(stream: trio.SocketStream) -> None:
        # A handshake like a worker's, then garbage in answer to the first request.
        nonlocal connections
        connections += 1
        parser = FrameParser()
        while True:
            data = await stream.receive_some()
            if not data:
                return
            for message in parser.feed(data):
                if type(message) is Hello:
                    welcome = Welcome(version=1, worker_id=1, role="agg", block_size=16)
                    await stream.send_all(encode_frame(welcome))
                elif type(message) is Start:
                    await stream.send_all(b"\x00\x00\x00\x03abc")

    engine = None
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, fake_worker, 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            port = listeners[0].socket.getsockname()[1]
            engine = RemoteEngine("127.0.0.1", port, instance_id=1, max_backoff=0.05)
            events = Events(engine)
            await nursery.start(engine.run)
            with pytest.raises(WorkerGone, match="protocol error: a frame body is not valid"):
                await collect(engine, PreprocessedRequest(token_ids=PROMPT, max_tokens=3))
            await events.wait_for(WorkerLeft)
            await events.wait_for(WorkerJoined, count=2)
            nursery.cancel_scope.cancel()
    assert connections == 2


async def _read_until_closed(stream: trio.abc.ReceiveStream) -> list[Any]:
    parser = FrameParser()
    received: list[Any] = []
    while data := await stream.receive_some():
        received += parser.feed(data)
    return received


async def test_a_peer_that_does_not_read_is_cut_off_instead_of_buffered_forever() -> None:
    # A lockstep stream: nothing is sent unless the other end receives, and it never does.
    ours, _theirs = trio.testing.lockstep_stream_pair()
    conn = FrameConnection(ours, "a stuck peer", max_pending_bytes=1000)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            ended: list[str] = []

            async def serve() -> None:
                ended.append(await conn.serve(lambda message: None))

            nursery.start_soon(serve)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(100):
                conn.send_nowait(Goodbye(reason="x" * 20))
    assert ended == ["a stuck peer is not reading: over 1000 bytes queued"]
    assert conn.closed


def test_the_public_surface_is_pinned() -> None:
    import interlock.engines.remote as remote_package
    import interlock.wire as wire

    assert sorted(remote_package.__all__) == [
        "RemoteEngine",
        "TokenizerMismatch",
        "WorkerAddress",
        "WorkerAuthError",
        "WorkerMismatch",
        "WorkerTLSError",
        "WorkerUnreachable",
        "add_parser",
        "client_context",
        "serve_worker",
        "server_context",
    ]
    frame_names = {
        "MAX_FRAME_SIZE",
        "PROTOCOL_VERSION",
        "SUPPORTED_VERSIONS",
        "FrameParser",
        "ProtocolError",
        "decode_body",
        "encode_frame",
    }
    assert frame_names <= set(wire.__all__)
    for name in [*remote_package.__all__, *frame_names]:
        assert hasattr(remote_package, name) or hasattr(wire, name)
