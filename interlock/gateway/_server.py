"""The gRPC side: `serve_ext_proc` serves `ExtProcPicker` from this trio run.

gRPC's HTTP/2, framing and status run in this trio run (`interlock.gateway._grpc`: python-
hyper's sans-IO ``h2`` on trio sockets, one task per connection, no thread); protobuf coding is
xds-protos' and grpcio-health-checking's message classes. A connection's task answers each
message that needs no router state at once, in order (`ExtProcStream.answer_now`: request
headers, body chunks before the last, every response phase); a message that needs the router
(the pick) gets a task while it is answered, the stream's later messages waiting unread
meanwhile, so HTTP/2's flow control holds back a gateway that sends ahead. A stream's end,
however it comes (the gateway's half-close, a reset, a dropped connection, the server
stopping), frees its booking (`ExtProcStream.close`).

Served (``127.0.0.1:E`` over h2c, HTTP/2 with prior knowledge as Envoy's gRPC client speaks it,
or over TLS with ``tls``, `interlock.gateway._tls`: ALPN ``h2``):
``envoy.service.ext_proc.v3.ExternalProcessor/Process`` (bidirectional streaming) and
``grpc.health.v1.Health/Check``; on the health port (``--ext-proc-health-port``), the health
check alone; any other method is UNIMPLEMENTED.

Health service names (GAIE's EPP): ``liveness`` is SERVING while the process answers;
``readiness``, ``envoy.service.ext_proc.v3.ExternalProcessor`` and ``""`` are SERVING while
the picker can pick (`ExtProcPicker.ready`: not draining, a worker with an HTTP endpoint
registered), NOT_SERVING otherwise; any other name is gRPC NOT_FOUND.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
from typing import Final

import trio
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest
from google.protobuf.message import DecodeError
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from ._endpoints import host_port
from ._grpc import (
    PREFACE_TIMEOUT,
    GrpcCall,
    GrpcConnection,
    GrpcError,
    SocketIO,
    Status,
    StreamIO,
)
from ._picker import ExtProcPicker, ExtProcStream
from ._tls import ALPN, ExtProcTLS

__all__ = ["EXT_PROC_SERVICE", "serve_ext_proc"]

_logger = logging.getLogger("interlock.gateway")

EXT_PROC_SERVICE: Final = "envoy.service.ext_proc.v3.ExternalProcessor"
_PROCESS_PATH: Final = f"/{EXT_PROC_SERVICE}/Process".encode()
_CHECK_PATH: Final = b"/grpc.health.v1.Health/Check"
_SERVING: Final = HealthCheckResponse.SERVING
_NOT_SERVING: Final = HealthCheckResponse.NOT_SERVING
#: The largest gRPC message accepted: a body chunk Envoy sends stays far below it.
_READ_MAX_BYTES: Final = 64 * 1024 * 1024
#: How long a stopping server gives each connection to answer its open streams UNAVAILABLE and
#: say GOAWAY before it closes the socket anyway (a peer that does not read).
_ANSWER_TIMEOUT: Final = 3.0
#: How many times port 0 on a name of several addresses is bound again to get one port for all
#: (each rebind's ports checked).
_SAME_PORT_TRIES: Final = 5
#: How long a TLS client has to finish its handshake: one that connects and says nothing must
#: not hold a task and a socket for ever (as long as an h2c client has for its preface).
_HANDSHAKE_TIMEOUT: Final = PREFACE_TIMEOUT


class _Process:
    """One ext_proc stream: the picker's `ExtProcStream` behind `GrpcCall`."""

    def __init__(self, state: ExtProcStream) -> None:
        self.state = state
        #: The message `message` left for `answer` (it needs the router).
        self._waiting: ProcessingRequest | None = None

    def message(self, data: bytes) -> list[bytes] | None:
        state = self.state
        try:
            request = ProcessingRequest.FromString(data)
        except DecodeError as exc:
            _logger.warning("an ext_proc stream ended: not a ProcessingRequest: %s", exc)
            raise GrpcError(
                Status.INVALID_ARGUMENT,
                f"a message of the stream is not a valid ProcessingRequest: {exc}",
            ) from None
        if state.finished:
            return []  # the picker ended the stream (an ImmediateResponse): ignored
        answers = state.answer_now(request)
        if answers is None:
            self._waiting = request
            return None
        return [answer.SerializeToString() for answer in answers]

    async def answer(self) -> list[bytes]:
        request, self._waiting = self._waiting, None
        assert request is not None, "`answer` follows a `message` that returned None"
        answers = await self.state.handle(request)
        return [answer.SerializeToString() for answer in answers]

    @property
    def done(self) -> bool:
        return self.state.finished

    def end(self) -> None:
        pass  # `close` frees the booking as the stream ends

    def close(self) -> None:
        self.state.close()


class _Check:
    """One ``grpc.health.v1.Health/Check`` call (unary): answered at its request."""

    def __init__(self, picker: ExtProcPicker) -> None:
        self._picker = picker
        self.done = False

    def message(self, data: bytes) -> list[bytes]:
        try:
            service = HealthCheckRequest.FromString(data).service
        except DecodeError as exc:
            raise GrpcError(
                Status.INVALID_ARGUMENT, f"the message is not a valid HealthCheckRequest: {exc}"
            ) from None
        if service == "liveness":
            status = _SERVING
        elif service in ("", "readiness", EXT_PROC_SERVICE):
            status = _SERVING if self._picker.ready else _NOT_SERVING
        else:
            raise GrpcError(Status.NOT_FOUND, f"unknown service {service!r}")
        self.done = True
        return [HealthCheckResponse(status=status).SerializeToString()]

    async def answer(self) -> list[bytes]:
        raise AssertionError("a health check is answered at once")

    def end(self) -> None:
        raise GrpcError(
            Status.INVALID_ARGUMENT, "the health check ended without its HealthCheckRequest"
        )

    def close(self) -> None:
        pass


