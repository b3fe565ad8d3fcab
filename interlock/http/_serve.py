"""`serve_http`: run an ASGI app over HTTP/1.1 in the caller's trio run.

Two servers: ``h1`` (the default, `_h1`: llhttp parsing on trio sockets, one task per
connection, a sixth to a tenth of Hypercorn's CPU per request) and ``hypercorn``
(Hypercorn's trio worker). Both give the same hardening (docs/operations.md, "Hostile and slow
clients"): a request's head must arrive within ``header_timeout`` of its first byte, else the
client gets a 408 and the connection is closed; and a client that accepts no response bytes
for ``write_timeout`` is disconnected (its request is cancelled). Hypercorn's own
``read_timeout`` cannot do either: it bounds every read, so it would also end a long stream
whose client has nothing to send, and a dripping client resets it with each byte; so its
connection handler gets both here.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final, Literal

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from ._errors import HttpError
from ._h1 import ServerState

#: Which HTTP/1.1 server `serve_http` runs: ``"h1"``, llhttp-parsed on trio sockets (`_h1`,
#: the default: a fraction of Hypercorn's CPU per request), or ``"hypercorn"`` (Hypercorn's
#: trio worker).
HttpServer = Literal["h1", "hypercorn"]

#: nginx's ``client_header_timeout`` and ``send_timeout`` defaults (seconds).
DEFAULT_HEADER_TIMEOUT: Final = 60.0
DEFAULT_WRITE_TIMEOUT: Final = 60.0


async def serve_http(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    backlog: int = 4096,
    keep_alive_timeout: float = 75.0,
    graceful_timeout: float = 1.0,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    max_header_bytes: int = 16 * 1024,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    server: HttpServer = "h1",
    sock: socket.socket | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled (or ``shutdown_trigger`` returns).

    Use with ``await nursery.start(serve_http, app, host, port)``: it returns once the socket
    listens, with the URL it listens on (``port=0`` picks a free port, and the URL says which).
    Connections are trio ``SocketStream``s, which set ``TCP_NODELAY``: without it a stream's
    small chunks wait for the peer's delayed ACK (about 40 ms each).

    ``server`` picks the HTTP/1.1 server: ``"h1"`` (`_h1`, the default) or ``"hypercorn"``;
    the app sees the same ASGI messages on both.
    ``keep_alive_timeout`` is generous because load balancers and gateways keep pools of idle
    connections (with the h1 server, ``0`` or less means no keep-alive: each connection's
    first request, arriving within ``header_timeout``, is answered with ``connection: close``);
    ``graceful_timeout`` bounds how long open requests get when shutting down.
    ``header_timeout``: a request head not complete this long after its first byte is
    answered 408 and its connection closed. ``write_timeout``: a client that takes no bytes of
    a response for this long is disconnected. ``max_header_bytes``: a larger request head is
    answered 431 (h11's limit on an incomplete event). ``sock``: accept on this bound,
    listening socket instead of binding ``host:port`` (``interlock serve --processes``: the
    processes share one socket, and the kernel hands each connection to one of them).

    Raises:
        OSError: the address cannot be bound (in use, not local).
    """
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.backlog = backlog
    config.keep_alive_timeout = keep_alive_timeout
    config.graceful_timeout = graceful_timeout
    config.h11_max_incomplete_size = max_header_bytes
    config.accesslog = None
    config.include_server_header = False
    # Hypercorn logs "Running on ..." at INFO; the caller prints its own banner. Errors in the
    # app still reach stderr (there should be none: the app answers every error itself).
    config.loglevel = "WARNING"
    if server == "h1":
        await _serve_h1(
            app,
            config,
            header_timeout=header_timeout,
            write_timeout=write_timeout,
            shutdown_trigger=shutdown_trigger,
            sock=sock,
            task_status=task_status,
        )
        return
    await _worker_serve(
        wrap_app(app, config.wsgi_max_body_size, "asgi"),
        config,
        partial(_GuardedTCPServer, header_timeout=header_timeout, write_timeout=write_timeout),
        shutdown_trigger=shutdown_trigger,
        sock=sock,
        task_status=task_status,
    )


async def _worker_serve(
    app: Any,
    config: Config,
    connection: Callable[..., TCPServer],
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    sock: socket.socket | None = None,
    task_status: trio.TaskStatus[str],
) -> None:
    # hypercorn.trio.run.worker_serve for plain-TCP binds, with our connection handler: its
    # connection class is not a parameter. Shutdown is the same: stop listening when
    # ``shutdown_trigger`` returns, then give open connections ``graceful_timeout``.
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(app, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            listeners, binds = _listen(config, sock)
            task_status.started(binds[0])
            handler = partial(
                connection, app, config, context, ConnectionState(lifespan_state.copy())
            )
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    if shutdown_trigger is not None:
                        nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners, handler, listeners, handler_nursery=server_nursery
                        )
                    )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, others = error.split((ShutdownError, KeyboardInterrupt))
                if others is not None:
                    raise others from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


def _listen(
    config: Config, sock: socket.socket | None = None
) -> tuple[list[trio.SocketListener], list[str]]:
    """Bind and listen on ``config.bind`` (or listen on ``sock``): the listeners and URLs.

    Raises:
        OSError: an address cannot be bound.
    """
    listeners = []
    binds = []
    bound = [sock] if sock is not None else config.create_sockets().insecure_sockets
    for listening in bound:
        listening.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(listening)))
        binds.append(f"http://{repr_socket_addr(listening.family, listening.getsockname())}")
    return listeners, binds


