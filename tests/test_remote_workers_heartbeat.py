"""The worker protocol's heartbeat: a worker process that stops without dying (SIGSTOP) breaks
its streams and leaves routing within ``heartbeat_timeout``, and rejoins when it runs again;
a live worker, however busy its engine, keeps its connection; a version-1 worker is served
without pings.

In-process tests run `RemoteEngine` against the worker's real connection handler over an
in-memory byte stream that the test can freeze (no byte moves either way, as with a stopped
process), under virtual time. The last test is the real thing: ``interlock serve`` over two
``interlock worker`` processes, one of them stopped with SIGSTOP while 8 streams run.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from helpers import wait_until
from test_http_remote_workers import CHAT, serving_over
from test_remote_workers_protocol import Events, collect, served

from interlock import WorkerGone, WorkerRefused
from interlock.engines.mock import MockEngine, MockTiming, mock_continuation
from interlock.engines.remote import RemoteEngine
from interlock.engines.remote._connection import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    FrameConnection,
)
from interlock.engines.remote._server import _Hub
from interlock.wire import PreprocessedRequest, WorkerJoined, WorkerLeft
from interlock.wire._frames import PROTOCOL_VERSION, Hello, Ping, Pong, Welcome

PROMPT = tuple(range(100, 140))
INTERVAL = 2.0
TIMEOUT = 10.0


class Worker:
    """An engine behind the worker's connection handler (`_Hub`), reached through
    `connect` over in-memory streams; `freeze` stops every byte of every connection both
    ways (new connections too) until `thaw`, as SIGSTOP and SIGCONT do to a process."""

    def __init__(self, engine: Any, **hub: Any) -> None:
        self.engine = engine
        self.hub = _Hub(engine, handshake_timeout=10.0, max_frame_size=2**26, **hub)
        self.frozen = False
        self._pumps: list[Callable[[], None]] = []
        self._nursery: trio.Nursery | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Worker]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.engine.run)
            remove = self.engine.add_listener(self.hub.publish)
            try:
                yield self
            finally:
                remove()
                nursery.cancel_scope.cancel()

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        """What `RemoteEngine` gets as ``open_connection``: the frontend's end of a new
        connection, whose other end the worker serves."""
        assert self._nursery is not None
        to_worker = self._one_way()
        to_frontend = self._one_way()
        frontend = trio.StapledStream(to_worker[0], to_frontend[1])
        worker = trio.StapledStream(to_frontend[0], to_worker[1])
        self._nursery.start_soon(self.hub.handle_connection, worker)
        await trio.lowlevel.checkpoint()
        return frontend

    def _one_way(self) -> tuple[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]:
        send = trio.testing.MemorySendStream()
        receive = trio.testing.MemoryReceiveStream()

        def pump() -> None:
            if not self.frozen:
                trio.testing.memory_stream_pump(send, receive)

        async def pump_async() -> None:
            pump()

        send.send_all_hook = pump_async
        send.close_hook = pump
        receive.receive_some_hook = pump_async
        self._pumps.append(pump)
        return send, receive

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        """Deliver what waited, both ways (a side closed meanwhile makes the other's writes
        fail, as a reset connection does)."""
        self.frozen = False
        for pump in self._pumps:
            try:
                pump()
            except trio.BrokenResourceError:
                pass


def timed(instance_id: int = 1) -> MockEngine:
    # About 6 ms per token (virtual): a long request is running when the test acts.
    return MockEngine(instance_id, timing=MockTiming(speedup_ratio=1.0))


def frontend(worker: Worker, **kwargs: Any) -> RemoteEngine:
    options: dict[str, Any] = {
        "heartbeat_interval": INTERVAL,
        "heartbeat_timeout": TIMEOUT,
        "open_connection": worker.connect,
    }
    return RemoteEngine("worker", 1, instance_id=1, **(options | kwargs))


@asynccontextmanager
async def connected(engine: RemoteEngine) -> AsyncIterator[RemoteEngine]:
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine
        nursery.cancel_scope.cancel()


def membership(events: Events) -> list[type[Any]]:
    return [type(e) for e in events.seen if type(e) in (WorkerLeft, WorkerJoined)]


def request(n: int, max_tokens: int = 3000) -> PreprocessedRequest:
    return PreprocessedRequest(token_ids=(*PROMPT, n), max_tokens=max_tokens)


# -- in-process, virtual time -----------------------------------------------------------------


async def test_a_frozen_worker_breaks_its_streams_leaves_routing_and_rejoins_when_thawed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = Worker(timed())
    engine = frontend(worker)
    async with worker.running(), connected(engine), AsyncExitStack() as stack:
        events = Events(engine)
        streams = [
            await stack.enter_async_context(engine.open_stream(request(n))) for n in range(3)
        ]
        for stream in streams:
            await stream.__anext__()  # running
        worker.freeze()
        frozen_at = trio.current_time()
        for stream in streams:
            with pytest.raises(WorkerGone, match=r"heartbeat_timeout=10.0s\): the worker process"):
                async for _ in stream:
                    pass
        # Virtual time, so exact: silent for the timeout, noticed at the latest one ping later.
        assert trio.current_time() - frozen_at <= TIMEOUT + INTERVAL
        assert engine.heartbeat_failures == 1
        assert not engine.connected and not engine.registered
        assert membership(events) == [WorkerLeft]
        with pytest.raises(WorkerRefused, match="is not connected"):
            async with engine.open_stream(request(9)):
                pass

        # Still stopped a minute later: the engine keeps trying and stays out of routing.
        await trio.sleep(60)
        assert not engine.connected and membership(events) == [WorkerLeft]

        worker.thaw()
        await events.wait_for(WorkerJoined)
        assert engine.connected and engine.connections == 2
        assert membership(events) == [WorkerLeft, WorkerJoined]
        outputs = await collect(engine, request(10, max_tokens=12))
        assert [t for o in outputs for t in o.token_ids] == mock_continuation(
            request(10).token_ids, 12
        )
        assert engine.heartbeat_failures == 1


async def test_a_live_worker_keeps_its_connection_however_long_its_engine_stalls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = Worker(timed())
    engine = frontend(worker)
    async with worker.running(), connected(engine):
        async with engine.open_stream(request(1, max_tokens=20)) as stream:
            first = await stream.__anext__()
            # The engine makes no progress for five heartbeat timeouts; the process runs, so
            # its reader answers every ping (a stalled stream is the pipeline's deadlines'
            # business, not the connection's).
            worker.engine.stall(5 * TIMEOUT)
            rest = [output async for output in stream]
        tokens = [t for o in (first, *rest) for t in o.token_ids]
        assert tokens == mock_continuation(request(1).token_ids, 20)
        # And an idle connection stays up: pongs are signs of life.
        await trio.sleep(10 * TIMEOUT)
        assert engine.connected and engine.connections == 1 and engine.heartbeat_failures == 0


async def test_a_frontend_whose_own_loop_was_blocked_reads_before_it_blames_the_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = Worker(timed())
    engine = frontend(worker)
    async with worker.running(), connected(engine):
        await trio.sleep(1)
        worker.freeze()
        (session,) = worker.hub.sessions
        session.conn.send_nowait(Pong(token=99))  # the worker answers...
        await trio.testing.wait_all_tasks_blocked()
        # ...but the frontend's loop is blocked past the timeout (a long synchronous call)
        # and wakes with the answer unread and its heartbeat deadline long gone.
        autojump_clock.jump(TIMEOUT + 5)
        worker.thaw()
        await trio.testing.wait_all_tasks_blocked()
        assert engine.connected and engine.heartbeat_failures == 0
        await trio.sleep(5 * TIMEOUT)
        assert engine.connected and engine.connections == 1


async def test_a_version_1_worker_gets_no_pings_and_is_never_timed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    received: list[Any] = []

    async def old_worker(stream: trio.abc.Stream) -> None:
        conn = FrameConnection(stream, "frontend")
        hello = await conn.receive()
        assert type(hello) is Hello and 1 in hello.versions and 2 in hello.versions
        conn.send_nowait(Welcome(version=1, worker_id=1, role="agg", block_size=16))
        await conn.serve(received.append)

    async def connect(host: str, port: int) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(old_worker, theirs)
        await trio.lowlevel.checkpoint()
        return ours

    engine = RemoteEngine("old", 1, instance_id=1, open_connection=connect)
    async with trio.open_nursery() as nursery, connected(engine):
        await trio.sleep(10 * engine.heartbeat_timeout)  # silent all along
        assert engine.connected and engine.heartbeat_failures == 0
        assert not any(type(m) is Ping for m in received)
        nursery.cancel_scope.cancel()


def test_the_heartbeat_timeout_must_exceed_the_interval() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval=10 must be positive and below"):
        RemoteEngine("h", 1, instance_id=1, heartbeat_interval=10, heartbeat_timeout=10)
    with pytest.raises(ValueError, match="heartbeat_interval=0"):
        RemoteEngine("h", 1, instance_id=1, heartbeat_interval=0)
    assert RemoteEngine("h", 1, instance_id=1, heartbeat_interval=None).heartbeat_interval is None


# -- TCP keepalive (real loopback sockets, real clock: nothing waits on time) ------------------


def _keepalive(sock: socket.socket) -> tuple[int, ...]:
    options = [sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)]
    for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"):
        if hasattr(socket, name):
            options.append(sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name)))
    return tuple(options)


async def test_both_ends_turn_tcp_keepalive_on() -> None:
    expected = (1, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
    engine_under_test = MockEngine(1, timing=MockTiming.zero())
    hub = _Hub(engine_under_test, handshake_timeout=5.0, max_frame_size=2**26)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            await nursery.start(engine_under_test.run)
            await nursery.start(trio.serve_listeners, hub.handle_connection, listeners)
            engine = RemoteEngine("127.0.0.1", port, instance_id=1)
            async with connected(engine):
                assert engine._link is not None
                client_socket = engine._link.conn.stream.socket  # type: ignore[attr-defined]
                options = _keepalive(client_socket)
                assert options == expected[: len(options)]
                await wait_until(lambda: bool(hub.sessions))
                (session,) = hub.sessions
                worker_socket = session.conn.stream.socket  # type: ignore[attr-defined]
                assert _keepalive(worker_socket) == _keepalive(client_socket)
            nursery.cancel_scope.cancel()


async def test_serve_worker_answers_pings_over_real_sockets() -> None:
    with trio.fail_after(10):
        async with served(MockEngine(1, timing=MockTiming.zero())) as address:
            engine = RemoteEngine(
                address.host, address.port, instance_id=1, heartbeat_interval=0.05,
                heartbeat_timeout=5.0,
            )  # fmt: skip
            async with connected(engine):
                assert engine._link is not None and engine._link.welcome.version == PROTOCOL_VERSION
                conn = engine._link.conn
                before = conn.last_receive
                await wait_until(lambda: conn.last_receive > before)  # a pong arrived
                assert engine.connected and engine.heartbeat_failures == 0


# -- real processes: interlock serve over two interlock workers, one stopped ------------------


async def _worker_counts(client: httpx.AsyncClient) -> dict[int, float]:
    metrics = (await client.get("/metrics")).text
    routed = re.findall(
        r'^interlock_worker_routed_requests_total\{[^}]*worker_id="(\d+)"[^}]*\} ([0-9.]+)$',
        metrics,
        re.MULTILINE,
    )
    counts: dict[int, float] = {}
    for worker_id, count in routed:
        counts[int(worker_id)] = counts.get(int(worker_id), 0) + float(count)
    return counts


async def _stream_text(
    client: httpx.AsyncClient, body: dict[str, Any], started: trio.Event | None = None
) -> tuple[str, str | None]:
    """Stream ``body``; the text and the finish reason (``started`` is set at the first
    token)."""
    text = ""
    finish = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            assert "error" not in event, event
            if not event["choices"]:
                continue
            choice = event["choices"][0]
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
            if started is not None and text:
                started.set()
    return text, finish


async def test_a_stopped_worker_process_is_migrated_from_and_rejoins_when_continued(
    tmp_path: Path,
) -> None:
    # Timed workers, so the streams are running when one worker stops. A short heartbeat keeps
    # the test short; the client's timeout is far above it (no timing is asserted).
    flags = ["--speedup", "2", "--tokenizer", "builtin", "--log-level", "info"]
    serve_flags = (
        "--migration-limit", "2", "--router-mode", "round_robin",
        "--worker-heartbeat-interval", "0.5", "--worker-heartbeat-timeout", "3",
    )  # fmt: skip
    bodies = [
        CHAT
        | {
            "messages": [{"role": "user", "content": f"Tell me about river number {n}."}],
            "max_tokens": 120,
            "ignore_eos": True,
            "stream": True,
        }
        for n in range(8)
    ]
    async with (
        serving_over(tmp_path, flags, *serve_flags) as (serve, workers),
        httpx.AsyncClient(base_url=serve.url, timeout=60) as client,
    ):
        with trio.fail_after(60):
            # The unbroken run: every stream's text with no fault.
            unbroken: dict[int, tuple[str, str | None]] = {}

            async def reference(n: int) -> None:
                unbroken[n] = await _stream_text(client, bodies[n])

            async with trio.open_nursery() as nursery:
                for n in range(len(bodies)):
                    nursery.start_soon(reference, n)
            expected = [unbroken[n][0] for n in range(len(bodies))]

        results: dict[int, tuple[str, str | None]] = {}
        started = [trio.Event() for _ in bodies]

        async def one(n: int) -> None:
            results[n] = await _stream_text(client, bodies[n], started[n])

        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for n in range(len(bodies)):
                        nursery.start_soon(one, n)
                    for event in started:
                        await event.wait()
                    # Every stream is running; worker 2 stops dead, its sockets open.
                    workers[2].process.send_signal(signal.SIGSTOP)
                assert [results[n] for n in range(len(bodies))] == [
                    (text, "length") for text in expected
                ]
                metrics = (await client.get("/metrics")).text
                migrated = re.search(r"^interlock_migrations_total (\S+)$", metrics, re.M)
                # The stopped worker's streams (4 with round robin) went on elsewhere.
                assert migrated is not None and float(migrated[1]) >= 1, metrics
                # It left routing: /health no longer lists it, and new requests avoid it.
                assert (await client.get("/health")).json()["workers"] == [1]
                before = await _worker_counts(client)
                for body in bodies[:4]:
                    short = body | {"max_tokens": 2, "stream": False}
                    reply = await client.post("/v1/chat/completions", json=short)
                    assert reply.status_code == 200, reply.text
                after = await _worker_counts(client)
                assert after.get(2, 0) == before.get(2, 0)
                assert after[1] == before.get(1, 0) + 4
        finally:
            workers[2].process.send_signal(signal.SIGCONT)
        with trio.fail_after(60):
            # Continued, it answers the engine's next handshake and rejoins.
            # (No event crosses the process boundary: polling /health is the point.)
            while (await client.get("/health")).json()["workers"] != [1, 2]:  # noqa: ASYNC110
                await trio.sleep(0.05)
            before = await _worker_counts(client)
            for body in bodies[:4]:
                reply = await client.post(
                    "/v1/chat/completions", json=body | {"max_tokens": 2, "stream": False}
                )
                assert reply.status_code == 200, reply.text
            after = await _worker_counts(client)
            assert after[2] > before.get(2, 0)  # round robin sends it its share again
    log = serve.log.read_text()
    assert "lost worker 2" in log and "heartbeat_timeout=3.0s" in log, log
