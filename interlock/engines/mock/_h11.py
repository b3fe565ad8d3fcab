"""A small HTTP/1.1 server on trio + h11, for the mock engine's vLLM-compatible surface.

Not Hypercorn: the mock must reproduce what a real vLLM does on the wire when it fails (a
connection reset mid-stream, a clean EOF in the middle of a chunked body), which an ASGI app
cannot do, since it never sees the socket. Here a handler gets an `HttpResponder` that can
answer normally, stream chunks, reset the connection or just close it. It is also the "bare
trio + h11" server reference/stack.md section 2 measured 4-5x faster than Hypercorn-trio.

Keep-alive connections are served one request at a time. While a handler runs, a watcher reads
the socket: the client closing its end cancels the handler (so a stream's engine request is
aborted and its slot freed).
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final

import attrs
import h11
import trio

_logger = logging.getLogger("interlock.engines.mock.http")

#: Bodies larger than this get 413 (16 MiB holds a 128k-token prompt as JSON, with room).
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
_READ_SIZE: Final = 65536


@attrs.frozen
class HttpRequest:
    """A request as the handler sees it: ``headers`` has lower-case names (repeated headers
    joined with ``", "``) and ``body`` is complete."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes


class ConnectionLost(Exception):
    """The client went away while the response was being sent."""


