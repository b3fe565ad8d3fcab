"""`FrameConnection`: one TCP connection speaking the worker protocol, from either end.

Writing: any task queues frames with `send_nowait` (never blocks); one writer task joins
everything queued since its last write into a single ``send_all``, so an idle connection adds
no latency and a busy one makes one syscall per batch rather than per frame
(reference/stack.md section 3.1: 2.5-7x the throughput of a ``send_all`` per frame). With
``batch_outputs`` (a version-3 peer), outputs queued with `send_output_nowait` wait unencoded
until the writer's next write and go out as one `Outputs` frame, each stream's joined into
one output: a worker ahead of its frontend sends fewer, larger frames.

Reading: each ``receive_some`` is fed to a `FrameParser`, which returns every frame it
completes; the reader hands them to a synchronous callback, in order.
"""

from __future__ import annotations

import collections
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

import trio

from ...wire import EngineOutput
from ...wire._frames import (
    MAX_BATCH,
    MAX_FRAME_SIZE,
    Broken,
    FrameParser,
    Goodbye,
    Output,
    Outputs,
    ProtocolError,
    encode_frame,
)
from ...wire._output import join_outputs

_logger = logging.getLogger("interlock.wire")

#: Bytes asked of the socket per read.
RECEIVE_SIZE = 256 * 1024
#: How long a closing end waits for its `Goodbye` to go out.
GOODBYE_TIMEOUT = 1.0
#: Queued bytes beyond which a peer that does not read is cut off (instead of the queue
#: growing without bound).
MAX_PENDING_BYTES = 256 * 1024 * 1024
#: TCP keepalive on every worker-protocol socket, both ends: the first probe after this many
#: idle seconds, then one every `KEEPALIVE_INTERVAL`, and the peer is dead after
#: `KEEPALIVE_COUNT` unanswered (about 30 s), so a vanished host is found even on an idle
#: connection, where no heartbeat or write would notice.
KEEPALIVE_IDLE = 15
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


