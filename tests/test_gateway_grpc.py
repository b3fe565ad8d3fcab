"""The ext_proc server's own transport (`interlock.gateway._grpc`: gRPC over h2 on trio
sockets), driven with raw HTTP/2 frames (h2's client side) over real loopback sockets against
the real picker (`serve_ext_proc`): the risks of an HTTP/2 server of our own. Flow control
holds back a client both ways; a stream reset mid-pick, or a connection dropped with streams
open, frees every booking; garbage, a bad preface or a broken frame ends that connection only;
messages over the size limit or compressed are refused with a status that says why; stopping
answers open streams UNAVAILABLE, says GOAWAY and closes; many streams share a connection; TLS
without HTTP/2 by ALPN is closed; h2's eager frame repr is skipped.

Real sockets: the trio clock is the real one; waits are conditions with a deadline (the server
runs in this trio run: once every task is blocked, all it sent is in the client's socket)."""

from __future__ import annotations

import functools
import inspect
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hyperframe.frame
import pytest
import trio
import trio.testing
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from grpc_health.v1.health_pb2 import HealthCheckResponse
from hypothesis import example, given
from hypothesis import strategies as st
from test_gateway_ext_proc import chat_body, picking, request_body, request_headers, response_body
from test_gateway_server import TIMEOUT, check, in_thread, server_connections, serving

from interlock.gateway import _grpc, _server, serve_ext_proc
from interlock.gateway._tls import self_signed_tls

PROCESS = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def framed(message: ProcessingRequest | bytes, *, flag: int = 0) -> bytes:
    """A gRPC message: its 5-byte prefix (``flag``: compressed) and its bytes."""
    data = message if isinstance(message, bytes) else message.SerializeToString()
    return bytes([flag]) + len(data).to_bytes(4, "big") + data


def h2_client() -> tuple[h2.connection.H2Connection, int]:
    """An HTTP/2 client (h2's, sans IO) that has opened one stream (its id) to ``/echo``."""
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    stream_id: int = client.get_next_available_stream_id()
    client.send_headers(stream_id, [(b":method", b"POST"), (b":path", b"/echo"),
                                    (b":scheme", b"http"), (b":authority", b"a")])  # fmt: skip
    return client, stream_id


class RawClient:
    """An HTTP/2 client of h2's on a non-blocking stdlib socket, in this trio run: it reads
    only when told to (`pump`, `until`), so the server sees a client that does not read."""

    def __init__(self, address: str, *, window: int = 65_535) -> None:
        host, _, port = address.rpartition(":")
        self.socket = socket.create_connection((host, int(port)))
        self.socket.setblocking(False)
        self.h2 = echo_client(window=window)
        self.events: list[Any] = []
        #: Each stream's DATA, as received.
        self.data: dict[int, bytearray] = {}
        self.trailers: dict[int, dict[bytes, bytes]] = {}
        self.closed = False

    async def send(self, data: bytes | None = None) -> None:
        """Send ``data`` (raw bytes, HTTP/2 or not) or what h2 has to send."""
        view = memoryview(data if data is not None else self.h2.data_to_send())
        while view:
            await trio.lowlevel.wait_writable(self.socket)
            try:
                view = view[self.socket.send(view) :]
            except BlockingIOError:
                continue

    async def open(self, path: bytes = PROCESS) -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream_id,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path),
                (b":authority", b"picker"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ],
        )
        await self.send()
        return stream_id

    async def message(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        self.h2.send_data(stream_id, data, end_stream=end)
        await self.send()

    def _feed(self, data: bytes) -> None:
        if not data:
            self.closed = True
            return
        for event in self.h2.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived):
                self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
            elif isinstance(event, h2.events.TrailersReceived):
                self.trailers[event.stream_id] = dict(event.headers)
            elif isinstance(event, h2.events.ResponseReceived) and event.stream_ended:
                self.trailers[event.stream_id] = dict(event.headers)  # trailers-only

    async def pump(self) -> None:
        """Read what the server has sent (once every task here is blocked), without answering
        it: no WINDOW_UPDATE goes out."""
        await trio.testing.wait_all_tasks_blocked()
        while not self.closed:
            try:
                data = self.socket.recv(1 << 20)
            except BlockingIOError:
                return
            except ConnectionResetError:
                data = b""
            self._feed(data)

    async def until(self, done: Callable[[], bool]) -> None:
        """Read (acknowledging what arrives) until ``done()``."""
        with trio.fail_after(TIMEOUT):
            while True:
                for event in self.events:  # what `pump` left unacknowledged too
                    if isinstance(event, h2.events.DataReceived) and event.stream_id:
                        self.h2.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                self.events.clear()
                await self.send()
                if done():
                    return
                assert not self.closed, "the server closed the connection"
                await trio.lowlevel.wait_readable(self.socket)
                try:
                    data = self.socket.recv(1 << 20)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                self._feed(data)

    async def until_closed(self) -> None:
        with trio.fail_after(TIMEOUT):
            while not self.closed:
                await trio.lowlevel.wait_readable(self.socket)
                await self.pump()

    def answers(self, stream_id: int) -> list[ProcessingResponse]:
        data = bytes(self.data.get(stream_id, b""))
        answers = []
        while data:
            size = int.from_bytes(data[1:5], "big")
            answers.append(ProcessingResponse.FromString(data[5 : 5 + size]))
            data = data[5 + size :]
        return answers

    def status(self, stream_id: int) -> tuple[int, str] | None:
        trailers = self.trailers.get(stream_id)
        if trailers is None:
            return None
        return int(trailers[b"grpc-status"]), trailers.get(b"grpc-message", b"").decode()

    def close(self) -> None:
        self.socket.close()