class HttpResponder:
    """The response side of one request. Use exactly one of `send_whole` or `start` (then
    `send_chunk` any number of times and `end`); `reset` and `close` end the connection instead
    at any point, as a crashing server would."""

    __slots__ = ("_conn", "_stream", "closed", "started")

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        self._stream = stream
        self._conn = conn
        #: The response head went out.
        self.started = False
        #: The connection was reset or closed on purpose: it cannot carry another request.
        self.closed = False

    async def send_whole(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Send a complete response with a ``Content-Length`` (no content type when
        ``content_type`` is empty).

        Raises:
            ConnectionLost: the client is gone.
        """
        head = [("content-type", content_type)] if content_type else []
        head += [("content-length", str(len(body))), *headers]
        self.started = True
        await self._send(h11.Response(status_code=status, headers=head))
        if body:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """Send the response head without a length: the body follows in chunks.

        Raises:
            ConnectionLost: the client is gone.
        """
        self.started = True
        await self._send(h11.Response(status_code=status, headers=list(headers)))

    async def send_chunk(self, data: bytes) -> None:
        """Send one chunk of a started response (one HTTP chunk on the wire).

        Raises:
            ConnectionLost: the client is gone.
        """
        if data:
            await self._send(h11.Data(data=data))

    async def end(self) -> None:
        """End a started response (the zero-length terminating chunk).

        Raises:
            ConnectionLost: the client is gone.
        """
        await self._send(h11.EndOfMessage())

    async def reset(self) -> None:
        """Abort the connection with a TCP reset (``SO_LINGER`` 0, then close): the client's
        next read fails with ``ECONNRESET``. Data still in the send buffer is discarded."""
        self.closed = True
        try:
            self._stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        except OSError:
            pass  # already closed by the peer: nothing left to reset
        await self._stream.aclose()

    async def close(self) -> None:
        """Close the connection cleanly (FIN) wherever the response is: what a client sees when
        the server process is killed (no terminating chunk, no error)."""
        self.closed = True
        await self._stream.aclose()

    async def _send(self, event: h11.Event) -> None:
        if self.closed:
            raise ConnectionLost("the connection was closed on purpose")
        data = self._conn.send(event)
        if not data:
            return
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(str(exc)) from None


Handler = Callable[[HttpRequest, HttpResponder], Awaitable[None]]


async def serve_h11(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    listeners: list[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port`` (or on ``listeners`` already open) until cancelled.

    Use with ``await nursery.start(serve_h11, handler, host, port)``, which returns the bound
    ``(host, port)`` once listening (``port=0`` lets the OS choose). A caller that runs this in
    a nursery of its own and documents OSError opens the listeners itself first
    (`trio.open_tcp_listeners`), so that a port in use reaches its caller as an OSError, not
    inside an exception group.

    Raises:
        OSError: the address cannot be bound.
    """
    if listeners is None:
        listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()

    async def connection(stream: trio.SocketStream) -> None:
        await _serve_connection(handler, stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, connection, listeners)
        task_status.started((bound[0], bound[1]))


async def _serve_connection(handler: Handler, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            try:
                request = await _read_request(stream, conn)
            except h11.RemoteProtocolError as exc:
                await _refuse(stream, conn, exc.error_status_hint, f"bad HTTP request: {exc}")
                return
            except _TooLarge:
                await _refuse(
                    stream, conn, 413, f"the request body is larger than {MAX_BODY_BYTES} bytes"
                )
                return
            if request is None:
                return
            responder = HttpResponder(stream, conn)
            reusable = await _handle(handler, request, responder, stream, conn)
            if not reusable or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionLost):
        pass  # the client went away
    finally:
        await stream.aclose()


class _TooLarge(Exception):
    pass


async def _receive(stream: trio.SocketStream, conn: h11.Connection) -> None:
    try:
        data = await stream.receive_some(_READ_SIZE)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        data = b""
    conn.receive_data(data)


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> HttpRequest | None:
    """The next request with its whole body, or None when the client closed the connection."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            await _receive(stream, conn)
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Request):
            break
        raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} before a request")
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _TooLarge
    parts: list[bytes] = []
    size = 0
    while True:
        body_event = conn.next_event()
        if body_event is h11.NEED_DATA:
            await _receive(stream, conn)
            continue
        if isinstance(body_event, h11.Data):
            size += len(body_event.data)
            if size > MAX_BODY_BYTES:
                raise _TooLarge
            parts.append(bytes(body_event.data))
            continue
        if isinstance(body_event, h11.EndOfMessage):
            break
        if isinstance(body_event, h11.ConnectionClosed):
            return None
        raise h11.RemoteProtocolError(f"unexpected {type(body_event).__name__} in a body")
    target = event.target.decode("latin-1")
    path, _, query = target.partition("?")
    return HttpRequest(
        method=event.method.decode("ascii").upper(),
        path=path,
        query=query,
        headers=headers,
        body=b"".join(parts),
    )


async def _handle(
    handler: Handler,
    request: HttpRequest,
    responder: HttpResponder,
    stream: trio.SocketStream,
    conn: h11.Connection,
) -> bool:
    """Run the handler while watching for the client to leave; whether the connection can
    carry another request."""
    gone = False

    async def watch(cancel: trio.CancelScope) -> None:
        nonlocal gone
        while True:
            try:
                data = await stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                gone = True
                cancel.cancel()
                return
            # A pipelined next request: h11 keeps it for the next cycle.
            conn.receive_data(data)

    lost = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            try:
                await handler(request, responder)
            except ConnectionLost:
                # Caught here: raised through the nursery it would arrive as an exception
                # group, and be logged as an unhandled error of the handler.
                lost = True
            finally:
                nursery.cancel_scope.cancel()
    except Exception:
        _logger.exception("unhandled error in %s %s", request.method, request.path)
        if responder.started or responder.closed:
            return False
        body = (
            b'{"error":{"message":"internal error in the mock server (see its log)",'
            b'"type":"InternalServerError","param":null,"code":500}}'
        )
        try:
            await responder.send_whole(500, body)
        except ConnectionLost:
            return False
        return False
    return not lost and not gone and not responder.closed


async def _refuse(stream: trio.SocketStream, conn: h11.Connection, status: int, text: str) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = (
        b'{"error":{"message":'
        + _json_string(text)
        + b',"type":"BadRequestError","param":null,"code":'
        + str(status).encode()
        + b"}}"
    )
    head = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    try:
        data = conn.send(h11.Response(status_code=status, headers=head))
        data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _json_string(text: str) -> bytes:
    return json.dumps(text).encode()
