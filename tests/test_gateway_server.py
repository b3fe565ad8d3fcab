"""`serve_ext_proc`: the picker served over gRPC (grpcio's server in a thread of its own) from
a trio run, driven by grpcio's client in lockstep as Envoy drives it: streams answered and
their bookings freed however they end (the half-close, the client dropping the stream, the
server stopping, a message that is not a ProcessingRequest), gRPC health on both ports, one
server thread however many streams are open, none left after the server stops (or one left
behind, with a warning, when grpcio's shutdown is stuck), a server thread that dies raised.

Real sockets and threads: the trio clock is the real one; waits are events with a deadline."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import queue
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import grpc
import pytest
import trio
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from grpc.aio._server import Server as AioServer  # grpc.aio.Server is its abstract base
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub
from test_gateway_ext_proc import (
    Picking,
    chat_body,
    picking,
    request_body,
    request_headers,
    response_body,
    response_headers,
    set_headers,
)

from interlock.gateway import EXT_PROC_SERVICE, _server, serve_ext_proc

TIMEOUT = 30.0
SERVER_THREAD = "interlock-ext-proc"


class Bookings(set[str]):
    """The picker's ``booked`` ids, with an event set at each change: the picker's tasks change
    them in this trio run, so a test waits for a booking to be freed without polling."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = trio.Event()

    def add(self, request_id: str) -> None:
        super().add(request_id)
        self._changed()

    def discard(self, request_id: str) -> None:
        super().discard(request_id)
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def until_free(self) -> None:
        """Wait until nothing is booked (a deadline: the server's thread works meanwhile)."""
        with trio.fail_after(TIMEOUT):
            while self:
                await self.changed.wait()


@attrs.define
class Served:
    picking: Picking
    ext_proc: str
    health: str
    #: Cancels the server.
    scope: trio.CancelScope
    stopped: trio.Event

    @property
    def booked(self) -> Bookings:
        booked = self.picking.picker.booked
        assert isinstance(booked, Bookings)
        return booked


@asynccontextmanager
async def serving() -> AsyncIterator[Served]:
    """A picker over in-process mock workers, served on free ports until the block ends."""
    async with picking() as p, trio.open_nursery() as nursery:
        p.picker.booked = Bookings()
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def serve(task_status: trio.TaskStatus[tuple[str, str | None]]) -> None:
            with scope:
                await serve_ext_proc(
                    p.picker, "127.0.0.1", 0, health_port=0, task_status=task_status
                )
            stopped.set()

        ext_proc, health = await nursery.start(serve)
        assert health is not None
        yield Served(p, ext_proc, health, scope, stopped)
        scope.cancel()


