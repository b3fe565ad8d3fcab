"""The request path to an engine: a small HTTP/1.1 client on trio sockets, parsed by llhttp.

`EngineConnections` keeps one engine's keep-alive connections and posts each request with one
socket write; `EngineResponse` hands its body back as it arrives (chunked encoding already
undone), in whatever pieces the socket delivered, so an SSE reader sees every event that is
already there at once.

It carries everything `OpenAIEngine` sends an engine (start-up checks, ``/health`` and
``/metrics`` polls, requests). Why not httpx: on the request path httpx, httpcore and h11
took about 40 % of ``interlock serve``'s CPU per streamed request in front of HTTP engines
(py-spy, docs/benchmarks.md "In front of an engine"): request and header objects, h11's
pure-Python event machine per chunk, a pool lock per request. llhttp (``httptools``, which
interlock's HTTP server already parses with) does the parsing in C.
"""

from __future__ import annotations

import os
import select
import ssl
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httptools
import trio

#: Idle connections kept per engine (more concurrent requests open more, closed after use).
MAX_IDLE = 256
#: Bytes asked of the socket per read: a whole burst of SSE chunks fits.
READ_SIZE = 65536
#: Seconds a request may take to be written (an engine that reads nothing), as httpx's write
#: timeout was.
SEND_TIMEOUT = 60.0
#: A request up to this size is written without a `SEND_TIMEOUT` scope (which costs a few
#: percent of a request's CPU): it fits a connection's empty send buffer (Linux starts one at
#: 16 KiB, TLS records included), so it cannot wait on the engine.
UNTIMED_SEND_BYTES = 8 * 1024
#: Bytes of an answer's head (status line, headers, and any 1xx answers before it) past which
#: the engine is taken as broken: llhttp itself has no limit, and the head is held in memory.
MAX_HEAD_BYTES = 64 * 1024


class EngineHttpError(Exception):
    """The exchange with the engine failed (see the subclasses)."""


class EngineConnectError(EngineHttpError):
    """No connection to the engine: refused, unreachable, timed out, or TLS failed."""


class EngineProtocolError(EngineHttpError):
    """The connection broke or the engine's answer is not valid HTTP/1.1."""