def set_keepalive(stream: trio.abc.Stream) -> None:
    """Turn on TCP keepalive for ``stream``'s socket (`KEEPALIVE_IDLE` and friends, where the
    platform has the options); nothing for a stream that is not a socket (tests' in-memory
    streams). A TLS stream's is its transport's socket."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            stream.setsockopt(socket.IPPROTO_TCP, option, value)


class FrameConnection:
    """A framed message stream over ``stream`` (one per TCP connection).

    ``peer`` names the other end in logs and errors. Received frames with a tag in
    ``skip_tags`` are dropped undecoded (`FrameParser`).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: str,
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        skip_tags: Iterable[str] = (),
    ) -> None:
        self.stream = stream
        self.peer = peer
        self.max_frame_size = max_frame_size
        self.max_pending_bytes = max_pending_bytes
        #: True once the connection has ended; queued and later frames are dropped.
        self.closed = False
        #: The reason the peer gave in its `Goodbye`, if it sent one.
        self.peer_goodbye: str | None = None
        #: When (trio time) bytes last arrived: any frame is a sign of life.
        self.last_receive = trio.current_time()
        self._parser = FrameParser(max_frame_size=max_frame_size, skip_tags=skip_tags)
        self._received: collections.deque[Any] = collections.deque()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        #: Send outputs as `Outputs` frames (the peer speaks version 3); set after the handshake.
        self.batch_outputs = False
        #: Outputs waiting for the writer, by stream, in the order their streams first came.
        self._outputs: dict[int, EngineOutput] = {}
        self._scope: trio.CancelScope | None = None
        self._wakeup = trio.Event()
        self._drained = trio.Event()
        self._end_reason: str | None = None

    @property
    def skipped(self) -> int:
        """Received frames dropped undecoded (their tag is in ``skip_tags``)."""
        return self._parser.skipped

    # -- sending (never blocks) ---------------------------------------------------------------

    def send_nowait(self, message: Any) -> None:
        """Queue ``message`` for the writer; dropped if the connection has ended.

        Raises:
            ProtocolError: it encodes to a frame over the size limit.
        """
        if not self.closed:
            self.send_frame_nowait(encode_frame(message, max_frame_size=self.max_frame_size))

    def send_output_nowait(self, stream: int, output: EngineOutput) -> None:
        """Queue ``output`` of stream ``stream``; dropped if the connection has ended.

        Without ``batch_outputs``, an `Output` frame now. With it, the output waits for the
        writer, joined to the stream's output already waiting if it can be (`join_outputs`);
        any other frame queued meanwhile first sends the waiting outputs, so frames keep
        their order but for the outputs joined.
        """
        if self.closed:
            return
        if not self.batch_outputs:
            self.send_nowait(Output(stream=stream, output=output))
            return
        waiting = self._outputs
        last = waiting.get(stream)
        if last is not None:
            joined = join_outputs(last, output)
            if joined is not None:
                waiting[stream] = joined
                return
            self._encode_outputs()
            waiting = self._outputs
        elif len(waiting) >= MAX_BATCH:
            self._encode_outputs()
        waiting[stream] = output
        self._wakeup.set()

    def _encode_outputs(self) -> None:
        """Queue the waiting outputs as one `Outputs` frame. Never raises: outputs too large
        for one frame together go one frame each, and a stream whose output is too large on
        its own gets `Broken` in its place (what sending it unbatched did), its later outputs
        ignored by the frontend; the other streams lose nothing."""
        waiting = self._outputs
        self._outputs = {}
        limit = self.max_frame_size
        try:
            frame = encode_frame(Outputs(outputs=tuple(waiting.items())), max_frame_size=limit)
        except ProtocolError:
            for pair in waiting.items():
                try:
                    frame = encode_frame(Outputs(outputs=(pair,)), max_frame_size=limit)
                except ProtocolError as exc:
                    frame = encode_frame(Broken(stream=pair[0], message=str(exc)))
                self._queue(frame)
            return
        self._queue(frame)

    def send_frame_nowait(self, frame: bytes) -> None:
        """Queue an encoded frame (one encoding shared by many connections).

        A peer that lets more than ``max_pending_bytes`` pile up is not reading: the
        connection is ended (`serve` returns), rather than buffering without bound.
        """
        if self.closed:
            return
        if self._outputs:
            self._encode_outputs()
        self._queue(frame)

    def _queue(self, frame: bytes) -> None:
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        self._wakeup.set()
        if self._pending_bytes > self.max_pending_bytes and self._scope is not None:
            if self._end_reason is None:
                self._end_reason = (
                    f"{self.peer} is not reading: over {self.max_pending_bytes} bytes queued"
                )
                _logger.warning("closing the connection: %s", self._end_reason)
            self._scope.cancel()

    # -- receiving ----------------------------------------------------------------------------

    async def receive(self) -> Any:
        """Wait for the next message (for the handshake, before `serve`).

        Raises:
            ProtocolError: a malformed frame.
            trio.BrokenResourceError: the connection broke or the peer closed it.
        """
        while not self._received:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise trio.BrokenResourceError(f"{self.peer} closed the connection")
            self.last_receive = trio.current_time()
            self._received.extend(self._parser.feed(data))
        return self._received.popleft()

    async def serve(self, on_message: Callable[[Any], None]) -> str:
        """Write queued frames and pass each received message to ``on_message`` until the
        connection ends; returns why it ended (closed by the peer, broken, a protocol error).

        ``on_message`` runs in the reader task and must not block; it may raise
        `ProtocolError` for a message out of place. On a protocol error the peer is sent a
        `Goodbye` with the reason (waiting at most `GOODBYE_TIMEOUT`). A received `Goodbye`
        is logged and recorded in `peer_goodbye`, not passed on.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._write_forever, nursery.cancel_scope)
                reason = await self._read_forever(on_message)
                if self._end_reason is None:
                    self._end_reason = reason
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            self._scope = None
            self._pending.clear()
            self._outputs.clear()
            self._pending_bytes = 0
        return self._end_reason or "closed"

    async def goodbye(self, reason: str) -> None:
        """Queue a `Goodbye` with ``reason`` and wait until every queued frame is written (at
        most `GOODBYE_TIMEOUT`): what a worker that stops sends before closing."""
        await self._say_goodbye(reason)

    def abort(self, reason: str) -> None:
        """End the connection now (a dead peer): `serve` returns ``reason``. Nothing is sent;
        the caller closes the socket (`aclose`)."""
        if self._end_reason is None:
            self._end_reason = reason
        self.closed = True
        if self._scope is not None:
            self._scope.cancel()

    async def aclose(self) -> None:
        """Close the socket now (also when cancelled)."""
        self.closed = True
        await trio.aclose_forcefully(self.stream)

    # -- tasks --------------------------------------------------------------------------------

    async def _read_forever(self, on_message: Callable[[Any], None]) -> str:
        received = self._received
        stream = self.stream
        feed = self._parser.feed
        try:
            while received:
                self._dispatch(received.popleft(), on_message)
            while True:
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    return f"connection lost ({_cause(exc)})"
                self.last_receive = trio.current_time()
                if not data:
                    if self.peer_goodbye is not None:
                        return f"closed by {self.peer}: {self.peer_goodbye}"
                    return f"closed by {self.peer}"
                for message in feed(data):
                    self._dispatch(message, on_message)
        except ProtocolError as exc:
            _logger.warning("closing the connection to %s: %s", self.peer, exc)
            await self._say_goodbye(str(exc))
            return f"protocol error: {exc}"

    def _dispatch(self, message: Any, on_message: Callable[[Any], None]) -> None:
        if type(message) is Goodbye:
            self.peer_goodbye = message.reason
            _logger.info("%s is closing the connection: %s", self.peer, message.reason)
        else:
            on_message(message)

    async def _write_forever(self, scope: trio.CancelScope) -> None:
        stream = self.stream
        try:
            while True:
                if self._outputs:
                    self._encode_outputs()
                while not self._pending:
                    self._drained.set()
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    if self._outputs:
                        self._encode_outputs()
                batch = self._pending
                self._pending = []
                data = batch[0] if len(batch) == 1 else b"".join(batch)
                await stream.send_all(data)
                self._pending_bytes -= len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if self._end_reason is None:
                self._end_reason = f"connection lost while sending ({_cause(exc)})"
            scope.cancel()

    async def _say_goodbye(self, reason: str) -> None:
        try:
            self.send_nowait(Goodbye(reason=reason))
        except ProtocolError:  # pragma: no cover - a reason is far below the frame limit
            return
        self._drained = trio.Event()
        with trio.move_on_after(GOODBYE_TIMEOUT):
            await self._drained.wait()


def _cause(exc: BaseException) -> str:
    """The most specific text an I/O error carries (trio wraps the OS error)."""
    inner = exc.__cause__ or exc.__context__
    return str(inner or exc) or type(inner or exc).__name__