def _serialize(message: ProcessingRequest | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


class Lockstep:
    """One ext_proc stream from grpcio's client: `send` a message, `receive` an answer (both
    blocking: call them in a worker thread)."""

    def __init__(self, address: str, *, timeout: float = TIMEOUT) -> None:
        self.channel = grpc.insecure_channel(address)
        self.outgoing: queue.Queue[ProcessingRequest | bytes | None] = queue.Queue()
        process = self.channel.stream_stream(
            f"/{EXT_PROC_SERVICE}/Process",
            request_serializer=_serialize,
            response_deserializer=ProcessingResponse.FromString,
        )
        self.call: Any = process(self._requests(), timeout=timeout)

    def _requests(self) -> Iterator[ProcessingRequest | bytes]:
        while (message := self.outgoing.get()) is not None:
            yield message

    def send(self, message: ProcessingRequest | bytes | None) -> None:
        """Send ``message`` (bytes: as they are, whatever they hold; None: half-close)."""
        self.outgoing.put(message)

    def receive(self) -> ProcessingResponse:
        answer: ProcessingResponse = next(self.call)
        return answer

    def rest(self) -> list[ProcessingResponse]:
        """The answers left, to the stream's end (raises `grpc.RpcError` if it fails)."""
        return list(self.call)

    def close(self) -> None:
        self.call.cancel()
        self.outgoing.put(None)
        self.channel.close()


async def in_thread(function: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(function, *args)


async def picked(stream: Lockstep) -> str:
    """Send a chat request's headers and body; the destination of the pick (its body checked)."""
    body = chat_body()
    stream.send(request_headers())
    stream.send(request_body(body, True))
    headers = await in_thread(stream.receive)
    destination = set_headers(headers, "request_headers")["x-gateway-destination-endpoint"]
    destination = destination.split(",")[0]
    back = await in_thread(stream.receive)
    assert back.request_body.response.body_mutation.streamed_response.body == body
    return destination


def server_streams(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The server's streams (`_server._Stream`), as the calls open."""
    opened: list[Any] = []

    class Recorded(_server._Stream):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            opened.append(self)

    monkeypatch.setattr(_server, "_Stream", Recorded)
    return opened


def server_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == SERVER_THREAD]


async def test_a_stream_in_lockstep_is_picked_and_its_booking_freed_at_its_end() -> None:
    async with serving() as s:
        stream = Lockstep(s.ext_proc)
        try:
            destination = await picked(stream)
            assert destination in {s.picking.endpoint(w.instance_id) for w in s.picking.workers}
            assert len(s.picking.picker.booked) == 1
            stream.send(response_headers(200))
            answer = await in_thread(stream.receive)
            assert answer.WhichOneof("response") == "response_headers"
            stream.send(None)
            assert await in_thread(stream.rest) == []
            assert stream.call.code() == grpc.StatusCode.OK
            # The call ends at the half-close once every message is answered; the stream's
            # task frees the booking in the trio thread as it takes that end.
            await s.booked.until_free()
            assert await s.picking.pipeline.load() == {}
        finally:
            stream.close()


async def test_a_stream_the_client_drops_frees_its_booking() -> None:
    async with serving() as s:
        stream = Lockstep(s.ext_proc)
        try:
            await picked(stream)
            assert s.picking.picker.booked
            stream.call.cancel()
            await s.booked.until_free()
            assert await s.picking.pipeline.load() == {}
        finally:
            stream.close()


async def test_stopping_the_server_ends_open_streams_frees_them_and_leaves_no_thread() -> None:
    streams: list[Lockstep] = []
    try:
        async with serving() as s:
            streams = [Lockstep(s.ext_proc) for _ in range(20)]
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(picked, stream)
            assert len(s.picking.picker.booked) == 20
            # One server thread however many streams are open: none is held per stream.
            assert len(server_threads()) == 1
            s.scope.cancel()
            with trio.fail_after(TIMEOUT):
                await s.stopped.wait()
            assert not server_threads()
            assert not s.picking.picker.booked
            assert await s.picking.pipeline.load() == {}
            for stream in streams:
                with pytest.raises(grpc.RpcError) as failed:
                    await in_thread(stream.rest)
                # Answered before the server stopped (not merely cancelled by its stop).
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
    finally:
        for stream in streams:
            stream.close()


def check(address: str, service: str) -> Any:
    with grpc.insecure_channel(address) as channel:
        return HealthStub(channel).Check(HealthCheckRequest(service=service), timeout=TIMEOUT)


async def test_health_on_both_ports_says_not_serving_while_draining() -> None:
    serving_, not_serving = HealthCheckResponse.SERVING, HealthCheckResponse.NOT_SERVING
    names = ("", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor")
    async with serving() as s:
        for address in (s.ext_proc, s.health):
            assert (await in_thread(check, address, "liveness")).status == serving_
            for name in names:
                assert (await in_thread(check, address, name)).status == serving_, name
            with pytest.raises(grpc.RpcError) as unknown:
                await in_thread(check, address, "nothing.Here")
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        s.picking.picker.frontend.drain.start()
        for address in (s.ext_proc, s.health):
            assert (await in_thread(check, address, "liveness")).status == serving_
            for name in names:
                assert (await in_thread(check, address, name)).status == not_serving, name


async def test_the_health_port_serves_no_picks() -> None:
    async with serving() as s:
        stream = Lockstep(s.health)
        try:
            stream.send(request_headers())
            with pytest.raises(grpc.RpcError) as refused:
                await in_thread(stream.rest)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            stream.close()


async def test_a_taken_port_is_an_oserror_naming_the_address() -> None:
    async with picking() as p:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(BaseException) as failed:  # noqa: PT011 (a group or the error)
                async with trio.open_nursery() as nursery:
                    await nursery.start(serve_ext_proc, p.picker, "127.0.0.1", port)
        error = failed.value
        while isinstance(error, BaseExceptionGroup):
            (error,) = error.exceptions
        assert isinstance(error, OSError), error
        assert error.filename == f"127.0.0.1:{port}"
        assert not server_threads()


async def test_a_body_in_many_more_chunks_than_the_queues_hold_comes_back_whole() -> None:
    # Envoy may send a body in many chunks before the picker answers; the answers of a large
    # body are many chunks too: both directions fill their bounded queues and wait for room.
    body = chat_body("x" * 1_500_000)
    async with serving() as s:
        stream = Lockstep(s.ext_proc)
        try:
            stream.send(request_headers())
            size = len(body) // 200 + 1
            for offset in range(0, len(body), size):
                last = offset + size >= len(body)
                stream.send(request_body(body[offset : offset + size], last))
            picked = await in_thread(stream.receive)
            assert picked.WhichOneof("response") == "request_headers", picked
            back = b""
            parts = 0
            while True:
                part = await in_thread(stream.receive)
                streamed = part.request_body.response.body_mutation.streamed_response
                back += streamed.body
                parts += 1
                if streamed.end_of_stream:
                    break
            assert back == body and parts > 16
            stream.send(None)
            assert await in_thread(stream.rest) == []
            await s.booked.until_free()
        finally:
            stream.close()


async def test_a_half_close_amid_a_batch_queued_in_parts_ends_the_call_after_it() -> None:
    # The pick's answer to a body of several chunks passes the byte window, so the trio task
    # queues it in parts, waiting for room between them. A half-close read meanwhile must not
    # take the shortcut (the task has not answered the message until all of it is queued):
    # the call ends after the last chunk, OK, and the booking is freed.
    body = chat_body("x" * 400_000)
    async with serving() as s:
        stream = Lockstep(s.ext_proc)
        try:
            stream.send(request_headers())
            stream.send(request_body(body, True))
            # Read the pick's answer first: the task is putting the body's parts by then.
            answers = [await in_thread(stream.receive)]
            stream.send(None)
            answers += await in_thread(stream.rest)
            assert stream.call.code() == grpc.StatusCode.OK
            assert answers[0].WhichOneof("response") == "request_headers", answers[0]
            streamed = [
                a.request_body.response.body_mutation.streamed_response for a in answers[1:]
            ]
            assert len(streamed) > 2, "the body's answer fits the window: nothing queued in parts"
            assert b"".join(part.body for part in streamed) == body
            assert [part.end_of_stream for part in streamed] == [False] * (len(streamed) - 1) + [
                True
            ]
            await s.booked.until_free()
        finally:
            stream.close()


async def test_a_gateway_that_does_not_read_its_answers_is_held_back_by_flow_control(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The gRPC thread answers response chunks itself: it must stop reading once its answers
    # fill the window, as the trio task waits for room, or a gateway that sends a long response
    # and reads nothing back makes it queue the whole response (its chunks echoed).
    opened = server_streams(monkeypatch)
    chunk = b"x" * 60_000
    sent = 400  # 24 MB: far more than gRPC's flow-control windows hold
    async with serving() as s:
        stream = Lockstep(s.ext_proc)
        try:
            await picked(stream)
            stream.send(response_headers(200))
            await in_thread(stream.receive)
            for _ in range(sent):
                stream.send(response_body(chunk))
            (server_stream,) = opened
            answers = server_stream.responses
            with trio.fail_after(TIMEOUT):
                # Until the gRPC thread waits for its answers to be sent (a condition, polled).
                while not answers.producer_waits:
                    assert_bounded(answers, len(chunk))
                    await trio.sleep(0.01)
            assert_bounded(answers, len(chunk))
            # Flow control holds the client back: most of what it would send is still its own.
            assert stream.outgoing.qsize() > sent // 2
            # Once the client reads, the stream goes on, whole and in order.
            stream.send(response_body(b"end", True))
            stream.send(None)
            back = [
                a.response_body.response.body_mutation.streamed_response
                for a in await in_thread(stream.rest)
            ]
            assert [b.body for b in back] == [chunk] * sent + [b"end"]
            await s.booked.until_free()
        finally:
            stream.close()


def assert_bounded(answers: Any, chunk: int) -> None:
    """``answers`` (a stream's queue) holds at most its window: in messages (a message's few
    answers past it), and in body bytes (one chunk past it, its framing aside)."""
    with answers._lock:
        queued = list(answers._items)
    assert len(queued) <= 2 * _server._WINDOW, f"{len(queued)} answers queued"
    held = sum(answer.ByteSize() for answer in queued)
    assert held <= _server._WINDOW_BYTES + chunk + 100 * len(queued), f"{held} bytes queued"


#: Not a ProcessingRequest: a field number 0 (a corrupt wire format).
GARBAGE = b"\xff\xff\xff\xff garbage"


async def test_a_message_that_is_not_a_processing_request_ends_the_stream_and_its_booking() -> None:
    # Anyone reaching the port can send it: the stream must not hang on, holding the load
    # booked for its request, until the client's deadline.
    async with serving() as s:
        stream = Lockstep(s.ext_proc)
        try:
            await picked(stream)
            assert len(s.booked) == 1
            stream.send(GARBAGE)
            with pytest.raises(grpc.RpcError) as failed:
                await in_thread(stream.rest)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value
            assert "not a valid ProcessingRequest" in failed.value.details()
            await s.booked.until_free()
            assert await s.picking.pipeline.load() == {}
        finally:
            stream.close()


async def test_a_first_message_that_is_not_a_processing_request_is_invalid_argument() -> None:
    async with serving() as s:
        stream = Lockstep(s.ext_proc)
        try:
            stream.send(GARBAGE)
            with pytest.raises(grpc.RpcError) as failed:
                await in_thread(stream.rest)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value
            assert not s.booked
        finally:
            stream.close()


def leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        (error,) = error.exceptions
    return error


async def test_an_unassigned_address_is_an_oserror_with_its_own_errno() -> None:
    async with picking() as p:
        with pytest.raises(BaseException) as failed:  # noqa: PT011 (a group or the error)
            async with trio.open_nursery() as nursery:
                # TEST-NET-1 (RFC 5737): no interface of this machine has it.
                await nursery.start(serve_ext_proc, p.picker, "192.0.2.1", 0)
        error = leaf(failed.value)
        assert isinstance(error, OSError), error
        assert error.errno == errno.EADDRNOTAVAIL, error
        assert error.filename == "192.0.2.1:0"
        assert "192.0.2.1:0" in str(error)
        assert not server_threads()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_an_ipv6_host_is_reported_in_brackets_and_answers_there() -> None:
    async with picking() as p, trio.open_nursery() as nursery:
        ext_proc, health = await nursery.start(
            functools.partial(serve_ext_proc, p.picker, "::1", 0, health_port=0)
        )
        for address in (ext_proc, health):
            assert address.startswith("[::1]:"), address
            assert (await in_thread(check, address, "liveness")).status == (
                HealthCheckResponse.SERVING
            )
        nursery.cancel_scope.cancel()


async def test_a_server_thread_that_dies_is_raised_and_not_slept_through() -> None:
    with pytest.raises(BaseException) as failed:  # noqa: PT011 (a group or the error)
        async with serving() as s:
            (thread,) = server_threads()
            # Stop the server's asyncio loop under it, as a crash of the thread would.
            loop: asyncio.AbstractEventLoop = thread._target.__self__.loop  # type: ignore[attr-defined]
            loop.call_soon_threadsafe(loop.stop)
            with trio.fail_after(TIMEOUT):
                await s.stopped.wait()  # set only if serve_ext_proc returned
    error = leaf(failed.value)
    assert isinstance(error, RuntimeError), error
    assert "Event loop stopped" in str(error)
    assert not server_threads()


async def test_a_stuck_grpc_shutdown_is_left_behind_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    stop = AioServer.stop

    async def stuck_stop(self: grpc.aio.Server, grace: float | None) -> None:
        # grpcio's shutdown hangs (until the test releases it, not to leak the thread).
        await asyncio.to_thread(release.wait)
        await stop(self, grace)

    monkeypatch.setattr(AioServer, "stop", stuck_stop)
    monkeypatch.setattr(_server, "_JOIN_TIMEOUT", 0.1)
    caplog.set_level(logging.WARNING, "interlock.gateway")
    try:
        async with serving() as s:
            s.scope.cancel()
            with trio.fail_after(TIMEOUT):
                await s.stopped.wait()
            assert len(server_threads()) == 1
            assert any("left behind" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        release.set()
        for thread in server_threads():
            await in_thread(thread.join, TIMEOUT)
    assert not server_threads()


class CountedWaiter:
    """A `_server._Queue` side that counts its wake-ups (the real ones cross threads)."""

    def __init__(self) -> None:
        self.wakes = 0

    def prepare(self) -> None:
        pass

    def wake(self) -> None:
        self.wakes += 1


def test_answers_put_together_wake_a_waiting_consumer_once() -> None:
    producer, consumer = CountedWaiter(), CountedWaiter()
    answers = _server._Queue(producer, consumer)  # type: ignore[arg-type]
    assert answers.take() is None  # the consumer waits now
    assert not answers.put_all(["pick", "chunk", "chunk"])
    assert consumer.wakes == 1, "one hand-over, one wake-up"
    assert answers.take() == ["pick", "chunk", "chunk"]
    # Full past `_WINDOW` items: the producer is told to wait, and woken by the next take.
    assert answers.put_all(list(range(_server._WINDOW)))
    assert consumer.wakes == 1, "the consumer was not waiting"
    assert answers.take() == list(range(_server._WINDOW)) and producer.wakes == 1


def test_a_batch_of_body_chunks_is_held_within_the_byte_window_and_one_chunk() -> None:
    # `_WINDOW_BYTES`' promise: "a queue holds at most that and one chunk (~126 kB)". A pick's
    # answer to a long duplex body is one batch (`_Queue.put_all`): it must not put every
    # chunk in at once (an 8 MiB body: ~136 chunks held), as one `put` after another waiting
    # at the full window would not.
    from interlock.gateway import BODY_CHUNK_BYTES
    from interlock.gateway._picker import _streamed

    producer, consumer = CountedWaiter(), CountedWaiter()
    answers = _server._Queue(producer, consumer)  # type: ignore[arg-type]
    chunk = b"x" * BODY_CHUNK_BYTES
    batch = [_streamed("request_body", chunk, False) for _ in range(8)]
    answers.put_all(batch)
    held = sum(item.ByteSize() for item in answers._items)
    assert held <= _server._WINDOW_BYTES + batch[0].ByteSize(), held


def test_a_batch_past_the_window_is_put_in_parts_in_order_one_wake_up_a_part() -> None:
    # `put_all` takes what fits from the front of the batch and leaves the rest, with the
    # producer told to wait: each part is one hand-over (one wake-up of the waiting consumer,
    # whose `take` wakes the producer for the next), and the parts keep the batch's order.
    from interlock.gateway import BODY_CHUNK_BYTES
    from interlock.gateway._picker import _streamed

    producer, consumer = CountedWaiter(), CountedWaiter()
    answers = _server._Queue(producer, consumer)  # type: ignore[arg-type]
    batch = [_streamed("request_body", bytes([n]) * BODY_CHUNK_BYTES, False) for n in range(6)]
    rest = list(batch)
    taken: list[Any] = []
    parts = 0
    while rest:
        assert answers.take() is None  # the consumer waits
        assert answers.put_all(rest), "a part past the window leaves the producer waiting"
        parts += 1
        assert consumer.wakes == parts, "one wake-up a part"
        taken += answers.take() or []
        assert producer.wakes == parts, "each take wakes the producer for the rest"
    assert taken == batch and parts == 3