class _Service:
    """What one port serves: the health check, and the picker's streams if ``process``."""

    def __init__(self, picker: ExtProcPicker, *, process: bool) -> None:
        self._picker = picker
        self._process = process

    def open(self, path: bytes) -> GrpcCall:
        if path == _PROCESS_PATH and self._process:
            return _Process(self._picker.open_stream())
        if path == _CHECK_PATH:
            return _Check(self._picker)
        raise GrpcError(
            Status.UNIMPLEMENTED, f"unknown method {path.decode('latin-1')} on this port"
        )


async def _serve_connection(
    service: _Service, context: ssl.SSLContext | None, connected: trio.SocketStream
) -> None:
    """Serve one accepted connection until it ends (or the server stops); whatever goes
    wrong ends this connection only."""
    io: SocketIO | StreamIO | None = None
    try:
        if context is None:
            io = SocketIO(socket.socket(fileno=connected.socket.detach()))
        else:
            secure = trio.SSLStream(connected, context, server_side=True)
            io = StreamIO(secure)
            try:
                with trio.fail_after(_HANDSHAKE_TIMEOUT):
                    await secure.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                _logger.info("an ext_proc client's TLS handshake failed: %r", exc)
                return
            protocol = secure.selected_alpn_protocol()
            if protocol != ALPN:
                # gRPC is HTTP/2 only: a client that cannot speak it gets nothing it can read.
                _logger.info(
                    "an ext_proc client negotiated no HTTP/2 over TLS (ALPN %r): closed", protocol
                )
                return
        connection = GrpcConnection(io, service, max_message_bytes=_READ_MAX_BYTES)
        await connection.serve(_ANSWER_TIMEOUT)
    except Exception:
        _logger.exception("an ext_proc connection failed (closed; the server serves on)")
    finally:
        with trio.CancelScope(shield=True):
            if io is not None:
                await io.aclose()
            else:
                await connected.aclose()


async def _listen(host: str, port: int) -> list[trio.SocketListener]:
    """Listeners on every address of ``host:port``.

    Raises:
        OSError: it cannot be bound (``filename``: the address; ``errno``: why, None if not
            known, as when the host does not resolve).
    """
    address = host_port(host, port)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
        tries = 0
        # Checked after every bind, the last try's too.
        while len({listener.socket.getsockname()[1] for listener in listeners}) > 1:
            if tries == _SAME_PORT_TRIES:
                for listener in listeners:
                    await listener.aclose()
                raise OSError(None, f"no free port on every address of {host}", address)
            tries += 1
            # Port 0 on a name of several addresses (``localhost``: 127.0.0.1 and ::1) gives
            # each its own free port, but one is reported: bind them all on the first's.
            first = listeners[0].socket.getsockname()[1]
            for listener in listeners:
                await listener.aclose()
            try:
                listeners = await trio.open_tcp_listeners(first, host=host)
            except OSError:
                listeners = await trio.open_tcp_listeners(0, host=host)  # taken meanwhile
        return listeners
    except socket.gaierror as exc:  # its codes are not errnos
        raise OSError(None, f"cannot listen on {address}: {exc}", address) from None
    except OSError as exc:
        if exc.filename == address:
            raise
        reason = os.strerror(exc.errno) if exc.errno is not None else str(exc)
        raise OSError(exc.errno, f"cannot listen on {address}: {reason}", address) from None


async def serve_ext_proc(
    picker: ExtProcPicker,
    host: str,
    port: int,
    *,
    health_port: int | None = None,
    tls: ExtProcTLS | None = None,
    task_status: trio.TaskStatus[tuple[str, str | None]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``picker`` (``.../ExternalProcessor/Process`` and the gRPC health check) on
    ``host:port`` over h2c (with ``tls``: over TLS, HTTP/2 by ALPN), and the health check alone
    on ``host:health_port`` if given (always h2c, as GAIE's picker serves it: Kubernetes' gRPC
    probes speak no TLS, and it tells nothing but SERVING or not), until cancelled. Use with
    ``nursery.start``: it reports where each listens (``host:port``, ``[v6]:port``; port 0: a
    free one). Runs in this trio run (no thread). When cancelled, the open streams are
    answered UNAVAILABLE (their bookings freed) and each connection told GOAWAY, then closed
    (`_ANSWER_TIMEOUT` at most).

    Raises:
        OSError: an address cannot be bound (``filename`` is that address; ``errno`` why, or
            None if not known).
        ConfigError: ``tls`` cannot be served (`ExtProcTLS.server_context`).
    """
    context = tls.server_context() if tls is not None else None
    binds = [(host, port, True)]
    if health_port is not None:
        binds.append((host, health_port, False))
    served: list[tuple[list[trio.SocketListener], _Service, ssl.SSLContext | None]] = []
    try:
        for bind_host, bind_port, process in binds:
            listeners = await _listen(bind_host, bind_port)
            served.append(
                (listeners, _Service(picker, process=process), context if process else None)
            )
    except BaseException:
        with trio.CancelScope(shield=True):
            for listeners, _, _ in served:
                for listener in listeners:
                    await listener.aclose()
        raise
    found = [host_port(host, listeners[0].socket.getsockname()[1]) for listeners, _, _ in served]
    async with trio.open_nursery() as nursery:
        for listeners, service, port_context in served:
            handler = functools.partial(_serve_connection, service, port_context)
            nursery.start_soon(trio.serve_listeners, handler, listeners)
        task_status.started((found[0], found[1] if len(found) > 1 else None))