async def pick(client: RawClient) -> int:
    """A stream whose request is picked (its answers read); its id."""
    stream_id = await client.open()
    await client.message(stream_id, framed(request_headers()))
    await client.message(stream_id, framed(request_body(chat_body(), True)))
    await client.until(lambda: len(client.answers(stream_id)) >= 2)
    return stream_id


async def served_next(address: str) -> None:
    """The server is alive: a new connection is served."""
    status = (await in_thread(check, address, "liveness")).status
    assert status == HealthCheckResponse.SERVING


async def test_flow_control_holds_back_a_client_that_does_not_read_both_ways(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The client reads nothing back (its window: 64 KiB): the server holds its answers, stops
    # answering at `_HELD_BYTES`, and gives the client no more window past its own stream
    # window: the client cannot send more. Once it reads, all comes back whole, in order.
    connections = server_connections(monkeypatch)
    chunk = b"x" * 30_000
    async with serving() as s:
        client = RawClient(s.ext_proc)
        try:
            stream_id = await pick(client)
            sent = 0
            # A byte budget past what the server may let in: a server that kept granting
            # window would fail here, not loop for ever.
            budget = _grpc._STREAM_WINDOW + _grpc._HELD_BYTES + 200_000
            while client.h2.local_flow_control_window(stream_id) >= len(chunk) + 100:
                assert sent * len(chunk) < budget, "the server keeps granting window"
                await client.message(stream_id, framed(response_body(chunk)))
                sent += 1
                await client.pump()  # the server's WINDOW_UPDATEs, if it gives any
            (connection,) = connections
            assert connection._stalled, "the server still answers a client that does not read"
            assert connection.held_bytes <= _grpc._HELD_BYTES + len(chunk) + 100
            assert sent * len(chunk) < budget
            await client.message(stream_id, framed(response_body(b"end", True)), end=True)
            await client.until(lambda: client.status(stream_id) is not None)
            assert client.status(stream_id) == (0, "")
            bodies = [
                a.response_body.response.body_mutation.streamed_response.body
                for a in client.answers(stream_id)[2:]
            ]
            assert bodies == [chunk] * sent + [b"end"]
            await s.booked.until_free()
        finally:
            client.close()


@pytest.mark.parametrize("same_read", [True, False])
async def test_a_stream_reset_mid_pick_frees_its_booking(same_read: bool) -> None:
    async with serving() as s:
        client = RawClient(s.ext_proc)
        try:
            stream_id = await client.open()
            client.h2.send_data(stream_id, framed(request_headers()))
            client.h2.send_data(stream_id, framed(request_body(chat_body(), True)))
            if not same_read:
                await client.send()
                await trio.testing.wait_all_tasks_blocked()  # the pick's task has started
            client.h2.reset_stream(stream_id)
            await client.send()
            await trio.testing.wait_all_tasks_blocked()
            await s.booked.until_free()
            assert await s.picking.pipeline.load() == {}
            # The connection serves on.
            assert len(await pick_on(client)) == 2
        finally:
            client.close()


async def pick_on(client: RawClient) -> list[ProcessingResponse]:
    stream_id = await pick(client)
    return client.answers(stream_id)


async def test_a_connection_dropped_with_streams_open_frees_every_booking() -> None:
    async with serving() as s:
        client = RawClient(s.ext_proc)
        try:
            for _ in range(5):
                await pick(client)
            assert len(s.booked) == 5
        finally:
            client.close()
        await s.booked.until_free()
        assert await s.picking.pipeline.load() == {}
        await served_next(s.ext_proc)


@pytest.mark.parametrize(
    "ending",
    [
        # DATA on stream 0: a connection error, h2's ProtocolError (then GOAWAY, closed).
        pytest.param(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x", id="protocol-error"),
        # The peer's own GOAWAY (a graceful close), then its socket closed.
        pytest.param(None, id="goaway"),
    ],
)
async def test_a_connection_the_peer_breaks_or_says_goaway_on_frees_every_streams_booking(
    ending: bytes | None,
) -> None:
    # h2 is CLOSED once it raised a ProtocolError or received a GOAWAY: answering the open
    # streams UNAVAILABLE must not raise out of `stop` after the first (leaving the others'
    # calls open and their bookings held for good).
    async with serving() as s:
        client = RawClient(s.ext_proc)
        try:
            for _ in range(3):
                await pick(client)
            assert len(s.booked) == 3
            if ending is None:
                client.h2.close_connection()
                await client.send()
            else:
                await client.send(ending)
                await client.until_closed()
        finally:
            client.close()
        with trio.fail_after(5):
            await s.booked.until_free()
        assert await s.picking.pipeline.load() == {}
        await served_next(s.ext_proc)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", id="http1"),
        pytest.param(b"\x00" * 100, id="bad-preface"),
        # A valid preface, then DATA on stream 0: a connection error (PROTOCOL_ERROR).
        pytest.param(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
            + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x",
            id="data-on-stream-0",
        ),
    ],
)
async def test_garbage_ends_that_connection_only(garbage: bytes) -> None:
    async with serving() as s:
        other = RawClient(s.ext_proc)
        bad = RawClient(s.ext_proc)
        try:
            await pick(other)  # open on another connection meanwhile
            await bad.send(garbage)
            await bad.until_closed()
            if garbage.startswith(b"PRI"):
                assert any(isinstance(e, h2.events.ConnectionTerminated) for e in bad.events)
            await served_next(s.ext_proc)
            assert len(s.booked) == 1, "the other connection's stream is untouched"
        finally:
            bad.close()
            other.close()