def ssl_context_for(verify: bool | str | ssl.SSLContext) -> ssl.SSLContext:
    """An SSL context as httpx's ``verify`` means it: True checks against the system's CAs,
    a string names a CA bundle (file or folder), False checks nothing; a context is itself."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if isinstance(verify, str):
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    return ssl.create_default_context()


class EngineConnections:
    """Keep-alive HTTP/1.1 connections to one engine (``base_url``: scheme, host and port).

    ``headers`` go with every request (an API key's ``authorization``); ``verify`` is for an
    ``https`` engine (`ssl_context_for`). `post` reuses the most recently idle connection, or
    opens one (within ``connect_timeout`` seconds). `aclose` closes the idle ones.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str] | None = None,
        verify: bool | str | ssl.SSLContext = True,
        connect_timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http(s)://HOST[:PORT], got {base_url!r}")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        #: The path the engine is served under (``https://gpu.lan/v``: ``/v``), before each
        #: request's own.
        self._root = parts.path.rstrip("/")
        self._ssl: ssl.SSLContext | None = ssl_context_for(verify) if self._tls else None
        self.connect_timeout = connect_timeout
        host = parts.netloc.rpartition("@")[2]
        fixed = f"host: {host}\r\ncontent-type: application/json\r\naccept: */*\r\n"
        for name, value in (headers or {}).items():
            fixed += _header_line(name, value)
        #: Every request's header lines but its own (built once: the hot path only appends).
        self._fixed = fixed.encode("latin-1")
        self._idle: list[_Connection] = []
        #: `aclose` was called: a connection given back afterwards is closed, not kept.
        self._closed = False

    async def get(self, path: str) -> tuple[int, bytes]:
        """``GET path``: the answer's status and whole body.

        Raises:
            EngineConnectError: no connection could be opened.
            EngineProtocolError: the connection broke, or the answer is not HTTP/1.1.
        """
        response = await self.post(path, b"", method="GET")
        try:
            return response.status, await response.read()
        finally:
            response.close()

    async def post(
        self,
        path: str,
        body: bytes,
        headers: Iterable[tuple[str, str]] = (),
        *,
        method: str = "POST",
    ) -> EngineResponse:
        """Send ``POST path`` (or ``method``) with the JSON ``body`` and wait for the answer's
        status and headers; return the response, whose body is yet to read. The caller must
        `close` it.

        Raises:
            EngineConnectError: no connection could be opened.
            EngineProtocolError: the connection broke before the answer's headers came, or
                they are not HTTP/1.1.
        """
        head = f"{method} {self._root}{path} HTTP/1.1\r\n".encode("latin-1") + self._fixed
        extra = "".join(_header_line(name, value) for name, value in headers)
        head += f"{extra}content-length: {len(body)}\r\n\r\n".encode("latin-1")
        message = head + body
        while self._idle:
            connection = self._idle.pop()
            if not connection.reusable():
                connection.close()
                continue
            try:
                return await connection.exchange(message, self)
            except _NotSent:
                # The engine closed this idle connection (its keep-alive timeout) as the
                # request went: writing failed, or the engine's side reset it before any
                # answer. It never read the request, so the request goes again on another
                # one. A request the engine may have read is never sent again: it may be
                # generating it (the broken connection is then the engine's failure, which
                # migration handles).
                continue
        connection = await self._connect()
        try:
            return await connection.exchange(message, self)
        except _NotSent as exc:
            raise EngineProtocolError(str(exc)) from None

    async def _connect(self) -> _Connection:
        tcp: trio.SocketStream | None = None
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await trio.open_tcp_stream(self._host, self._port)
                if self._ssl is None:
                    return _Connection(tcp)
                tls = trio.SSLStream(tcp, self._ssl, server_hostname=self._host)
                await tls.do_handshake()
                return _Connection(tls)
        except BaseException as exc:
            # A TLS handshake that failed, timed out or was cancelled leaves the TCP
            # connection open otherwise (until garbage collection).
            if tcp is not None:
                tcp.socket.close()
            if isinstance(exc, trio.TooSlowError):
                raise EngineConnectError(
                    f"no connection within {self.connect_timeout}s to {self._host}:{self._port}"
                ) from None
            if isinstance(exc, OSError | trio.BrokenResourceError | ssl.SSLError):
                raise EngineConnectError(f"{type(exc).__name__}: {exc}") from exc
            raise

    def _release(self, connection: _Connection) -> None:
        if not self._closed and len(self._idle) < MAX_IDLE:
            self._idle.append(connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        """Close every idle connection (those in use close when their response does, even
        if read to their end)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        await trio.lowlevel.checkpoint()


def _header_line(name: str, value: str) -> str:
    # `in` tests, not any() over generators: this runs for every header of every request.
    if (
        "\r" in value
        or "\n" in value
        or "\0" in value
        or "\r" in name
        or "\n" in name
        or "\0" in name
        or ":" in name
        or " " in name
    ):
        raise ValueError(f"header {name!r}: {value!r:.80} cannot go in an HTTP/1.1 header")
    return f"{name}: {value}\r\n"


class _NotSent(EngineProtocolError):
    """The engine cannot have read the request: writing it failed, or the engine reset the
    connection before any byte of an answer (the request reached a socket it had closed; an
    engine that read the request and then closed its socket ends the connection cleanly)."""


def _reset_by_peer(exc: BaseException) -> bool:
    """Whether a read's error is, or was caused by, the engine resetting the connection."""
    # A plain TCP connection is read from its socket (`_Connection._receive_some`), which
    # raises the ConnectionResetError itself; over TLS, trio's SSLStream and the SocketStream
    # under it each wrap it in a BrokenResourceError, so the cause chain is walked.
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionResetError):
            return True
        cause = cause.__cause__
    return False


