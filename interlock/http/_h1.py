"""An HTTP/1.1 server for ASGI apps on trio sockets, with llhttp (``httptools``) parsing.

`serve_http` runs ``interlock serve``'s app on it. Hypercorn's trio worker spends most of a
small request in its own machinery (a task per request, several channel and cancel-scope
hops per ASGI message, h11's pure-Python parser): docs/benchmarks.md has the measurements.
Here one task per connection parses with llhttp's C parser and runs the app inline, each
ASGI ``send`` is one socket write, and ``receive`` reads the socket only when the app asks
(a request body, or waiting for the client to go away), so a request spawns no task.

What the app sees is plain ASGI 3 (``spec_version`` 2.1, as Hypercorn reports): the same
``http.request`` / ``http.disconnect`` messages and ``http.response.start`` /
``http.response.body`` semantics. The hardening the frontend had on Hypercorn is kept: a
request head must arrive whole within ``header_timeout`` of its first byte (else 408), a head
over ``max_header_bytes`` gets 431, a client that takes no response bytes for
``write_timeout`` is disconnected, idle keep-alive connections close after
``keep_alive_timeout`` (0: no keep-alive, each connection answers one request), and
shutting down closes idle connections at once and gives busy ones ``graceful_timeout``
(docs/operations.md, "Hostile and slow clients").

Waiting for a next request costs no cancel scope (about 10 µs each on trio, a tenth of the
HTTP work of a small request): one timer task per server, `ServerState.sweep_idle`, closes
the connections idle past their deadline.
"""

from __future__ import annotations

import logging
import os
import select
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from time import time
from typing import Any, Final
from urllib.parse import unquote

import httptools
import trio

from ._errors import HttpError

_logger = logging.getLogger("interlock.http")

#: Bytes asked of the socket per read (Hypercorn's ``MAX_RECV``).
_READ_SIZE: Final = 2**16
#: Pipelined requests read ahead of the one being served, in bytes: past this the server
#: stops reading until the response is complete (a client cannot queue unbounded work).
_READ_AHEAD: Final = 2**16
_REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}
_ASGI: Final = {"version": "3.0", "spec_version": "2.1"}
_DISCONNECT: Final = {"type": "http.disconnect"}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
#: How an HTTP/2 client with prior knowledge (h2c) opens a connection (RFC 9113 3.4).
_H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

#: The scope extension whose value, called, returns the request's whole body when all of it
#: has arrived and none of it was received yet, else None (then the app calls ``receive``):
#: an app reads an ordinary request's body without the cancel scope that bounds its wait.
BODY_NOWAIT: Final = "interlock.body_nowait"


class _Date:
    """The ``Date`` header line, formatted at most once a second."""

    second = -1
    line = b""

    @classmethod
    def header(cls) -> bytes:
        now = int(time())
        if now != cls.second:
            cls.second = now
            cls.line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return cls.line


class _Request:
    """A request whose head was parsed: its scope, and its body as it arrives."""

    __slots__ = ("body", "complete", "continue_", "keep_alive", "received", "scope")

    def __init__(self, scope: dict[str, Any], keep_alive: bool, continue_: bool) -> None:
        self.scope = scope
        self.keep_alive = keep_alive
        #: The client waits for ``100 Continue`` before it sends the body.
        self.continue_ = continue_
        self.body: list[bytes] = []
        #: The whole body was parsed.
        self.complete = False
        #: ``receive`` handed the app some of the body: `BODY_NOWAIT` no longer applies.
        self.received = False