@pytest.mark.parametrize(
    ("prefix", "status", "says"),
    [
        pytest.param(b"\x00" + (64 * 1024 * 1024 + 1).to_bytes(4, "big"), 8, "limit", id="big"),
        pytest.param(b"\x01\x00\x00\x00\x03abc", 13, "compressed", id="compressed"),
    ],
)
async def test_a_message_over_the_limit_or_compressed_is_refused(
    prefix: bytes, status: int, says: str
) -> None:
    async with serving() as s:
        client = RawClient(s.ext_proc)
        try:
            stream_id = await pick(client)
            await client.message(stream_id, prefix)
            await client.until(lambda: client.status(stream_id) is not None)
            code, message = client.status(stream_id) or (0, "")
            assert code == status and says in message, (code, message)
            await s.booked.until_free()
            assert len(await pick_on(client)) == 2, "the connection serves on"
        finally:
            client.close()


async def test_stopping_answers_open_streams_unavailable_says_goaway_and_closes() -> None:
    async with serving() as s:
        client = RawClient(s.ext_proc)
        try:
            streams = [await pick(client) for _ in range(3)]
            s.scope.cancel()
            with trio.fail_after(TIMEOUT):
                await s.stopped.wait()
            await client.until_closed()
            for stream_id in streams:
                assert client.status(stream_id) == (14, "the endpoint picker is stopping")
            assert any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)
            assert not s.booked
        finally:
            client.close()


async def test_many_streams_share_one_connection() -> None:
    async with serving() as s:
        client = RawClient(s.ext_proc)
        try:
            await client.until(
                lambda: (
                    client.h2.remote_settings.max_concurrent_streams == _grpc.MAX_CONCURRENT_STREAMS
                )
            )
            streams = []
            for _ in range(100):
                stream_id = await client.open()
                client.h2.send_data(stream_id, framed(request_headers()))
                client.h2.send_data(stream_id, framed(request_body(chat_body(), True)))
                streams.append(stream_id)
            await client.send()
            await client.until(lambda: all(len(client.answers(i)) >= 2 for i in streams))
            assert len(s.booked) == 100
            for stream_id in streams:
                client.h2.end_stream(stream_id)
            await client.send()
            await client.until(lambda: all(client.status(i) == (0, "") for i in streams))
            await s.booked.until_free()
        finally:
            client.close()


async def test_an_unknown_method_is_unimplemented_and_the_stream_refused() -> None:
    async with serving() as s:
        client = RawClient(s.ext_proc)
        try:
            stream_id = await client.open(b"/no.Such/Method")
            await client.until(lambda: client.status(stream_id) is not None)
            code, message = client.status(stream_id) or (0, "")
            assert code == 12 and "/no.Such/Method" in message
        finally:
            client.close()


