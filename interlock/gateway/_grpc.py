"""A gRPC server over HTTP/2 in the trio run: python-hyper's sans-IO ``h2`` on trio sockets.

`GrpcConnection.serve` runs one task per connection: it reads the socket, feeds h2, cuts each
stream's DATA into gRPC messages (a 5-byte prefix: a compressed flag and a big-endian length)
and answers the messages that need no waiting in the same task, synchronously: every frame one
read produces goes out in one socket write. Only a message whose answer waits (`GrpcCall.answer`)
gets a task, and only while it waits; a stream's later messages stay unread in its buffer
meanwhile, so they keep their order and the stream's flow-control window bounds them.

Memory is bounded both ways: the peer's DATA is acknowledged (its window reopened) once the
stream's whole messages are answered, so a peer sends at most `_STREAM_WINDOW` ahead of the
answers per stream and `_CONNECTION_WINDOW` per connection; a message not whole yet is
acknowledged as it arrives (or one larger than the window would never complete), up to
`max_message_bytes` a message and ``max_partial_bytes`` a connection. An answer larger than
the peer's window waits for its WINDOW_UPDATE, and while more than `_HELD_BYTES` of answers
wait so, no message of the connection is answered (a peer that does not read its answers is
held back by its own window).

Failures stay where they happen: a handler's error ends its stream (its status), a peer
breaking HTTP/2 ends its connection (GOAWAY, then closed), never the server; so does one that
sends no preface in `PREFACE_TIMEOUT`, or nothing for `IDLE_TIMEOUT` with no stream open (a
second task per connection sleeps for these: a deadline moved on every read would cost the
reading task a timer update per read).
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Final, Protocol
from urllib.parse import quote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.exceptions
import hyperframe.frame
import trio

__all__ = [
    "IDLE_TIMEOUT",
    "MAX_CONCURRENT_STREAMS",
    "PREFACE_TIMEOUT",
    "ByteStream",
    "GrpcCall",
    "GrpcConnection",
    "GrpcError",
    "GrpcService",
    "SocketIO",
    "Status",
    "StreamIO",
]

_logger = logging.getLogger("interlock.gateway")


class Status:
    """gRPC status codes (the ones this server answers)."""

    OK: Final = 0
    INVALID_ARGUMENT: Final = 3
    NOT_FOUND: Final = 5
    RESOURCE_EXHAUSTED: Final = 8
    UNIMPLEMENTED: Final = 12
    INTERNAL: Final = 13
    UNAVAILABLE: Final = 14


#: Bytes asked of the socket per read: a 100 kB body arrives in two reads; more would make
#: every small read allocate (and shrink) a buffer past malloc's mmap threshold.
_READ_BYTES: Final = 64 * 1024
#: The peer may send this much on one stream before its messages are answered (a 100k-token
#: body fits, so Envoy never waits for a WINDOW_UPDATE mid-body) ...
_STREAM_WINDOW: Final = 1024 * 1024
#: ... and this much on the whole connection (unanswered data is held in memory up to it).
_CONNECTION_WINDOW: Final = 8 * 1024 * 1024
#: The largest DATA frame a peer may send (HTTP/2's default: 16 KiB).
_MAX_FRAME_BYTES: Final = 256 * 1024
#: Answers waiting for the peer's window past which no message of the connection is answered.
_HELD_BYTES: Final = 256 * 1024
#: Streams h2 holds (open, or closed and not yet forgotten) below which it does not walk them
#: to count the open ones (`_H2Connection.open_inbound_streams`).
_MIN_COUNT_AT: Final = 64
#: How long a new connection has to send HTTP/2's preface and its first SETTINGS, as a TLS
#: client has for its handshake: a peer that connects and says nothing (a port scanner, a
#: stuck client) must not hold a socket and a task for ever.
PREFACE_TIMEOUT: Final = 10.0
#: A connection with no stream open that sends nothing for this long is told GOAWAY and
#: closed (found at the next check: within twice this). Long: Envoy's own idle timeout for
#: its upstream connections is 1 h by default, and a gateway reconnects when it needs to.
IDLE_TIMEOUT: Final = 3600.0
#: Streams open at once on one connection: every request in flight through the gateway holds
#: its ext_proc stream for its whole life (a long generation), over few connections.
MAX_CONCURRENT_STREAMS: Final = 65_536

_CONFIG: Final = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    # The peer is a gRPC client (Envoy's): h2's per-header checks and rewrites cost a Python
    # loop per header per frame and protect nothing a malformed header could reach here (the
    # path is compared whole; every other header is ignored).
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)
_RESPONSE_HEADERS: Final = ((b":status", b"200"), (b"content-type", b"application/grpc"))


class GrpcError(Exception):
    """A stream ends with gRPC status ``code`` (not OK) and ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class GrpcCall(Protocol):
    """One stream's handler: `message` for each of the peer's messages, then `end`; `close`
    once, however the stream ends."""

    def message(self, data: bytes) -> list[bytes] | None:
        """The serialized answers to message ``data`` (maybe none), synchronously; None: it
        must wait, `answer` answers it. Raising `GrpcError` ends the stream with its status;
        another exception ends it INTERNAL."""

    async def answer(self) -> list[bytes]:
        """The answers to the message `message` could not answer at once (waits)."""

    @property
    def done(self) -> bool:
        """The stream is answered in full: it ends OK at once, later messages are ignored."""

    def end(self) -> None:
        """The peer's half-close: nothing more will come (then the stream ends OK). Raising
        `GrpcError` ends it with that status instead."""

    def close(self) -> None:
        """The stream ended, however (idempotent): free what it holds."""