class ServerState:
    """What the connections of one server share: its settings and its shutdown."""

    def __init__(
        self,
        app: App,
        *,
        lifespan_state: dict[str, Any],
        keep_alive_timeout: float,
        header_timeout: float,
        write_timeout: float,
        max_header_bytes: int,
        h2: Callable[[Any], Awaitable[None]] | None = None,
    ) -> None:
        self.app = app
        #: Serves a connection that opened with the HTTP/2 preface, given a stream that
        #: replays the bytes read so far (None: such a connection gets a 400).
        self.h2 = h2
        self.lifespan_state = lifespan_state
        self.keep_alive_timeout = keep_alive_timeout
        self.header_timeout = header_timeout
        self.write_timeout = write_timeout
        self.max_header_bytes = max_header_bytes
        #: Shutting down: idle connections close, busy ones after their response.
        self.closing = False
        #: The connections waiting for a next request, each with when it started to wait, in
        #: that order (a connection that waits again goes to the end): the first is the next
        #: to time out. Ordered, not a plain dict: a dict used as a queue scans the holes its
        #: deletions leave at the front on every look at the first entry (many connections
        #: due together cost O(N^2)). Without keep-alive, the connections waiting for their
        #: first request (untimed here: only `close_idle` looks at them).
        self.idle: OrderedDict[Connection, float] = OrderedDict()

    def close_idle(self) -> None:
        """Start shutting down: close every idle connection now, the others once their
        response is sent."""
        self.closing = True
        for connection in list(self.idle):
            connection.close()

    async def sweep_idle(self) -> None:
        """Close each connection that waited ``keep_alive_timeout`` for a next request, when
        its time is up; runs until cancelled (the server runs it beside its listeners, and a
        `ServerState` without it closes no idle connection).

        One timer for every connection instead of a cancel scope per wait: it sleeps until
        the first idle connection's deadline, or for a whole timeout while none waits (one
        that starts waiting meanwhile is due later than that).

        A connection whose socket is readable when its time is up is left to its own task:
        the request (or close) arrived before this pass noticed the deadline, and the
        connection's poll fired or fires at the next one (a cancel scope per wait served it
        too). No other task reads that socket, and this one runs to the end of the pass
        without a checkpoint, so what the check sees is what the connection reads."""
        timeout = self.keep_alive_timeout
        if timeout <= 0:
            return  # no connection waits for a next request: nothing to time
        idle = self.idle
        poll = select.poll()
        while True:
            now = trio.current_time()
            wake = now + timeout
            while idle:
                connection, since = next(iter(idle.items()))
                if since + timeout > now:
                    wake = since + timeout
                    break
                del idle[connection]
                if not connection.closed and not _readable(poll, connection._fd):
                    connection.close()
            await trio.sleep_until(wake)

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection until it closes (`trio.serve_listeners`'s handler)."""
        connection = Connection(self, stream)
        try:
            await connection.run()
        except Exception:
            # A bug in this module: this connection ends, the server goes on.
            _logger.exception("HTTP connection failed")
        finally:
            self.idle.pop(connection, None)
            connection.close()


class _ParseError(Exception):
    """The request cannot be parsed: the connection answers ``status`` and closes."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Connection:
    """One client connection: the llhttp parser's callbacks, the request loop, and the
    ASGI ``receive``/``send`` of the request being served."""

    def __init__(self, server: ServerState, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        #: Requests parsed and not yet served, the first being served now.
        self.queue: deque[_Request] = deque()
        self.read_ahead = 0
        self.error: _ParseError | None = None
        self._parsing: _Request | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        #: Bytes of the incomplete request head fed to the parser before this feed: the whole
        #: of each read after the one it began in; of that one, only the head's own bytes
        #: (-1 while that read is fed, if the head began partway through it).
        self._head_fed = 0
        #: The parser is between requests, no byte of the next one fed: a request that begins
        #: in this feed begins at its first byte (set by `_feed`, cleared by the first begin).
        self._fresh = True
        #: The length of the bytes being fed now.
        self._feeding = 0
        #: A request head is partly received (since ``_head_started``; -1 until the feed it
        #: began in ends: only a head still incomplete then needs the clock).
        self._in_head = False
        self._head_started = 0.0
        self._read_scope: trio.CancelScope | None = None
        #: Without keep-alive (``keep_alive_timeout <= 0``), when the connection's one request
        #: must have begun to arrive: it is bounded by ``header_timeout``, as a head is.
        self._first_by = (
            trio.current_time() + server.header_timeout if server.keep_alive_timeout <= 0 else 0.0
        )
        #: The connection's first bytes while they may still be the HTTP/2 preface.
        self._opening: bytes | None = b"" if server.h2 is not None else None
        self._socket = stream.socket
        self._fd = stream.socket.fileno()
        #: A write is waiting for room in the socket's buffer (`send_all` has the socket).
        self._writing = False
        #: As Hypercorn: each connection gets its own copy of the lifespan state.
        self._state = server.lifespan_state.copy()
        socket = stream.socket
        try:
            self._client: tuple[str, int] | None = socket.getpeername()[:2]
            self._server: tuple[str, int] | None = socket.getsockname()[:2]
        except OSError:
            self._client = self._server = None
        # The response being sent.
        self._request: _Request | None = None
        self._head: bytes | None = None
        self._chunked = False
        self._started = False
        self._done = False
        self._keep_alive = False
        self._suppress_body = False
        self._body_done = False

    # -- llhttp callbacks (during `_feed`) ----------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_started = -1.0
        self._url = b""
        self._headers = []
        # A head after pipelined requests in the same read must not count their bytes.
        self._head_fed = 0 if self._fresh else -1
        self._fresh = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        limit = self.server.max_header_bytes
        # The head is within the bytes fed since it began: only when those are over the
        # limit is its size worth adding up (not a header at a time, on every request).
        if self._head_fed + self._feeding > limit and _head_size(self._url, self._headers) > limit:
            raise _head_too_large(limit)
        parser = self.parser
        url = self._url
        raw_path, _, query = url.partition(b"?")
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        headers = self._headers
        continue_ = False
        for name, value in headers:
            if name == b"expect" and value.lower() == b"100-continue":
                continue_ = True
        extensions: dict[str, Any] = {}
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": parser.get_http_version(),
            "method": parser.get_method().decode("ascii"),
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": self._client,
            "server": self._server,
            "state": self._state,
            "extensions": extensions,
        }
        request = _Request(scope, parser.should_keep_alive(), continue_)
        # Bound to this request: a stale scope must never read a pipelined request's body.
        extensions[BODY_NOWAIT] = partial(self._body_nowait, request)
        self._parsing = request
        self.queue.append(request)

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is not None:
            request.body.append(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        if request is not None:
            request.complete = True
            self._parsing = None

    # -- reading --------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Parse ``data``; a request that cannot be parsed stops parsing (``self.error``)."""
        if self.error is not None:
            return
        self._feeding = len(data)
        self._fresh = not self._in_head and self._parsing is None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol switch here (not even h2c): the request is served as HTTP/1.1 and
            # the connection closed after it, since what follows is not HTTP/1.1.
            if self._parsing is not None:
                self._parsing.complete = True
                self._parsing.keep_alive = False
                self._parsing = None
            self.error = _ParseError(400, "", "")
            return
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            self.error = (
                cause
                if isinstance(cause, _ParseError)
                else _ParseError(400, f"the request is not valid HTTP/1.1 ({error})", "bad_request")
            )
            return
        except httptools.HttpParserError as error:
            self.error = _ParseError(
                400, f"the request is not valid HTTP/1.1 ({error})", "bad_request"
            )
            return
        if self._in_head:
            if self._head_started < 0:
                self._head_started = trio.current_time()
            # llhttp has no limit on a head; h11 had (and Hypercorn answered 431). Its raw
            # bytes count; where it began partway through this read (after pipelined
            # requests), only what llhttp parsed of it so far (a header still incomplete is
            # counted with the next read, which counts whole).
            if self._head_fed < 0:
                self._head_fed = _head_size(self._url, self._headers)
            else:
                self._head_fed += len(data)
            if self._head_fed > self.server.max_header_bytes:
                self.error = _head_too_large(self.server.max_header_bytes)

    async def _next_request(self) -> _Request | None:
        """Read until a request's head is complete; None when the connection should close
        (the client closed it or sent garbage, a timeout, or the server shuts down)."""
        server = self.server
        stream = self.stream
        while not self.queue:
            if self.error is not None:
                if self.error.code:
                    await self._refuse(self.error.status, self.error.code, str(self.error))
                return None
            if self._in_head:
                deadline = self._head_started + server.header_timeout
                try:
                    with trio.fail_at(deadline):
                        data = await stream.receive_some(_READ_SIZE)
                except trio.TooSlowError:
                    await self._refuse(
                        408,
                        "request_timeout",
                        f"the request headers did not arrive within {server.header_timeout:g} "
                        "s of their first byte; send the whole request at once",
                    )
                    return None
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
            elif server.keep_alive_timeout <= 0:
                # No keep-alive: the connection's one request is read (its wait bounded as a
                # head's is, with no idle timer), answered with `connection: close` (`_start`),
                # and the connection closed after it (`run`).
                if server.closing:
                    return None
                data = b""  # if it times out
                # In `idle` only for `close_idle` to close at shutdown (no sweeper runs).
                server.idle[self] = 0.0
                try:
                    with trio.move_on_at(self._first_by):
                        data = await stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                finally:
                    server.idle.pop(self, None)
            else:
                if server.closing:
                    return None
                # Idle: `ServerState.sweep_idle` closes the socket when the time is up, which
                # wakes this wait with ClosedResourceError. The socket is read directly when
                # the poll says so, not tried first (the last response was just written: the
                # next request is rarely there yet) and without the wrappers of trio's socket.
                idle = server.idle
                idle[self] = trio.current_time()
                try:
                    await trio.lowlevel.wait_readable(self._socket)
                    if self.closed:
                        # Timed out between the poll and this task's turn: its descriptor's
                        # number may belong to a new connection already.
                        return None
                    data = os.read(self._fd, _READ_SIZE)
                except BlockingIOError:
                    continue  # woken with nothing to read after all: wait again
                except (trio.ClosedResourceError, OSError):
                    return None
                finally:
                    idle.pop(self, None)
            if not data:
                return None
            if self._opening is not None:
                opening = self._opening + data
                if _H2_PREFACE.startswith(opening[: len(_H2_PREFACE)]):
                    if len(opening) < len(_H2_PREFACE):
                        self._opening = opening
                        continue
                    assert server.h2 is not None
                    await server.h2(_Replay(stream, opening))
                    return None
                self._opening = None
                data = opening
            self._feed(data)
        return self.queue[0]

    async def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer a request that could not be parsed (or arrive); the caller closes."""
        body = HttpError(status, message, code=code).body()
        await self._write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n%s\r\n%s"
            % (status, _REASONS.get(status, b""), len(body), _Date.header(), body)
        )

    # -- the request loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve requests until the connection closes."""
        while not self.closed:
            request = await self._next_request()
            if request is None:
                return
            self.read_ahead = 0
            self._request = request
            self._head = None
            self._chunked = self._started = self._done = self._body_done = False
            self._keep_alive = request.keep_alive
            self._suppress_body = request.scope["method"] == "HEAD"
            try:
                await self.server.app(request.scope, self.receive, self.send)
            except Exception:
                _logger.exception("error in ASGI app")
                if not self._started and not self.closed:
                    await self._internal_error()
                self._keep_alive = False
            else:
                if not self._done and not self.closed:
                    if not self._started:
                        # As Hypercorn: an app that returns without answering is a 500.
                        await self._internal_error()
                    # A response left unfinished cannot be framed any more.
                    self._keep_alive = False
            finally:
                self._request = None
                if self._read_scope is not None:
                    self._read_scope.cancel()
            self.queue.popleft()
            if not self._keep_alive or not request.complete or self.server.closing:
                # A body the app did not read would have to be read and thrown away first:
                # closing is cheaper, and the client knows to retry on a new connection.
                return

    async def _internal_error(self) -> None:
        body = HttpError(500, "internal server error", type="server_error", code=None).body()
        self._keep_alive = False
        self._started = True
        self._done = True
        await self._write(
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n%s\r\n%s"
            % (len(body), _Date.header(), body)
        )

    # -- ASGI receive ---------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        """The ASGI ``receive`` of the request being served: its body, then (waiting until
        the client closes the connection or the response is complete) ``http.disconnect``."""
        request = self._request
        if request is None or self.closed:
            return _DISCONNECT
        while True:
            if request.body:
                body = request.body
                data = body[0] if len(body) == 1 else b"".join(body)
                body.clear()
                request.received = True
                self._body_done = request.complete
                return {"type": "http.request", "body": data, "more_body": not request.complete}
            if request.complete:
                if not self._body_done:
                    self._body_done = request.received = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                return await self._wait_disconnect()
            if self.error is not None:
                # The body could not be parsed: to the app, the client is gone.
                self._keep_alive = False
                return _DISCONNECT
            if request.continue_:
                request.continue_ = False
                if not self._started:
                    await self._write(_CONTINUE)
                    if self.closed:
                        return _DISCONNECT
            try:
                data = await self.stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.close()
                return _DISCONNECT
            self._feed(data)

    def _body_nowait(self, request: _Request) -> bytes | None:
        """The `BODY_NOWAIT` extension of ``request``: its whole body, or None unless it is
        the request being served, its whole body was parsed, and ``receive`` handed out none
        of it yet (then the app must read the body with ``receive``)."""
        if (
            request is not self._request
            or self.closed
            or not request.complete
            or request.received
            or self._body_done
        ):
            return None
        body = request.body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._body_done = request.received = True
        return data

    async def _wait_disconnect(self) -> dict[str, Any]:
        """Wait until the client goes away or the response is complete: ``http.disconnect``.
        Reads (and parses) what the client pipelines meanwhile, up to `_READ_AHEAD`."""
        if self._done:
            return _DISCONNECT
        with trio.CancelScope() as scope:
            self._read_scope = scope
            try:
                while not self._done and not self.closed:
                    if self.read_ahead > _READ_AHEAD or self.error is not None:
                        await trio.sleep_forever()
                    try:
                        data = await self.stream.receive_some(_READ_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        self.close()
                        break
                    self.read_ahead += len(data)
                    self._feed(data)
            finally:
                self._read_scope = None
        return _DISCONNECT

    # -- ASGI send ------------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        """The ASGI ``send`` of the request being served: one socket write per body message
        (the head goes with the first body when its length is known). Sends after the
        client went away are dropped, as Hypercorn does.

        Raises:
            RuntimeError: the messages are out of order, or a header has a line break (an
                app bug).
        """
        kind = message["type"]
        if kind == "http.response.body":
            if not self._started or self._done:
                raise RuntimeError(f"ASGI {kind} {'after the end' if self._done else 'first'}")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if not more:
                self._done = True
            if self.closed:
                return
            if self._suppress_body:
                data = b""
            elif self._chunked:
                if body:
                    data = b"%x\r\n%s\r\n" % (len(body), body)
                    if not more:
                        data += _LAST_CHUNK
                else:
                    data = b"" if more else _LAST_CHUNK
            else:
                data = bytes(body)
            head = self._head
            if head is not None:
                self._head = None
                data = head + data
            if data:
                # The last bytes of a response with no pipelined request behind it: the next
                # step reads the socket (a checkpoint). With one already parsed, the next
                # request would be served without one: the write checkpoints.
                await self._write(data, last=not more and len(self.queue) <= 1)
            if not more and self._read_scope is not None:
                self._read_scope.cancel()
        elif kind == "http.response.start":
            if self._started:
                raise RuntimeError("ASGI http.response.start sent twice")
            self._start(message)
            self._started = True
            if self._chunked and self._head is not None:
                # A stream's head goes at once: its first body may be a while.
                head = self._head
                self._head = None
                await self._write(head)
        else:
            raise RuntimeError(f"unexpected ASGI message type {kind!r}")

    def _start(self, message: dict[str, Any]) -> None:
        """Frame the response head of ``message`` (http.response.start) into ``_head``."""
        status: int = message["status"]
        request = self._request
        assert request is not None
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
        framed = False
        server = self.server
        close = not self._keep_alive or server.closing or server.keep_alive_timeout <= 0
        said_close = False
        for name, value in message.get("headers", ()):
            lower = bytes(name).lower()
            if lower == b"content-length" or lower == b"transfer-encoding":
                framed = True
            elif lower == b"connection" and b"close" in bytes(value).lower():
                close = said_close = True
            line = b"%s: %s\r\n" % (name, value)
            if line.count(b"\n") != 1 or line.count(b"\r") != 1:
                # As h11 refuses it: a line break in a header would let a value the app
                # copied from a request inject headers (or a whole response).
                raise RuntimeError(f"ASGI response header {bytes(name)!r} has a line break")
            lines.append(line)
        if not framed and status >= 200 and status not in (204, 304):
            if self._suppress_body:
                pass
            elif request.scope["http_version"] == "1.1":
                self._chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                # HTTP/1.0 has no chunks: the body ends where the connection does.
                close = True
        if close:
            if not said_close:
                lines.append(b"connection: close\r\n")
            self._keep_alive = False
        elif request.scope["http_version"] == "1.0":
            lines.append(b"connection: keep-alive\r\n")
        lines.append(_Date.header())
        lines.append(b"\r\n")
        self._head = b"".join(lines)

    async def _write(self, data: bytes, *, last: bool = False) -> None:
        """Write ``data`` whole, or close the connection: the client went away, or took none
        of it for ``write_timeout`` seconds (then ``receive`` says the client is gone).

        ``last``: the response's last bytes, and the connection's next step reads the socket.
        When the socket takes them at once, there is no checkpoint here: that read is one (a
        trip through the scheduler less per request)."""
        if self.closed:
            return
        if not self._writing:
            # The common case, a socket buffer with room: one write(2), no cancel scope and
            # none of `send_all`'s machinery (half the CPU of a streamed chunk).
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return
            if sent == len(data):
                if not last:
                    # A checkpoint, as any send is; not a cancellation point: the data went.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
            data = memoryview(data)[sent:]
        # Shielded, as Hypercorn does: a write cut in the middle would corrupt the framing.
        # Bounded: a client that stops reading would otherwise hold the task forever.
        self._writing = True
        try:
            with trio.CancelScope(
                shield=True, deadline=trio.current_time() + self.server.write_timeout
            ):
                try:
                    await self.stream.send_all(data)
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        finally:
            self._writing = False
        self.close()

    def close(self) -> None:
        """Close the socket now (a reader waiting on it wakes up with nothing)."""
        if not self.closed:
            self.closed = True
            self._keep_alive = False
            self.stream.socket.close()
            if self._read_scope is not None:
                self._read_scope.cancel()


class _Replay:
    """A connection's stream with the bytes already read from it put back in front (for
    the HTTP/2 server, which reads the connection from its start)."""

    def __init__(self, stream: trio.SocketStream, data: bytes) -> None:
        self.stream = stream
        self.socket = stream.socket
        self._data = data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._data:
            data, self._data = self._data, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


def _readable(poll: select.poll, fd: int) -> bool:
    """Whether ``fd`` has something to read now (bytes, an end, or an error), without
    waiting; ``poll`` is reused with nothing registered between calls."""
    poll.register(fd, select.POLLIN)
    try:
        return bool(poll.poll(0))
    finally:
        poll.unregister(fd)


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """A request head's size as the 431 limit counts it (about what h11 counted)."""
    return len(url) + 16 + sum(len(name) + len(value) + 4 for name, value in headers)


def _head_too_large(limit: int) -> _ParseError:
    return _ParseError(
        431,
        f"the request line and headers are larger than {limit} bytes; send fewer or "
        "shorter headers",
        "headers_too_large",
    )