async def test_tls_without_http2_by_alpn_is_closed_and_h2_served() -> None:
    tls = self_signed_tls()
    async with picking() as p, trio.open_nursery() as nursery:
        address, _ = await nursery.start(
            functools.partial(serve_ext_proc, p.picker, "127.0.0.1", 0, tls=tls)
        )
        port = int(address.rpartition(":")[2])
        for alpn, served in ((["http/1.1"], False), (["h2"], True)):
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(alpn)
            stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context)
            with trio.fail_after(TIMEOUT):
                await stream.do_handshake()
                if served:
                    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                    conn.initiate_connection()
                    await stream.send_all(conn.data_to_send())
                    events = conn.receive_data(await stream.receive_some())
                    assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
                else:
                    assert await stream.receive_some() == b"", "closed without HTTP/2"
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_h2c_client_that_says_nothing_is_closed_as_a_silent_tls_client_is(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A TLS client that connects and says nothing is closed after `_HANDSHAKE_TIMEOUT` ("must
    # not hold a task and a socket for ever"); an h2c client that never sends its preface (or
    # stops mid-frame) holds both for ever: enough of them and accept() fails with EMFILE.
    ours, theirs = socket.socketpair()
    try:
        connected = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        service = _server._Service(None, process=True)  # type: ignore[arg-type]
        with trio.move_on_after(_server._HANDSHAKE_TIMEOUT + _server._ANSWER_TIMEOUT + 1):
            theirs.sendall(b"PRI * HTTP/2.0\r\n")  # half a preface, then nothing
            await _server._serve_connection(service, None, connected)
            return
        pytest.fail("a silent h2c client still holds its connection's task and socket")
    finally:
        theirs.close()


def test_h2_still_has_the_method_the_transport_overrides_to_skip_its_frame_repr() -> None:
    # `_H2Connection._receive_frame` replaces h2's private method: a new h2 that renames or
    # drops it would leave the override dead (the repr back), or the copy out of step.
    base = h2.connection.H2Connection
    assert "_receive_frame" in vars(base), "h2 no longer has H2Connection._receive_frame"
    for name in ("_frame_dispatch_table", "_stream_is_closed_by_reset", "_prepare_for_sending"):
        assert hasattr(base(), name), name
    # `_H2Connection.open_inbound_streams` replaces the count h2 checks MAX_CONCURRENT_STREAMS
    # with at each new stream, and calls h2's walk (`_open_streams`) now and then.
    assert isinstance(vars(base).get("open_inbound_streams"), property)
    assert "_open_streams" in vars(base), "h2 no longer has H2Connection._open_streams"
    assert "self.open_inbound_streams" in inspect.getsource(base._receive_headers_frame)


def test_the_transport_receives_frames_as_h2_does_without_their_repr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, stream_id = h2_client()
    client.send_data(stream_id, b"y" * 1000, end_stream=True)
    client.reset_stream(stream_id)
    wire = client.data_to_send()
    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    theirs = h2.connection.H2Connection(config)
    theirs.initiate_connection()
    expected = [repr(e) for e in theirs.receive_data(wire)]

    def no_repr(frame: object) -> str:
        raise AssertionError("a frame's repr was built")

    monkeypatch.setattr(hyperframe.frame.Frame, "__repr__", no_repr)
    ours = _grpc._H2Connection(config)
    ours.initiate_connection()
    events = ours.receive_data(wire)
    monkeypatch.undo()
    assert [repr(e) for e in events] == expected


# -- the framing, over an in-memory byte stream (virtual time) -----------------------------------


class Echo:
    """A `GrpcCall` answering each message with itself: at once, or (``waits``: each message
    whose first byte is odd) from a task after a virtual second."""

    def __init__(self) -> None:
        self.waiting: bytes | None = None
        self.done = False
        self.closed = 0

    def message(self, data: bytes) -> list[bytes] | None:
        if data[:1] and data[0] % 2:
            self.waiting = data
            return None
        return [data]

    async def answer(self) -> list[bytes]:
        await trio.sleep(1)
        data, self.waiting = self.waiting, None
        assert data is not None
        return [data]

    def end(self) -> None:
        pass

    def close(self) -> None:
        self.closed += 1


class EchoService:
    def __init__(self) -> None:
        self.calls: list[Echo] = []

    def open(self, path: bytes) -> Echo:
        self.calls.append(Echo())
        return self.calls[-1]


_MESSAGES = st.lists(
    st.tuples(st.integers(0, 255), st.integers(0, 150_000)).map(
        lambda m: bytes([m[0]]) * m[1] if m[1] else b""
    ),
    max_size=12,
)


@given(messages=_MESSAGES, cuts=st.lists(st.integers(1, 200_000), min_size=1, max_size=20))
# Past the stream's 1 MiB window before the end, answers waiting for tasks, prefixes cut.
@example(messages=[b"\x01" * 150_000] * 8 + [b"\x02" * 100_000, b""], cuts=[3, 70_001, 2])
async def test_messages_cut_anywhere_come_back_whole_in_order_and_the_stream_ends_ok(
    autojump_clock: trio.testing.MockClock, messages: list[bytes], cuts: list[int]
) -> None:
    # However the client's DATA cuts the messages (a prefix split, many messages in a frame,
    # more than the stream's window before any answer), and whichever answers wait for a task,
    # each comes back once, whole, in order, and the call is closed once at the end.
    service = EchoService()
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=1 << 20
    )
    client, stream_id = h2_client()
    wire = b"".join(framed(message) for message in messages)
    received = bytearray()
    trailers: dict[bytes, bytes] = {}

    async def read_some() -> None:
        for event in client.receive_data(await client_side.receive_some()):
            if isinstance(event, h2.events.DataReceived):
                received.extend(event.data)
                client.acknowledge_received_data(event.flow_controlled_length, stream_id)
            elif isinstance(event, h2.events.TrailersReceived) or (
                isinstance(event, h2.events.ResponseReceived) and event.stream_ended
            ):
                trailers.update(event.headers)  # trailers, or trailers-only
        await client_side.send_all(client.data_to_send())

    with trio.fail_after(TIMEOUT):  # virtual: a deadlock fails at once, not at CI's limit
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await client_side.send_all(client.data_to_send())
            offset, turn = 0, 0
            while offset < len(wire):
                room = min(
                    client.local_flow_control_window(stream_id), client.max_outbound_frame_size
                )
                if room == 0:
                    await read_some()  # the server's WINDOW_UPDATEs
                    continue
                cut = cuts[turn] if turn < len(cuts) else room  # then whole frames: few, fast
                size = min(cut, room, len(wire) - offset)
                turn += 1
                client.send_data(stream_id, wire[offset : offset + size])
                offset += size
                await client_side.send_all(client.data_to_send())
            client.end_stream(stream_id)
            await client_side.send_all(client.data_to_send())
            while not trailers:
                await read_some()
            await client_side.aclose()
    assert trailers[b"grpc-status"] == b"0"
    answers = []
    while received:
        size = int.from_bytes(received[1:5], "big")
        answers.append(bytes(received[5 : 5 + size]))
        del received[: 5 + size]
    assert answers == messages
    (call,) = service.calls
    assert call.closed == 1


async def test_a_stop_with_a_peer_that_reads_nothing_ends_within_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The peer opens a stream and reads nothing more: the server's writes block. Stopping it
    # must not wait on that peer past the grace; the stream's call is closed all the same.
    service = EchoService()
    client_side, server_side = trio.testing.lockstep_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=1 << 20
    )
    client, stream_id = h2_client()
    client.send_data(stream_id, framed(b"\x02" * 16_000))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 3.0)
            await client_side.receive_some()  # the server's SETTINGS, and no more
            await client_side.send_all(client.data_to_send())
            await trio.testing.wait_all_tasks_blocked()
            (call,) = service.calls
            assert not call.closed, "the stream is open, its answer blocked on the peer"
            stopping = trio.current_time()
            nursery.cancel_scope.cancel()
    assert trio.current_time() - stopping <= 3.0
    assert call.closed == 1