class _Connection:
    """One connection and its response parser; one exchange at a time."""

    __slots__ = (
        "_body",
        "_complete",
        "_head_bytes",
        "_headers_done",
        "_interim",
        "_keep_alive",
        "_parser",
        "_receive_some",
        "_stream",
        "framed",
        "headers",
        "status",
    )

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream: trio.abc.Stream | None = stream
        # A plain TCP connection is read from its socket: SocketStream.receive_some adds a
        # conflict detector (a context manager) and checks per read, several per request.
        # Its errors are OSErrors, which every read handles as the stream's own.
        self._receive_some = (
            stream.socket.recv if isinstance(stream, trio.SocketStream) else stream.receive_some
        )
        self._reset()

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._headers_done = False
        self._complete = False
        self._keep_alive = False
        #: The answer now parsed is a 1xx (103 Early Hints): the real one follows it.
        self._interim = False
        #: Bytes fed to the parser before the answer's headers were complete.
        self._head_bytes = 0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        #: The body's end is marked (a length or chunked encoding), not the connection's close.
        self.framed = False

    # llhttp's callbacks, during `feed_data`.
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): no body, and the request's
            # own answer follows on the same connection.
            self._interim = True
            self.headers = []
            self.framed = False
            return
        self._headers_done = True
        self.status = status
        # Asked here: once the message is complete llhttp has reset what it knew.
        self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        self._body.append(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True

    def reusable(self) -> bool:
        """Open, and the engine has not closed it while it sat idle (an idle connection has
        nothing to read unless its end arrived)."""
        stream = self._stream
        if stream is None:
            return False
        sock = self._socket()
        if sock is None:
            return True
        return _poll_in(sock) is False

    def readable(self) -> bool:
        """Whether bytes (or the engine's close) wait on the socket, without reading them
        (False when that cannot be told). Under TLS the TCP socket is polled: a task waiting
        in the SSLStream's read waits on it (an SSLStream has no plaintext buffered while its
        reader waits), so this is what wakes that task."""
        sock = self._socket()
        return sock is not None and _poll_in(sock) is True

    def _socket(self) -> Any:
        stream = self._stream
        return getattr(stream, "socket", None) or getattr(
            getattr(stream, "transport_stream", None), "socket", None
        )

    def close(self) -> None:
        # An SSLStream's transport socket is closed without a close_notify exchange.
        sock = self._socket()
        self._stream = None
        if sock is not None:
            sock.close()

    async def exchange(self, message: bytes, owner: EngineConnections) -> EngineResponse:
        """Send ``message`` and read up to the answer's headers (past any 1xx answers).

        Raises:
            _NotSent: writing failed, or the engine reset the connection before any answer.
            EngineProtocolError: the connection broke after the request was written, or
                writing took over `SEND_TIMEOUT`, or the answer is not HTTP/1.1, or its head
                is over `MAX_HEAD_BYTES`.
        """
        stream = self._stream
        assert stream is not None
        self._reset()
        try:
            try:
                if len(message) <= UNTIMED_SEND_BYTES:
                    await stream.send_all(message)
                else:
                    with trio.move_on_after(SEND_TIMEOUT) as sending:
                        await stream.send_all(message)
                    if sending.cancelled_caught:
                        raise EngineProtocolError(
                            f"the engine did not take the request within {SEND_TIMEOUT}s"
                        )
            except (trio.BrokenResourceError, OSError) as exc:
                raise _NotSent(f"sending the request failed: {type(exc).__name__}: {exc}") from exc
            while not self._headers_done:
                try:
                    data = await self._receive_some(READ_SIZE)
                except (trio.BrokenResourceError, OSError) as exc:
                    why = f"the connection broke before the answer: {type(exc).__name__}: {exc}"
                    if not self._head_bytes and _reset_by_peer(exc):
                        raise _NotSent(why) from exc
                    raise EngineProtocolError(why) from exc
                if not data:
                    raise EngineProtocolError(
                        "the engine closed the connection before its answer's headers"
                    )
                self._head_bytes += len(data)
                self._parser.feed_data(data)
                if not self._headers_done and self._head_bytes > MAX_HEAD_BYTES:
                    raise EngineProtocolError(
                        f"the engine's answer has no end of headers within {MAX_HEAD_BYTES} "
                        "bytes (is it an HTTP server, and is its port the right one?)"
                    )
        except httptools.HttpParserError as exc:
            self.close()
            raise EngineProtocolError(f"not an HTTP/1.1 answer: {exc}") from exc
        except BaseException:
            self.close()
            raise
        return EngineResponse(self, owner)

    async def receive(self) -> bytes:
        """The body bytes parsed so far and not yet taken, reading the socket when there are
        none; b"" once the body ended."""
        while True:
            if self._body:
                return self._take_body()
            if self._complete:
                return b""
            if self._stream is None:
                raise EngineProtocolError("the connection is closed")
            try:
                data = await self._receive_some(READ_SIZE)
            except (trio.BrokenResourceError, OSError) as exc:
                self.close()
                raise EngineProtocolError(f"{type(exc).__name__}: {exc}") from exc
            self._parse(data)

    def receive_nowait(self) -> bytes:
        """As `receive`, without waiting: raises `trio.WouldBlock` when no byte of the body
        has arrived (always over TLS, whose records only `receive` reads)."""
        while True:
            if self._body:
                return self._take_body()
            if self._complete:
                return b""
            stream = self._stream
            if stream is None:
                raise EngineProtocolError("the connection is closed")
            if not isinstance(stream, trio.SocketStream):
                raise trio.WouldBlock
            try:
                # The socket is non-blocking (trio's): an empty buffer is BlockingIOError.
                data = os.read(stream.socket.fileno(), READ_SIZE)
            except BlockingIOError:
                raise trio.WouldBlock from None
            except OSError as exc:
                self.close()
                raise EngineProtocolError(f"{type(exc).__name__}: {exc}") from exc
            self._parse(data)

    def _take_body(self) -> bytes:
        body = self._body
        self._body = []
        return body[0] if len(body) == 1 else b"".join(body)

    def _parse(self, data: bytes) -> None:
        """Feed what a read returned to the parser (b"": the engine closed the connection)."""
        if not data:
            self.close()
            if not self.framed:
                self._complete = True  # the body ends with the connection
                return
            raise EngineProtocolError("the engine closed the connection without the body's end")
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.close()
            raise EngineProtocolError(f"the answer's body is not valid HTTP/1.1: {exc}") from exc

    def finished(self) -> bool:
        """The whole answer was read and the connection can carry another request."""
        return self._complete and not self._body and self._keep_alive


def _poll_in(sock: Any) -> bool | None:
    """Whether ``sock`` has something to read (bytes, or its peer's close), without reading
    it; None when the poll failed (a closed descriptor)."""
    # poll, not select: select refuses descriptors from 1024 on, which a busy server has.
    poller = select.poll()
    try:
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return None


class EngineResponse:
    """An engine's answer: ``status``, ``headers`` (lower-cased names), and its body through
    `receive` or `read`. `aclose` gives the connection back when the body was read to its end,
    else closes it (which is how the engine learns that the client went: it aborts the
    request)."""

    __slots__ = ("_connection", "_owner", "status")

    def __init__(self, connection: _Connection, owner: EngineConnections) -> None:
        self._connection: _Connection | None = connection
        self._owner = owner
        self.status = connection.status

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        connection = self._connection
        return connection.headers if connection is not None else []

    async def receive(self) -> bytes:
        """The next piece of the body (every byte already arrived, or waits for some); b"" at
        its end.

        Raises:
            EngineProtocolError: the connection broke or closed before the body's end.
        """
        connection = self._connection
        if connection is None:
            await trio.lowlevel.checkpoint()
            return b""
        return await connection.receive()

    def receive_nowait(self) -> bytes:
        """As `receive`, without waiting (or a checkpoint): raises `trio.WouldBlock` when no
        byte has arrived (always over TLS).

        Raises:
            EngineProtocolError: as `receive`.
        """
        connection = self._connection
        if connection is None:
            return b""
        return connection.receive_nowait()

    async def read(self) -> bytes:
        """The rest of the body, waiting for its end.

        Raises:
            EngineProtocolError: as `receive`.
        """
        parts = []
        while data := await self.receive():
            parts.append(data)
        return b"".join(parts)

    @property
    def complete(self) -> bool:
        connection = self._connection
        return connection is None or connection._complete

    def readable(self) -> bool:
        """Bytes (or the engine's close) have reached the connection and a read would take
        them without waiting: a task waiting in `receive` is woken by them. No I/O."""
        connection = self._connection
        return connection is not None and connection.readable()

    def abort(self) -> None:
        """Close the connection, whatever was read: never given back. No I/O. A task reading
        this response wakes with `trio.ClosedResourceError` (trio's sockets wake their readers
        when closed), or an `EngineProtocolError` if it was about to read."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def close(self) -> None:
        """Give the connection back if the body was read to its end, else close it. No I/O."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if connection._stream is not None and connection.finished():
            self._owner._release(connection)
        else:
            connection.close()