async def _serve_h1(
    app: Any,
    config: Config,
    *,
    header_timeout: float,
    write_timeout: float,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    sock: socket.socket | None = None,
    task_status: trio.TaskStatus[str],
) -> None:
    # `_worker_serve`'s shape (lifespan, listen, serve, stop listening when
    # ``shutdown_trigger`` returns, ``graceful_timeout`` for open connections) on the
    # llhttp server of `_h1`. Idle keep-alive connections close at once on shutdown.
    lifespan_state: dict[str, Any] = {}
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan = Lifespan(wrapped, config, lifespan_state)
    # Cleartext HTTP/2 with prior knowledge (a connection opening with the HTTP/2 preface) is
    # handed to Hypercorn, as the whole server was before: gRPC-style clients keep working.
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        h2 = partial(
            _GuardedTCPServer,
            wrapped,
            config,
            context,
            ConnectionState(lifespan_state.copy()),
            header_timeout=header_timeout,
            write_timeout=write_timeout,
        )
        server = ServerState(
            app,
            lifespan_state=lifespan_state,
            keep_alive_timeout=config.keep_alive_timeout,
            header_timeout=header_timeout,
            write_timeout=write_timeout,
            max_header_bytes=config.h11_max_incomplete_size,
            h2=lambda stream: h2(stream).run(),
        )
        async with trio.open_nursery() as connections:
            listeners, binds = _listen(config, sock)
            try:
                task_status.started(binds[0])
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(server.sweep_idle)
                    accepting.start_soon(
                        partial(
                            trio.serve_listeners,
                            server.handle,
                            listeners,
                            handler_nursery=connections,
                        )
                    )
                    if shutdown_trigger is None:
                        await trio.sleep_forever()
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()
            finally:
                for listener in listeners:
                    listener.socket.close()
                server.close_idle()
                await context.terminated.set()
                connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


class _GuardedTCPServer(TCPServer):
    """Hypercorn's connection handler with a request-head deadline and a write timeout."""

    def __init__(self, *args: Any, header_timeout: float, write_timeout: float) -> None:
        super().__init__(*args)
        self._header_timeout = header_timeout
        self._write_timeout = write_timeout

    def _waiting_head(self) -> bytes | None:
        """The bytes of an HTTP/1.1 request head received so far (maybe none), or None when
        the connection is not reading a request head."""
        connection = getattr(self.protocol.protocol, "connection", None)
        if type(connection) is not h11.Connection or connection.their_state is not h11.IDLE:
            return None
        return connection.trailing_data[0]

    def _head_too_large(self, data: bytes) -> bool:
        """The request head being received, with ``data``, is over h11's limit (which h11
        itself checks only while the head is incomplete)."""
        limit = self.config.h11_max_incomplete_size
        head = self._waiting_head()
        if head is None or len(head) + len(data) <= limit:
            return False
        received = head + data
        end = received.find(b"\r\n\r\n", 0, limit + 4)
        if end < 0:
            end = received.find(b"\n\n", 0, limit + 2)
        return end < 0

    async def _read_data(self) -> None:
        # Hypercorn's loop, with a deadline while a request head is incomplete (a request's
        # body has its own, in the app: `interlock.http._app.read_body`).
        head_started: float | None = None
        while True:
            deadline = math.inf if head_started is None else head_started + self._header_timeout
            try:
                with trio.fail_at(deadline):
                    data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            except trio.TooSlowError:
                await self._refuse(
                    408,
                    b"Request Timeout",
                    f"the request headers did not arrive within {self._header_timeout:g} s of "
                    "their first byte; send the whole request at once",
                    "request_timeout",
                )
                break
            if self._head_too_large(data):
                # h11 would answer 431 with an empty body; clients expect an error object.
                limit = self.config.h11_max_incomplete_size
                await self._refuse(
                    431,
                    b"Request Header Fields Too Large",
                    f"the request line and headers are larger than {limit} bytes; send fewer "
                    "or shorter headers",
                    "headers_too_large",
                )
                break
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
            if self._waiting_head():
                if head_started is None:
                    head_started = trio.current_time()
            else:
                head_started = None
        await self.protocol.handle(Closed())

    async def _refuse(self, status: int, reason: bytes, message: str, code: str) -> None:
        """Answer a request whose head never arrived whole; the caller closes."""
        body = HttpError(status, message, code=code).body()
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, len(body))
        )
        await self.protocol_send(RawData(head + body))
        # The keep-alive timer would hold the connection open until it fires.
        await self.idle_task.stop()

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        async with self.send_lock:
            try:
                # Shielded as Hypercorn does (a cancelled write would corrupt the framing), but
                # bounded: a client that stops reading would otherwise hold the task forever.
                # One scope does both (its own deadline still applies inside the shield): this
                # runs for every write.
                deadline = trio.current_time() + self._write_timeout
                with trio.CancelScope(shield=True, deadline=deadline):
                    await self.stream.send_all(event.data)
                    return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await self.stream.aclose()
        await self.protocol.handle(Closed())