async def test_messages_not_yet_whole_past_the_connections_budget_end_their_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Each message is let in as it arrives until whole; what the connection holds of them is
    # bounded: the stream whose part passes the budget ends RESOURCE_EXHAUSTED, the others
    # go on.
    service = EchoService()
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=100_000, max_partial_bytes=150_000
    )
    client, first = h2_client()
    second = client.get_next_available_stream_id()
    client.send_headers(second, [(b":method", b"POST"), (b":path", b"/echo"),
                                 (b":scheme", b"http"), (b":authority", b"a")])  # fmt: skip
    message = framed(b"\x02" * 100_000)
    statuses: dict[int, bytes] = {}
    echoed = bytearray()

    async def send_part(stream_id: int, data: bytes) -> None:
        for offset in range(0, len(data), 16_384):
            client.send_data(stream_id, data[offset : offset + 16_384])
        await client_side.send_all(client.data_to_send())
        await trio.testing.wait_all_tasks_blocked()

    async def read() -> None:
        for event in client.receive_data(await client_side.receive_some()):
            if isinstance(event, h2.events.DataReceived):
                echoed.extend(event.data)
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                headers = dict(event.headers)
                if b"grpc-status" in headers:
                    statuses[event.stream_id] = headers[b"grpc-status"]
        await client_side.send_all(client.data_to_send())

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await client_side.send_all(client.data_to_send())
            await read()  # the server's SETTINGS
            await send_part(first, message[:60_000])
            await send_part(second, message[:60_000])  # 120,000 held: within the budget
            await send_part(second, message[60_000:95_000])  # 155,000: past it
            await read()
            assert statuses == {second: b"8"}, statuses
            await send_part(first, message[60_000:])
            client.end_stream(first)
            await client_side.send_all(client.data_to_send())
            while first not in statuses:
                await read()
            await client_side.aclose()
    assert statuses[first] == b"0" and bytes(echoed) == message


def echo_client(*, window: int = 65_535) -> h2.connection.H2Connection:
    """An HTTP/2 client (h2's, sans IO) with stream window ``window``, its preface queued."""
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
    )
    client.initiate_connection()
    return client


def open_echo(client: h2.connection.H2Connection) -> int:
    stream_id: int = client.get_next_available_stream_id()
    client.send_headers(stream_id, [(b":method", b"POST"), (b":path", b"/echo"),
                                    (b":scheme", b"http"), (b":authority", b"a")])  # fmt: skip
    return stream_id


def send_framed(client: h2.connection.H2Connection, stream_id: int, data: bytes, *,
                end: bool = False) -> None:  # fmt: skip
    message = framed(data)
    for offset in range(0, len(message), 16_384):
        last = offset + 16_384 >= len(message)
        client.send_data(stream_id, message[offset : offset + 16_384], end_stream=end and last)


async def test_a_reset_of_a_stream_whose_end_waits_for_the_window_leaves_the_connection_serving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Stream A is answered in full and ends (its trailers wait behind an answer the client's
    # connection window holds back); the client then resets A and reopens its connection
    # window. The connection must go on serving stream B, not fail on A's waiting answer.
    service = EchoService()
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=1 << 20
    )
    client = echo_client(window=1 << 20)  # streams' windows wide: the connection's holds back
    echoed: dict[int, bytearray] = {}
    statuses: dict[int, bytes] = {}

    async def read() -> None:
        for event in client.receive_data(await client_side.receive_some()):
            if isinstance(event, h2.events.DataReceived):
                echoed.setdefault(event.stream_id, bytearray()).extend(event.data)
            elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                headers = dict(event.headers)
                if b"grpc-status" in headers:
                    statuses[event.stream_id] = headers[b"grpc-status"]
        await client_side.send_all(client.data_to_send())

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await client_side.send_all(client.data_to_send())
            await read()  # the server's SETTINGS (acknowledged)
            first, second = open_echo(client), open_echo(client)
            send_framed(client, first, b"\x02" * 100_000, end=True)
            await client_side.send_all(client.data_to_send())
            await trio.testing.wait_all_tasks_blocked()
            await read()  # 64 KiB of A's answer: the connection's window is used up
            assert first not in statuses, "A's trailers wait behind the rest of its answer"
            client.reset_stream(first)
            send_framed(client, second, b"\x02" * 10, end=True)
            client.increment_flow_control_window(1 << 20)  # the connection's window reopens
            await client_side.send_all(client.data_to_send())
            while second not in statuses:
                await read()
            await client_side.aclose()
    assert statuses[second] == b"0"
    assert bytes(echoed[second]) == framed(b"\x02" * 10)


async def test_a_reset_of_the_stream_holding_answers_back_lets_the_stalled_streams_go_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A's answer waits for a client that does not read it, past `_HELD_BYTES`: B's message
    # is left unanswered (stalled). The client resets A: nothing is held any more, so B must
    # be answered.
    service = EchoService()
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=1 << 20
    )
    client = echo_client()
    echoed: dict[int, bytearray] = {}
    statuses: dict[int, bytes] = {}

    async def read() -> None:
        for event in client.receive_data(await client_side.receive_some()):
            if isinstance(event, h2.events.DataReceived):
                echoed.setdefault(event.stream_id, bytearray()).extend(event.data)
            elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                headers = dict(event.headers)
                if b"grpc-status" in headers:
                    statuses[event.stream_id] = headers[b"grpc-status"]
        await client_side.send_all(client.data_to_send())

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await client_side.send_all(client.data_to_send())
            await read()  # the server's SETTINGS (acknowledged)
            first = open_echo(client)
            send_framed(client, first, b"\x02" * 400_000)
            await client_side.send_all(client.data_to_send())
            await trio.testing.wait_all_tasks_blocked()
            await read()  # 64 KiB of A's answer; the rest (past `_HELD_BYTES`) is held
            assert connection.held_bytes > _grpc._HELD_BYTES
            second = open_echo(client)
            send_framed(client, second, b"\x02" * 10, end=True)
            await client_side.send_all(client.data_to_send())
            await trio.testing.wait_all_tasks_blocked()
            assert second not in statuses, "B waits while A's answer is held"
            client.reset_stream(first)
            client.increment_flow_control_window(1 << 20)
            await client_side.send_all(client.data_to_send())
            await trio.testing.wait_all_tasks_blocked()
            assert connection.held_bytes == 0, "A's answer is dropped with A"
            while second not in statuses:
                await read()
            await client_side.aclose()
    assert statuses[second] == b"0"
    assert bytes(echoed[second]) == framed(b"\x02" * 10)


