"""`serve_ext_proc`: the picker served over gRPC (h2 on trio sockets, in this trio run) driven
by grpcio's client in lockstep as Envoy drives it: streams answered and their bookings freed
however they end (the half-close, the client dropping the stream, the server stopping, a
message that is not a ProcessingRequest), gRPC health on both ports, flow control holding back
a client that does not read, no task left after the server stops. The transport's own risks
(raw HTTP/2 frames) are in tests/test_gateway_grpc.py.

Real sockets (grpcio's client in worker threads): the trio clock is the real one; waits are
events with a deadline."""

from __future__ import annotations

import errno
import functools
import queue
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import grpc
import pytest
import trio
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
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

from interlock.gateway import EXT_PROC_SERVICE, _grpc, _server, serve_ext_proc

TIMEOUT = 30.0


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
    """The server's ext_proc calls (`_server._Process`), as the streams open."""
    opened: list[Any] = []

    class Recorded(_server._Process):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            opened.append(self)

    monkeypatch.setattr(_server, "_Process", Recorded)
    return opened


def server_connections(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The server's connections (`_grpc.GrpcConnection`), as they are accepted."""
    opened: list[Any] = []

    class Recorded(_server.GrpcConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(_server, "GrpcConnection", Recorded)
    return opened


def closed(connection: Any) -> bool:
    """Whether ``connection``'s socket (h2c) is closed."""
    sock: socket.socket = connection._io._socket
    return sock.fileno() == -1


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


async def test_stopping_the_server_ends_open_streams_frees_them_and_leaves_no_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connections = server_connections(monkeypatch)
    streams: list[Lockstep] = []
    try:
        async with serving() as s:
            streams = [Lockstep(s.ext_proc) for _ in range(20)]
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(picked, stream)
            assert len(s.picking.picker.booked) == 20
            s.scope.cancel()
            with trio.fail_after(TIMEOUT):
                await s.stopped.wait()
            # `serve_ext_proc` returned: its nursery, every connection's and stream's task
            # in it, has ended; and every connection's socket is closed.
            assert connections and all(closed(c) for c in connections)
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
    # Response chunks are answered at once, echoed: the connection must stop answering once
    # its answers wait for the client's window, or a gateway that sends a long response and
    # reads nothing back makes it hold the whole response.
    connections = server_connections(monkeypatch)
    chunk = b"x" * 60_000
    sent = 400  # 24 MB: far more than HTTP/2's flow-control windows hold
    async with serving() as s:
        stream = Lockstep(s.ext_proc)
        try:
            await picked(stream)
            stream.send(response_headers(200))
            await in_thread(stream.receive)
            for _ in range(sent):
                stream.send(response_body(chunk))
            (connection,) = connections
            with trio.fail_after(TIMEOUT):
                # Until the connection stops answering (a condition, polled).
                while not connection._stalled:
                    assert_bounded(connection, len(chunk))
                    await trio.sleep(0.01)
            assert_bounded(connection, len(chunk))
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


def assert_bounded(connection: Any, chunk: int) -> None:
    """``connection`` holds at most `_HELD_BYTES` of answers waiting for the client's window,
    and one answer past it (its framing aside); what it read and did not answer is bounded by
    its flow-control windows."""
    held = connection.held_bytes
    assert held <= _grpc._HELD_BYTES + chunk + 200, f"{held} answer bytes held"
    unread = sum(len(stream.inbound) for stream in connection._streams.values())
    assert unread <= _grpc._STREAM_WINDOW, f"{unread} bytes read and not answered"


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


class TwoLoopbacks(trio.abc.HostnameResolver):
    """Resolves every name to two loopback addresses (as ``localhost`` may: 127.0.0.1, ::1)."""

    async def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
            for address in ("127.0.0.1", "127.0.0.2")
        ]

    async def getnameinfo(self, *args: Any) -> Any:
        raise NotImplementedError


def _free_port_other_than(port: int) -> int:
    """A free port of 127.0.0.2 that is not ``port``. Not port 0 for the listener to bind:
    Linux may give a bind to port 0 a port another address already holds (it reuses a bound
    port's bucket when SO_REUSEADDR allows), and the addresses would not split."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
            free: int = probe.getsockname()[1]
        if free != port:
            return free


class SplitRebinds(trio.abc.HostnameResolver):
    """Two loopback addresses; the first bind and the first ``split`` rebinds on one port give
    the second address a free port of its own (as when that port is taken there), the later
    rebinds do not."""

    def __init__(self, split: int) -> None:
        self.split = split
        self.rebinds = 0

    async def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        second = port
        if port:
            self.rebinds += 1
        if not port or self.rebinds <= self.split:
            second = _free_port_other_than(port)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, bound))
            for address, bound in (("127.0.0.1", port), ("127.0.0.2", second))
        ]

    async def getnameinfo(self, *args: Any) -> Any:
        raise NotImplementedError


@pytest.mark.parametrize("split", [_server._SAME_PORT_TRIES - 1, _server._SAME_PORT_TRIES])
async def test_every_rebind_of_port_0_is_checked_the_last_too(split: int) -> None:
    # The last allowed rebind gives one port: it is taken; one more would be needed: an error.
    resolver = SplitRebinds(split)
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        if split < _server._SAME_PORT_TRIES:
            listeners = await _server._listen("picker.test", 0)
            ports = {listener.socket.getsockname()[1] for listener in listeners}
            for listener in listeners:
                await listener.aclose()
            assert len(ports) == 1
        else:
            with pytest.raises(OSError, match="no free port on every address"):
                await _server._listen("picker.test", 0)
        assert resolver.rebinds == min(split + 1, _server._SAME_PORT_TRIES)
    finally:
        trio.socket.set_custom_hostname_resolver(previous)


async def test_port_0_on_a_name_of_two_addresses_listens_on_one_port_on_both() -> None:
    # Port 0 binds each address on a free port of its own: the one reported must be served
    # on every address the name has.
    previous = trio.socket.set_custom_hostname_resolver(TwoLoopbacks())
    try:
        async with picking() as p, trio.open_nursery() as nursery:
            address, _ = await nursery.start(serve_ext_proc, p.picker, "picker.test", 0)
            port = int(address.rpartition(":")[2])
            for host in ("127.0.0.1", "127.0.0.2"):
                status = (await in_thread(check, f"{host}:{port}", "liveness")).status
                assert status == HealthCheckResponse.SERVING, host
            nursery.cancel_scope.cancel()
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