class GrpcService(Protocol):
    """What a server serves: `open` a call for a request's ``:path``."""

    def open(self, path: bytes) -> GrpcCall:
        """The handler of a new stream for ``path``.

        Raises:
            GrpcError: the path is not served (UNIMPLEMENTED), or not now (UNAVAILABLE).
        """


class ByteStream(Protocol):
    """A connection's bytes, as `GrpcConnection` reads and writes them."""

    async def receive(self) -> bytes:
        """The next bytes (b"": the peer closed or reset the connection)."""

    async def send(self, data: bytes) -> None:
        """Send all of ``data``.

        Raises:
            trio.BrokenResourceError: the peer is gone.
        """

    async def aclose(self) -> None:
        """Close the connection (idempotent)."""


class SocketIO:
    """A connection's bytes over a stdlib socket (h2c), read and written directly: a write that
    goes through at once does not yield to trio's scheduler, and a read after one that emptied
    the socket waits for it to be readable first instead of failing a ``recv`` (trio's
    `SocketStream` does both on every call: two scheduler passes and a syscall per message)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._socket = sock
        self._drained = True

    async def receive(self) -> bytes:
        sock = self._socket
        if self._drained:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.checkpoint()  # a peer sending without pause yields too
        while True:
            try:
                data = sock.recv(_READ_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                return b""
            self._drained = len(data) < _READ_BYTES
            return data

    async def send(self, data: bytes) -> None:
        sock = self._socket
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError from exc
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            await trio.lowlevel.wait_writable(sock)
            try:
                sent = sock.send(view)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError from exc
            view = view[sent:]

    async def aclose(self) -> None:
        if self._socket.fileno() != -1:
            trio.lowlevel.notify_closing(self._socket)
            self._socket.close()
        await trio.lowlevel.checkpoint()


class StreamIO:
    """A connection's bytes over a trio stream (TLS: a `trio.SSLStream`)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def receive(self) -> bytes:
        try:
            return bytes(await self._stream.receive_some(_READ_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def send(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except trio.ClosedResourceError as exc:
            raise trio.BrokenResourceError from exc

    async def aclose(self) -> None:
        # A TLS close_notify to a peer that is gone, or does not read, must not hold us.
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            await self._stream.aclose()


class _H2Connection(h2.connection.H2Connection):
    """h2's connection without its eager ``repr(frame)`` on every received frame: h2 formats
    each frame for its trace log whether or not anything logs (``logger.trace("...",
    repr(frame))``; no switch), and a DATA frame's repr hex-dumps its payload. Measured: 9-14%
    of the transport's CPU (docs/benchmarks.md, "An h2 + trio transport, measured"). The
    method is h2's private one (h2 4.x), copied without that line; tests/test_gateway_grpc.py
    fails if a new h2 drops or renames it."""

    #: Open inbound streams are counted exactly (h2's walk, which also forgets the closed
    #: ones) only once ``streams`` holds this many; see `open_inbound_streams`.
    _count_at = _MIN_COUNT_AT

    @property
    def open_inbound_streams(self) -> int:
        """h2 checks MAX_CONCURRENT_STREAMS at each new stream by walking every stream it
        holds (`_open_streams`): O(open streams) of Python per new stream, 2.3 ms at 20,000
        open. ``streams`` holds the open ones and the closed ones not yet forgotten, so its
        size bounds the count from above; below the limit it answers the check as well.
        The walk runs once that size doubles over the open count it last found (or nears
        the limit): amortized O(1) per new stream, and closed streams are still forgotten."""
        held = len(self.streams)
        limit = self.local_settings.max_concurrent_streams  # (may change with SETTINGS)
        if held < min(self._count_at, limit):
            return held
        count = self._open_streams(int(not self.config.client_side))
        self._count_at = min(max(2 * count, _MIN_COUNT_AT), limit)
        return count

    def _receive_frame(self, frame: hyperframe.frame.Frame) -> list[h2.events.Event]:
        events: list[h2.events.Event]
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            # As h2: a stream closed by RST_STREAM is a stream error (reset it again), any
            # other a connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                reset = hyperframe.frame.RstStreamFrame(e.stream_id)
                reset.error_code = e.error_code
                self._prepare_for_sending([reset])
                events = e._events
            else:
                raise
        except h2.exceptions.StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                reset = hyperframe.frame.RstStreamFrame(e.stream_id)
                reset.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([reset])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events


class _Stream:
    """One HTTP/2 stream of a connection."""

    __slots__ = (
        "busy",
        "call",
        "closed",
        "ended",
        "headers_sent",
        "id",
        "inbound",
        "outbound",
        "partial",
        "remote_ended",
        "scope",
        "trailers",
        "unacked",
    )

    def __init__(self, stream_id: int, call: GrpcCall) -> None:
        self.id = stream_id
        self.call = call
        #: The peer's bytes not yet cut into messages and answered.
        self.inbound = bytearray()
        #: Flow-controlled bytes received and not yet acknowledged to h2.
        self.unacked = 0
        #: Bytes of a message not whole yet, acknowledged (`GrpcConnection._partial` counts).
        self.partial = 0
        #: Answer bytes waiting for the peer's window (in order).
        self.outbound = bytearray()
        #: The trailers to send once `outbound` is out (the stream is ending).
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.headers_sent = False
        #: The peer half-closed (END_STREAM); handled once `inbound` is read.
        self.remote_ended = False
        #: A task answers one of its messages now: the others wait in `inbound`.
        self.busy = False
        #: That task's scope (cancelled when the stream is dropped).
        self.scope: trio.CancelScope | None = None
        #: The stream has ended on this side (trailers given to h2, or reset).
        self.ended = False
        #: Its call is closed (`close`: once, whoever ends it first).
        self.closed = False

    def close(self) -> None:
        """Close the call (what it booked freed), once: a task cancelled with its connection
        closes it, and the stop that follows ends the stream again."""
        if not self.closed:
            self.closed = True
            self.call.close()


class GrpcConnection:
    """One HTTP/2 connection serving ``service``; `serve` runs it."""

    def __init__(
        self,
        io: ByteStream,
        service: GrpcService,
        *,
        max_message_bytes: int,
        max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
        max_partial_bytes: int | None = None,
        preface_timeout: float = PREFACE_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._io = io
        self._preface_timeout = preface_timeout
        self._idle_timeout = idle_timeout
        #: The peer's preface and first SETTINGS have come.
        self._greeted = False
        #: Reads so far (the idle check compares it).
        self._reads = 0
        self._service = service
        self._max_message = max_message_bytes
        #: Bytes of messages not whole yet the connection's streams may hold at once (default:
        #: two of the largest messages). A stream's window bounds what it sends ahead of its
        #: answers, but a message larger than the window is let in as it arrives, or it could
        #: never complete: this bounds what many such messages on one connection hold.
        self._max_partial = (
            2 * max_message_bytes if max_partial_bytes is None else max_partial_bytes
        )
        self._partial = 0
        h2conn = self._h2 = _H2Connection(_CONFIG)
        h2conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                # Fewer, larger DATA frames from peers that send as large as allowed: h2's
                # cost is per frame.
                h2.settings.SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME_BYTES,
            },
        )
        # Taken from the start: h2 applies a new frame size limit to its parser only at the
        # next read after the peer's SETTINGS ack, so a larger frame in the same read as the
        # ack would be refused (FRAME_SIZE_ERROR).
        h2conn.max_inbound_frame_size = _MAX_FRAME_BYTES
        self._streams: dict[int, _Stream] = {}
        #: Streams with answers waiting for the peer's window, and their bytes.
        self._blocked: dict[int, _Stream] = {}
        self._held = 0
        #: Streams with unread messages left while `_held` was over `_HELD_BYTES`.
        self._stalled: dict[int, _Stream] = {}
        self._sending = False
        self._sent: trio.Event | None = None
        #: A write was cut short: the byte stream is broken, nothing more is sent.
        self._broken = False
        self._nursery: trio.Nursery | None = None
        self._handlers: dict[type, Any] = {
            h2.events.RequestReceived: self._request,
            h2.events.DataReceived: self._data,
            h2.events.StreamEnded: self._stream_ended,
            h2.events.StreamReset: self._stream_reset,
            h2.events.WindowUpdated: self._window_updated,
            h2.events.RemoteSettingsChanged: self._settings_changed,
        }

    @property
    def open_streams(self) -> int:
        """Streams open on this side now."""
        return len(self._streams)

    @property
    def held_bytes(self) -> int:
        """Answer bytes waiting for the peer's window."""
        return self._held

    # -- the connection's task --------------------------------------------------------------

    async def serve(self, grace: float) -> None:
        """Serve the connection until the peer closes it (or breaks HTTP/2: GOAWAY, then it
        ends), or until cancelled; either way (`stop`, ``grace`` seconds at most) each stream
        still open is answered UNAVAILABLE (its call closed), the peer told GOAWAY and the
        socket closed."""
        h2conn = self._h2
        h2conn.initiate_connection()
        h2conn.increment_flow_control_window(_CONNECTION_WINDOW - 65_535)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch)
                await self._flush()
                await self._read()
                nursery.cancel_scope.cancel()  # the peer is gone: so are its streams' tasks
        finally:
            # Also when cancelled (the server stops): the nursery then raises a group holding
            # the Cancelled, so this is where a stop is seen.
            await self.stop(grace)

    async def _read(self) -> None:
        h2conn = self._h2
        handlers = self._handlers
        receive = self._io.receive
        while True:
            data = await receive()
            if not data:
                return
            self._reads += 1
            try:
                events = h2conn.receive_data(data)
            except (h2.exceptions.ProtocolError, hyperframe.exceptions.HyperframeError) as exc:
                # h2 queued its GOAWAY (for a ProtocolError): send it; the connection is over.
                _logger.info("an ext_proc connection broke the HTTP/2 protocol: %r", exc)
                await self._flush()
                return
            for event in events:
                handler = handlers.get(type(event))
                if handler is not None:
                    handler(event)
            self._resume_stalled()
            await self._flush()

    async def _watch(self) -> None:
        """End the connection (`serve` then says GOAWAY and closes it) of a peer that sends
        no preface and SETTINGS within the preface timeout, or nothing for the idle timeout
        while no stream is open (nor any answer waits for its window)."""
        assert self._nursery is not None, "watched in `serve` only"
        await trio.sleep(self._preface_timeout)
        if not self._greeted:
            _logger.info(
                "an ext_proc client sent no HTTP/2 preface within %s s: closed",
                self._preface_timeout,
            )
            self._nursery.cancel_scope.cancel()
            return
        reads = self._reads
        while True:
            await trio.sleep(self._idle_timeout)
            if self._reads == reads and not self._streams and not self._blocked:
                _logger.info(
                    "an ext_proc connection idle for %s s: GOAWAY, closed", self._idle_timeout
                )
                self._nursery.cancel_scope.cancel()
                return
            reads = self._reads

    async def _flush(self) -> None:
        """Send what h2 has to send (one write; a second sender waits for the first)."""
        if self._sending:
            event = self._sent
            if event is None:
                event = self._sent = trio.Event()
            await event.wait()
            if self._sending:
                return  # another took over and sends what is queued now
        data = self._h2.data_to_send()
        if not data or self._broken:
            return
        self._sending = True
        try:
            while data:
                # Until the write is whole: one cut short (cancelled, or the peer gone) leaves
                # part of a frame on the wire, after which nothing more can be sent.
                self._broken = True
                await self._io.send(data)
                self._broken = False
                data = self._h2.data_to_send()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer is gone: the read loop sees it
        finally:
            self._sending = False
            event, self._sent = self._sent, None
            if event is not None:
                event.set()

    async def stop(self, grace: float) -> None:
        """Answer every open stream UNAVAILABLE (its call closed), send GOAWAY and close the
        socket, within ``grace`` seconds (shielded: called while the server is cancelled)."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + grace
            for stream in list(self._streams.values()):
                if stream.scope is not None:
                    stream.scope.cancel()
                # Answers waiting for the window may be cut inside a message: trailers right
                # after part of one break gRPC's framing (a client reads a broken message,
                # not the status), so such a stream is reset instead.
                cut = bool(stream.outbound)
                self._forget(stream)
                if cut:
                    self._cancel(stream)
                else:
                    self._finish(stream, Status.UNAVAILABLE, "the endpoint picker is stopping")
            self._streams.clear()
            try:
                self._h2.close_connection()
            except h2.exceptions.ProtocolError:
                pass  # the connection is closed already
            await self._flush()
        # Closed even past the grace (a peer that does not read what is sent).
        with trio.CancelScope(shield=True):
            await self._io.aclose()

    # -- h2's events --------------------------------------------------------------------------

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        path = b""
        for name, value in event.headers or ():
            if name == b":path":
                path = bytes(value)
                break
        try:
            call = self._service.open(path)
        except GrpcError as exc:
            self._trailers_only(stream_id, exc.code, exc.message, event.stream_ended is None)
            return
        stream = self._streams[stream_id] = _Stream(stream_id, call)
        if event.stream_ended is not None:
            stream.remote_ended = True
            self._consume(stream)

    def _data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            # Ended on this side already: the data is read, and dropped.
            self._acknowledge(event.flow_controlled_length or 0, event.stream_id)
            return
        data = event.data or b""
        stream.unacked += event.flow_controlled_length or 0
        if stream.inbound:
            stream.inbound += data
        else:
            stream.inbound = bytearray(data)
        if event.stream_ended is not None:
            stream.remote_ended = True
        self._consume(stream)

    def _stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id or 0)
        if stream is not None and not stream.remote_ended:
            stream.remote_ended = True
            self._consume(stream)

    def _stream_reset(self, event: h2.events.StreamReset) -> None:
        stream_id = event.stream_id or 0
        # A stream ended on this side may still hold answers (and its trailers) for the
        # window: it is in `_blocked` only, and its reset must drop them too.
        stream = self._streams.get(stream_id) or self._blocked.get(stream_id)
        if stream is not None:
            self._drop(stream)

    def _drop(self, stream: _Stream) -> None:
        """The peer closed ``stream`` (reset it): nothing more is read or sent on it, what
        it holds is freed and its call closed (by its task, if one answers it now)."""
        self._streams.pop(stream.id, None)
        self._forget(stream)
        if stream.ended:
            return  # ended on this side already (`_finish` closed its call)
        stream.ended = True
        if not stream.busy:
            stream.close()
        elif stream.scope is not None:
            stream.scope.cancel()  # its task closes the call as it ends
        # (A task started and not run yet sees `ended` as it starts, and closes the call.)

    def _settings_changed(self, event: h2.events.RemoteSettingsChanged) -> None:
        self._greeted = True  # (the first comes with the preface)
        self._window_updated(event)

    def _window_updated(self, event: object) -> None:
        # A stream's own WINDOW_UPDATE can let out that stream's answers alone; the
        # connection's (stream 0), or new SETTINGS, any blocked stream's.
        stream_id = getattr(event, "stream_id", 0)
        if stream_id:
            stream = self._blocked.get(stream_id)
            if stream is not None:
                self._send_out(stream)
            return
        for stream in list(self._blocked.values()):
            self._send_out(stream)

    def _resume_stalled(self) -> None:
        """Go on with the streams parked while too many answers were held, once no longer
        so. Called after each read's events: held bytes drop only as the peer's events say
        (a WINDOW_UPDATE lets answers out, a reset drops a stream's), and only these
        resume the parked streams."""
        if self._held <= _HELD_BYTES and self._stalled:
            stalled, self._stalled = self._stalled, {}
            for stream in stalled.values():
                if stream.id in self._streams:
                    self._consume(stream)

    # -- a stream's messages ------------------------------------------------------------------

    def _consume(self, stream: _Stream) -> None:
        """Answer the stream's whole messages that need no waiting; start a task for the
        first one that does (its later ones wait in `inbound` until it is answered)."""
        if stream.busy or stream.ended:
            return
        if self._held > _HELD_BYTES:
            self._stalled[stream.id] = stream
            return
        call = stream.call
        try:
            data = self._next_message(stream)
            while data is not None:
                answers = call.message(data)
                if answers is None:
                    stream.busy = True
                    assert self._nursery is not None, "streams are read in `serve` only"
                    self._nursery.start_soon(self._answer, stream)
                    return
                if not self._answered(stream, answers):
                    return
                if self._held > _HELD_BYTES:
                    self._stalled[stream.id] = stream
                    return
                data = self._next_message(stream)
            if stream.remote_ended:
                if stream.inbound:
                    # gRPC's framing is broken: the peer's last message is cut short (grpc's
                    # own servers end such a stream INTERNAL too, not OK as if it were whole).
                    raise GrpcError(
                        Status.INTERNAL,
                        f"the request stream ended inside a message ({len(stream.inbound)} "
                        "bytes of it came): send every message whole before half-closing",
                    )
                call.end()
                self._finish(stream, Status.OK, "")
        except Exception as exc:
            self._failed(stream, exc)

    def _answered(self, stream: _Stream, answers: list[bytes]) -> bool:
        """Send a message's ``answers``; whether the stream goes on with its next message
        (not if the peer reset it meanwhile, in the same read as the message or while it was
        answered, nor once its call is done: then it is finished OK)."""
        for answer in answers:
            if stream.ended:
                return False
            self._send_message(stream, answer)
        if stream.ended:
            return False
        if stream.call.done:
            self._finish(stream, Status.OK, "")
            return False
        return True

    def _failed(self, stream: _Stream, exc: Exception) -> None:
        """End ``stream`` for ``exc``, raised answering it (in its ``except``): a GrpcError
        with its status, anything else INTERNAL, logged."""
        if isinstance(exc, GrpcError):
            self._finish(stream, exc.code, exc.message)
        else:
            _logger.exception("the ext_proc stream failed")
            self._finish(stream, Status.INTERNAL, f"the endpoint picker failed: {exc!r}")

    def _next_message(self, stream: _Stream) -> bytes | None:
        """The stream's next whole message, or None when none is whole yet (then what was
        received is acknowledged: the rest of a message is let in, up to the size limit).

        Raises:
            GrpcError: a compressed message (none was negotiated: INTERNAL, as gRPC says), or
                one larger than the limit (RESOURCE_EXHAUSTED).
        """
        inbound = stream.inbound
        size = len(inbound)
        if size >= 5:
            if inbound[0]:
                raise GrpcError(
                    Status.INTERNAL,
                    "a compressed message, but no grpc-encoding was negotiated: this server "
                    "takes uncompressed messages only (send without compression)",
                )
            length = int.from_bytes(inbound[1:5], "big")
            if length > self._max_message:
                raise GrpcError(
                    Status.RESOURCE_EXHAUSTED,
                    f"a message of {length} bytes; the limit is {self._max_message} bytes",
                )
            end = 5 + length
            if size >= end:
                with memoryview(inbound) as view:  # one copy (a slice of inbound is one)
                    data = bytes(view[5:end])
                if size == end:
                    inbound.clear()
                else:
                    del inbound[:end]
                self._release_partial(stream)
                return data
        if stream.unacked:
            if size:
                # A message not whole yet: let the rest in (acknowledged), within the budget.
                held = self._partial - stream.partial + size
                if held > self._max_partial:
                    raise GrpcError(
                        Status.RESOURCE_EXHAUSTED,
                        f"the connection's messages not yet whole would hold {held} bytes; "
                        f"the limit is {self._max_partial}: send fewer large messages at once",
                    )
                self._partial = held
                stream.partial = size
            # Every whole message is answered: the peer may send as much again.
            self._acknowledge(stream.unacked, stream.id)
            stream.unacked = 0
        return None

    def _release_partial(self, stream: _Stream) -> None:
        self._partial -= stream.partial
        stream.partial = 0

    def _acknowledge(self, size: int, stream_id: int) -> None:
        if size:
            try:
                self._h2.acknowledge_received_data(size, stream_id)
            except h2.exceptions.StreamClosedError:
                pass  # the peer reset it meanwhile: nothing more comes on it

    async def _answer(self, stream: _Stream) -> None:
        """The task of a message that waits: answer it, then go on with the stream's
        messages as `_consume` does (ending when none waits). A stream dropped meanwhile
        (reset, the connection gone, the server stopping) cancels it; its call is closed.
        Once it hands the stream back (`_consume`), the stream is not its own any more: a
        task `_consume` started for the next waiting message holds it, and closes it."""
        owned = True
        try:
            if stream.ended:
                return  # dropped before this task ran
            with trio.CancelScope() as scope:
                stream.scope = scope
                try:
                    answers = await stream.call.answer()
                except Exception as exc:
                    self._failed(stream, exc)
                else:
                    # (Ended: the peer reset it as it was answered; `finally` closes the call.)
                    if self._answered(stream, answers):
                        stream.busy = False
                        stream.scope = None
                        owned = False
                        self._consume(stream)
                await self._flush()
        finally:
            if owned and stream.busy:
                stream.close()  # ended while this task held it: free what it holds

    def _send_message(self, stream: _Stream, payload: bytes) -> None:
        """Send one answer (or keep it for the peer's window); a stream the peer has closed
        meanwhile (its reset read in the same batch as the message) is dropped."""
        h2conn = self._h2
        framed = b"\x00" + len(payload).to_bytes(4, "big") + payload
        if stream.outbound:
            stream.outbound += framed
            self._held += len(framed)
            return
        size = len(framed)
        try:
            if not stream.headers_sent:
                stream.headers_sent = True
                h2conn.send_headers(stream.id, _RESPONSE_HEADERS)
            window = h2conn.local_flow_control_window(stream.id)
            if size <= window and size <= h2conn.max_outbound_frame_size:
                h2conn.send_data(stream.id, framed)
                return
        except h2.exceptions.ProtocolError:
            # The peer closed the stream (h2: StreamClosedError, or a ProtocolError for a
            # stream in a closed state): a peer may reset any stream at any time, and that
            # ends this stream only, never the connection.
            self._drop(stream)
            return
        stream.outbound = bytearray(framed)
        self._held += size
        self._blocked[stream.id] = stream
        self._send_out(stream)

    def _send_out(self, stream: _Stream) -> None:
        """Give h2 what the peer's window takes of the stream's waiting answers (then its
        trailers, once all are out)."""
        h2conn = self._h2
        outbound = stream.outbound
        frame = h2conn.max_outbound_frame_size
        try:
            window = h2conn.local_flow_control_window(stream.id)
            while outbound and window > 0:
                size = min(len(outbound), window, frame)
                h2conn.send_data(stream.id, bytes(outbound[:size]))
                del outbound[:size]
                self._held -= size
                window -= size
        except h2.exceptions.ProtocolError:
            self._drop(stream)  # the peer closed it (as in `_send_message`)
            return
        if not outbound:
            self._blocked.pop(stream.id, None)
            if stream.trailers is not None:
                trailers, stream.trailers = stream.trailers, None
                self._send_trailers(stream, trailers)

    def _finish(self, stream: _Stream, code: int, message: str) -> None:
        """End ``stream`` with ``code`` (its call closed: what it booked freed), and reset it
        when the peer is still sending (nothing it sends is read any more)."""
        if not self._end(stream):
            return
        trailers = _trailers(code, message)
        if not stream.headers_sent:
            stream.headers_sent = True
            trailers = [*_RESPONSE_HEADERS, *trailers]
        if stream.outbound:
            stream.trailers = trailers  # sent once the answers before them are
        else:
            self._send_trailers(stream, trailers)

    def _end(self, stream: _Stream) -> bool:
        """Close ``stream``'s call and stop reading it (False: it had ended already)."""
        if stream.ended:
            return False
        stream.ended = True
        stream.busy = False  # closed here: its task (if any) has nothing left to close
        stream.close()
        self._streams.pop(stream.id, None)
        self._stalled.pop(stream.id, None)
        self._release_inbound(stream)
        return True

    def _cancel(self, stream: _Stream) -> None:
        """End ``stream`` with RST_STREAM CANCEL (its call closed), no trailers."""
        if not self._end(stream):
            return
        try:
            self._h2.reset_stream(stream.id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:
            pass  # the peer closed it already

    def _send_trailers(self, stream: _Stream, trailers: list[tuple[bytes, bytes]]) -> None:
        try:
            self._h2.send_headers(stream.id, trailers, end_stream=True)
            if not stream.remote_ended:
                self._h2.reset_stream(stream.id, h2.errors.ErrorCodes.NO_ERROR)
        except h2.exceptions.ProtocolError:
            self._drop(stream)  # the peer closed it (as in `_send_message`)

    def _trailers_only(self, stream_id: int, code: int, message: str, open_: bool) -> None:
        try:
            self._h2.send_headers(
                stream_id, [*_RESPONSE_HEADERS, *_trailers(code, message)], end_stream=True
            )
            if open_:
                self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        except h2.exceptions.ProtocolError:
            pass  # the peer closed it (reset) in the same read: nothing to answer

    def _release_inbound(self, stream: _Stream) -> None:
        """Drop what ``stream`` received and was not answered, and give its bytes back to the
        connection's window: h2 does so only when they are acknowledged, even once the
        stream is closed, so a reset while a message waits for its answer would otherwise
        shrink the connection's window for good."""
        if stream.unacked:
            self._acknowledge(stream.unacked, stream.id)
            stream.unacked = 0
        stream.inbound.clear()
        self._release_partial(stream)

    def _forget(self, stream: _Stream) -> None:
        """Free what ``stream`` holds, both ways."""
        self._release_inbound(stream)
        if self._blocked.pop(stream.id, None) is not None:
            self._held -= len(stream.outbound)
        stream.outbound.clear()
        stream.trailers = None
        self._stalled.pop(stream.id, None)


def _trailers(code: int, message: str) -> list[tuple[bytes, bytes]]:
    if not message:
        return [(b"grpc-status", str(code).encode())]
    # gRPC's grpc-message is percent-encoded UTF-8.
    encoded = quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()
    return [(b"grpc-status", str(code).encode()), (b"grpc-message", encoded)]