async def test_a_client_that_sends_no_preface_is_closed_after_the_preface_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A peer that connects and says nothing (a port scanner) holds no socket nor task for ever.
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), EchoService(), max_message_bytes=1 << 20
    )
    with trio.fail_after(_grpc.PREFACE_TIMEOUT + 5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            client = echo_client()  # its preface is never sent
            events: list[h2.events.Event] = []
            while data := await client_side.receive_some():
                events += client.receive_data(data)
    assert trio.current_time() >= _grpc.PREFACE_TIMEOUT
    assert any(isinstance(event, h2.events.ConnectionTerminated) for event in events)


async def test_a_connection_idle_with_no_stream_open_is_told_goaway_and_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A stream open and quiet (a long generation) keeps its connection however long; once no
    # stream is open and nothing comes for the idle time, the connection ends with GOAWAY.
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), EchoService(), max_message_bytes=1 << 20
    )
    client = echo_client()
    statuses: dict[int, bytes] = {}
    goaway = False

    async def read() -> bool:
        nonlocal goaway
        data = await client_side.receive_some()
        for event in client.receive_data(data):
            if isinstance(event, h2.events.TrailersReceived):
                statuses[event.stream_id] = dict(event.headers)[b"grpc-status"]
            goaway |= isinstance(event, h2.events.ConnectionTerminated)
        await client_side.send_all(client.data_to_send())
        return bool(data)

    with trio.fail_after(5 * _grpc.IDLE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await client_side.send_all(client.data_to_send())
            await read()  # the server's SETTINGS (acknowledged)
            stream_id = open_echo(client)
            send_framed(client, stream_id, b"\x02" * 10)  # answered; the stream stays open
            await client_side.send_all(client.data_to_send())
            await read()
            await trio.sleep(3 * _grpc.IDLE_TIMEOUT)
            assert connection.open_streams == 1 and not goaway, "an open stream is no idle"
            client.end_stream(stream_id)
            await client_side.send_all(client.data_to_send())
            ended = trio.current_time()
            while await read():
                pass
    assert statuses[stream_id] == b"0" and goaway
    assert _grpc.IDLE_TIMEOUT <= trio.current_time() - ended <= 2 * _grpc.IDLE_TIMEOUT


async def test_a_reset_read_with_the_message_it_follows_ends_that_stream_only(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The message and the stream's reset come in one read: h2 has closed the stream when the
    # message is answered, and sending on it must end that stream alone, as no failure.
    service = EchoService()
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=1 << 20
    )
    client = echo_client()
    statuses: dict[int, bytes] = {}

    async def read() -> None:
        for event in client.receive_data(await client_side.receive_some()):
            if isinstance(event, h2.events.TrailersReceived):
                statuses[event.stream_id] = dict(event.headers)[b"grpc-status"]
        await client_side.send_all(client.data_to_send())

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await client_side.send_all(client.data_to_send())
            await read()  # the server's SETTINGS (acknowledged)
            first, second = open_echo(client), open_echo(client)
            send_framed(client, first, b"\x02" * 10)
            client.reset_stream(first)
            send_framed(client, second, b"\x02" * 10, end=True)
            await client_side.send_all(client.data_to_send())
            while second not in statuses:
                await read()
            await client_side.aclose()
    assert statuses == {second: b"0"}
    assert [call.closed for call in service.calls] == [1, 1]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


class Peer:
    """An HTTP/2 client of h2's over an in-memory stream (``window``: its streams' window)."""

    def __init__(self, stream: trio.abc.Stream, *, window: int = 65_535) -> None:
        self.stream = stream
        self.h2 = echo_client(window=window)
        self.data: dict[int, bytearray] = {}
        self.status: dict[int, bytes] = {}

    def open(self) -> int:
        return open_echo(self.h2)

    def put(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        """``data`` on ``stream_id`` in DATA frames of 16 KiB."""
        for offset in range(0, len(data), 16_384):
            last = offset + 16_384 >= len(data)
            self.h2.send_data(stream_id, data[offset : offset + 16_384], end_stream=end and last)

    async def send(self) -> None:
        await self.stream.send_all(self.h2.data_to_send())

    async def read(self) -> None:
        """One read, its DATA not acknowledged (the peer reads nothing it is not told to)."""
        self.feed(await self.stream.receive_some())
        await self.send()

    def feed(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
            elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                headers = dict(event.headers)
                if b"grpc-status" in headers:
                    self.status[event.stream_id] = headers[b"grpc-status"]

    async def drain(self) -> None:
        """Read all the server has sent (virtual time)."""
        while True:
            with trio.move_on_after(0.01):
                await self.read()
                continue
            return


async def test_a_reset_stream_whose_trailers_wait_for_the_window_leaves_the_connection_be(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A stream answered in full whose answers wait for the connection's window keeps its
    # trailers for later (`_finish`); the peer resets it. The next WINDOW_UPDATE sends the rest
    # of a stream h2 has closed: StreamClosedError out of the read loop, and every other
    # stream of the connection (Envoy multiplexes thousands) ends with it.
    service = EchoService()
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=1 << 20
    )
    peer = Peer(client_side, window=1 << 20)  # the connection's window (64 KiB) blocks
    failed: list[BaseException] = []

    async def serve() -> None:
        try:
            await connection.serve(1.0)
        except Exception as exc:  # what ended the connection (shown by the assert below)
            failed.append(exc)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await peer.send()
            await peer.read()  # the server's SETTINGS
            other = peer.open()
            first = peer.open()
            peer.put(first, framed(b"\x02" * 100_000), end=True)
            await peer.send()
            await peer.drain()
            assert connection.held_bytes > 0, "the answer waits for the window"
            peer.h2.reset_stream(first)
            await peer.send()
            await trio.testing.wait_all_tasks_blocked()
            peer.h2.increment_flow_control_window(1 << 20)
            await peer.send()
            await trio.testing.wait_all_tasks_blocked()
            assert not failed, f"the connection ended: {failed!r}"
            peer.put(other, framed(b"\x04" * 10), end=True)
            await peer.send()
            while other not in peer.status:
                await peer.read()
            nursery.cancel_scope.cancel()
    assert peer.status[other] == b"0"
    assert bytes(peer.data[other]) == framed(b"\x04" * 10)


async def test_streams_held_back_by_waiting_answers_go_on_once_the_stream_holding_them_is_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One stream's answers (more than `_HELD_BYTES`) wait for a peer that does not read that
    # stream: the connection's other streams are held back (`_stalled`). The peer resets it,
    # its answers are dropped (`_held` back to 0); the others must go on, not wait for a
    # WINDOW_UPDATE that a peer with room in its windows has no reason to send.
    service = EchoService()
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=1 << 20
    )
    peer = Peer(client_side)
    peer.h2.increment_flow_control_window(1 << 20)  # room on the connection
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await peer.send()
            await peer.read()
            big = peer.open()
            small = peer.open()
            peer.put(big, framed(b"\x02" * 400_000))
            await peer.send()
            await trio.testing.wait_all_tasks_blocked()
            assert connection.held_bytes > _grpc._HELD_BYTES
            peer.put(small, framed(b"\x04" * 10), end=True)
            await peer.send()
            await trio.testing.wait_all_tasks_blocked()
            peer.h2.reset_stream(big)
            await peer.send()
            await trio.testing.wait_all_tasks_blocked()
            assert connection.held_bytes == 0
            with trio.move_on_after(TIMEOUT / 2):  # virtual
                while small not in peer.status:
                    await peer.read()
            nursery.cancel_scope.cancel()
    assert peer.status.get(small) == b"0", "the other stream is never answered"


async def test_resets_of_streams_whose_message_is_being_answered_give_back_the_connection_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A message that waits for its answer (a pick) is not acknowledged until answered; the
    # peer resets its stream meanwhile (Envoy's client gave up while the pick queued). Its
    # bytes must be given back to the connection's window, or after 8 MiB of such resets the
    # peer can send nothing more on any stream of the connection, for good.
    service = EchoService()
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=1 << 20
    )
    peer = Peer(client_side)
    message = framed(b"\x01" * 200_000)  # odd: answered by a task, a virtual second later
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await peer.send()
            await peer.read()
            for _ in range(2 * _grpc._CONNECTION_WINDOW // len(message)):
                await peer.drain()
                if peer.h2.outbound_flow_control_window < len(message):
                    break
                stream_id = peer.open()
                peer.h2.send_data(stream_id, message)  # one frame: whole at once
                await peer.send()
                await trio.testing.wait_all_tasks_blocked()
                peer.h2.reset_stream(stream_id)
                await peer.send()
                await trio.testing.wait_all_tasks_blocked()
            await peer.drain()
            window = peer.h2.outbound_flow_control_window
            nursery.cancel_scope.cancel()
    assert all(call.closed for call in service.calls)
    assert window >= len(message), f"the connection's window is down to {window} bytes"


async def test_a_half_close_in_the_middle_of_a_message_does_not_end_the_stream_ok(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # gRPC: a request stream that ends inside a Length-Prefixed-Message is malformed (grpc's
    # servers end it INTERNAL); the transport drops the part and ends the stream OK, as if
    # the peer had sent every message whole.
    service = EchoService()
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=1 << 20
    )
    peer = Peer(client_side)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await peer.send()
            await peer.read()
            stream_id = peer.open()
            peer.put(stream_id, framed(b"\x02" * 10) + framed(b"\x02" * 10)[:8], end=True)
            await peer.send()
            while stream_id not in peer.status:
                await peer.read()
            nursery.cancel_scope.cancel()
    assert bytes(peer.data[stream_id]) == framed(b"\x02" * 10)
    assert peer.status[stream_id] != b"0", "a message cut short by the half-close was ignored"


async def test_a_stop_never_ends_a_stream_with_trailers_after_half_a_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # An answer larger than the peer's window is half sent when the server stops: `stop`
    # drops the rest (`_forget`) and sends the UNAVAILABLE trailers right after the half,
    # a response gRPC's framing does not allow (a client reads a broken message, not the
    # status); the stream must be reset, or its message finished, instead.
    service = EchoService()
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=1 << 20
    )
    peer = Peer(client_side)  # 64 KiB windows, nothing acknowledged
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await peer.send()
            await peer.read()
            stream_id = peer.open()
            peer.put(stream_id, framed(b"\x02" * 100_000))
            await peer.send()
            await peer.drain()
            assert connection.held_bytes > 0, "the answer is half sent"
            nursery.cancel_scope.cancel()
    with trio.fail_after(TIMEOUT):
        while data := await client_side.receive_some():  # all the server sent, to its close
            peer.feed(data)
    data = bytes(peer.data.get(stream_id, b""))
    if stream_id in peer.status:
        assert data in (b"", framed(b"\x02" * 100_000)), (
            f"trailers after {len(data)} bytes of a {len(framed(b'x' * 100_000))}-byte message"
        )


async def test_opening_a_stream_costs_the_same_with_thousands_open(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection carries up to 65,536 streams (long generations), but h2 counts the open
    # ones at each new stream by walking all of them (`H2Connection._open_streams`, to check
    # MAX_CONCURRENT_STREAMS): O(open streams) of Python per new stream in the router's trio
    # run (measured: 0.7 ms at 5,000 open, 2.3 ms at 20,000; 65,536 streams opened cost
    # minutes of CPU). Counted here as the streams' state looked at per new stream.
    import h2.stream

    looked = 0
    is_open = h2.stream.H2Stream.open

    def counted(stream: h2.stream.H2Stream) -> bool:
        nonlocal looked
        if not stream.config.client_side:
            looked += 1
        return bool(is_open.fget(stream))  # type: ignore[attr-defined]

    service = EchoService()
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=1 << 20
    )
    peer = Peer(client_side)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await peer.send()
            await peer.read()
            for _ in range(2_000):
                peer.open()
            await peer.send()
            await trio.testing.wait_all_tasks_blocked()
            assert connection.open_streams == 2_000
            monkeypatch.setattr(h2.stream.H2Stream, "open", property(counted))
            for _ in range(10):
                peer.open()
            await peer.send()
            await trio.testing.wait_all_tasks_blocked()
            monkeypatch.undo()
            assert connection.open_streams == 2_010
            nursery.cancel_scope.cancel()
    assert looked / 10 < 100, f"{looked / 10:.0f} streams looked at per new stream"


@given(st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=300))
@example([0] * 300)
@example([0] * 100 + [3, 0] * 20 + [2, 0] * 20 + [0])  # at the limit, closed streams held
def test_the_transports_open_stream_count_refuses_exactly_the_streams_h2s_does(
    ops: list[int],
) -> None:
    # `_H2Connection.open_inbound_streams` counts without walking the streams most of the
    # time: with streams opening and closing (reset, or ended both ways), every new stream
    # past MAX_CONCURRENT_STREAMS must be refused as h2's own walk refuses it, no other.
    def server(cls: type[h2.connection.H2Connection]) -> h2.connection.H2Connection:
        conn = cls(_grpc._CONFIG)
        conn.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100}
        )
        conn.initiate_connection()
        return conn

    class Client(h2.connection.H2Connection):
        open_outbound_streams = 0  # it tries past the server's limit

    client = Client(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    ours, theirs = server(_grpc._H2Connection), server(h2.connection.H2Connection)
    ack = client.data_to_send()
    for conn in (ours, theirs):
        conn.receive_data(ack)
    client.receive_data(ours.data_to_send())
    theirs.data_to_send()
    opened: list[int] = []
    for op in ops:
        if op == 3 and opened:  # the client resets its oldest stream
            client.reset_stream(opened.pop(0))
        elif op == 2 and opened:  # the server ends the newest both ways
            stream_id = opened.pop()
            client.end_stream(stream_id)
            for conn in (ours, theirs):
                conn.send_headers(stream_id, [(b":status", b"200")], end_stream=True)
        else:
            opened.append(open_echo(client))
        wire = client.data_to_send()
        outcomes = []
        for conn in (ours, theirs):
            try:
                outcomes.append([type(e).__name__ for e in conn.receive_data(wire)])
            except h2.exceptions.ProtocolError as exc:
                outcomes.append([type(exc).__name__])
            conn.data_to_send()
        assert outcomes[0] == outcomes[1], (op, outcomes)
        if outcomes[0] == ["TooManyStreamsError"]:
            return


class ClosedWhileAnswering(Echo):
    """An `Echo` that notes, as each waiting message is answered, whether it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed_at_answer: list[int] = []

    async def answer(self) -> list[bytes]:
        await trio.sleep(1)
        self.closed_at_answer.append(self.closed)
        return await super().answer()


async def test_a_stream_whose_messages_each_wait_is_not_closed_while_the_next_is_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Two messages that each wait (Envoy's buffered mode: the request headers, then the body
    # whose answer is the pick). The first's task goes on with the stream (`_consume`), which
    # starts the second's task (`busy` again); the first task's `finally` then sees `busy`
    # and closes the call while the second is still being answered: the picker's booking is
    # freed (and the stream marked finished) in the middle of its pick.
    calls: list[ClosedWhileAnswering] = []

    class Service:
        def open(self, path: bytes) -> ClosedWhileAnswering:
            calls.append(ClosedWhileAnswering())
            return calls[-1]

    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), Service(), max_message_bytes=1 << 20
    )
    peer = Peer(client_side)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await peer.send()
            await peer.read()
            stream_id = peer.open()
            peer.put(stream_id, framed(b"\x01" * 10) + framed(b"\x03" * 10), end=True)
            await peer.send()
            while stream_id not in peer.status:
                await peer.read()
            nursery.cancel_scope.cancel()
    assert peer.status[stream_id] == b"0"
    (call,) = calls
    assert call.closed_at_answer == [0, 0], "the call was closed while a message was answered"
    assert call.closed == 1


async def test_a_connection_dropped_while_a_message_is_answered_closes_its_call_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # `GrpcCall`: "`close` once, however the stream ends". The peer goes away while a
    # message's task answers it: the nursery's cancel ends the task, whose `finally` closes
    # the call (`busy`), and then `stop` finishes the same stream (still in `_streams`) and
    # closes it again.
    service = EchoService()
    client_side, server_side = trio.testing.memory_stream_pair()
    connection = _grpc.GrpcConnection(
        _grpc.StreamIO(server_side), service, max_message_bytes=1 << 20
    )
    peer = Peer(client_side)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve, 1.0)
            await peer.send()
            await peer.read()
            stream_id = peer.open()
            peer.put(stream_id, framed(b"\x01" * 10))  # odd: answered by a task
            await peer.send()
            await trio.testing.wait_all_tasks_blocked()
            await client_side.aclose()
    (call,) = service.calls
    assert call.closed == 1, f"closed {call.closed} times"
