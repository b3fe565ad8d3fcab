"""The HTTP/1.1 server under the app (`serve_http`, interlock/http/_h1.py): framing, keep-alive,
pipelining, ``Expect: 100-continue``, HEAD, HTTP/1.0, errors and shutdown, over real sockets.

Where Hypercorn (``server="hypercorn"``) has the same behaviour, a test runs on both: what a
client sees must not change with the server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import h11
import httpx
import pytest
import trio
from helpers import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from interlock.http import serve_http
from interlock.http._h1 import _READ_AHEAD, BODY_NOWAIT, Connection, ServerState

Scope = dict[str, Any]
App = Callable[[Scope, Any, Any], Awaitable[None]]
BOTH = pytest.mark.parametrize("server", ["h1", "hypercorn"])


async def echo(scope: Scope, receive: Any, send: Any) -> None:
    """Answers the request's method, path, query and body as JSON; ``/stream`` answers five
    chunks without a Content-Length; ``/fail`` raises before answering, ``/fail-late`` after
    the first chunk."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    path = scope["path"]
    if path == "/fail":
        raise RuntimeError("a bug in the app")
    if path in ("/stream", "/fail-late"):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for index in range(5):
            await send({"type": "http.response.body", "body": b"%d;" % index, "more_body": True})
            if path == "/fail-late":
                raise RuntimeError("a bug in the app, mid-stream")
        await send({"type": "http.response.body", "body": b"end"})
        return
    answer = json.dumps(
        {
            "method": scope["method"],
            "path": path,
            "query": scope["query_string"].decode(),
            "body": body.decode(),
            "version": scope["http_version"],
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@asynccontextmanager
async def serving(
    app: App = echo, server: str = "h1", **options: Any
) -> AsyncIterator[tuple[tuple[str, int], trio.Event]]:
    """``app`` served on a free port; yields its address and the event that shuts it down."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            lambda task_status: serve_http(
                app,
                "127.0.0.1",
                0,
                server=server,
                shutdown_trigger=stop.wait,
                task_status=task_status,
                **options,
            )
        )
        host, port = url.removeprefix("http://").rsplit(":", 1)
        yield (host, int(port)), stop
        stop.set()


class Client:
    """Raw bytes out, responses parsed by h11 (an independent parser) in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def response(self, method: bytes = b"POST") -> tuple[int, dict[bytes, bytes], bytes]:
        """The next response (to a request with ``method``): status, headers, body."""
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        # h11 tracks the request it answers; the bytes went out raw already.
        self.h11.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        self.h11.send(h11.EndOfMessage())
        status = 0
        headers: dict[bytes, bytes] = {}
        body = b""
        with trio.fail_after(30):
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    self.h11.receive_data(await self.stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status, headers = event.status_code, dict(event.headers)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, headers, body

    async def closed(self) -> bool:
        """The server closed the connection (after what was read)."""
        with trio.fail_after(30):
            return await self.stream.receive_some(65536) == b""


@asynccontextmanager
async def client(address: tuple[str, int]) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        yield Client(stream)


def post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n%s\r\n%s" % (
        path,
        len(body),
        extra,
        body,
    )


def chunked(path: bytes, *chunks: bytes) -> bytes:
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c)
    return b"POST %s HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n%s0\r\n\r\n" % (
        path,
        framed,
    )


# -- framing and keep-alive -------------------------------------------------------------------


@BOTH
async def test_pipelined_requests_are_answered_in_order_on_one_connection(server: str) -> None:
    async with serving(server=server) as (address, _), client(address) as c:
        await c.stream.send_all(
            b"GET /a?x=1 HTTP/1.1\r\nhost: x\r\n\r\n"
            + post(b"/b%20c", b'{"n": 2}')
            + chunked(b"/d", b"chunked ", b"body")
        )
        answers = [json.loads((await c.response(m))[2]) for m in (b"GET", b"POST", b"POST")]
    assert [(a["method"], a["path"], a["query"], a["body"]) for a in answers] == [
        ("GET", "/a", "x=1", ""),
        ("POST", "/b c", "", '{"n": 2}'),
        ("POST", "/d", "", "chunked body"),
    ]


@BOTH
async def test_a_stream_is_chunked_and_the_connection_carries_on(server: str) -> None:
    async with serving(server=server) as (address, _), client(address) as c:
        await c.stream.send_all(post(b"/stream", b"") + post(b"/x", b"after"))
        status, headers, body = await c.response()
        assert (status, headers[b"transfer-encoding"], body) == (200, b"chunked", b"0;1;2;3;4;end")
        assert json.loads((await c.response())[2])["body"] == "after"


@BOTH
async def test_head_gets_the_headers_without_the_body(server: str) -> None:
    async with serving(server=server) as (address, _), client(address) as c:
        await c.stream.send_all(b"HEAD /h HTTP/1.1\r\nhost: x\r\n\r\n" + post(b"/x", b"next"))
        status, headers, body = await c.response(b"HEAD")
        assert status == 200 and int(headers[b"content-length"]) > 0 and body == b""
        assert json.loads((await c.response())[2])["body"] == "next"


@BOTH
async def test_http_1_0_gets_no_chunks_and_a_closed_connection(server: str) -> None:
    async with serving(server=server) as (address, _), client(address) as c:
        await c.stream.send_all(b"POST /stream HTTP/1.0\r\ncontent-length: 0\r\n\r\n")
        received = b""
        with trio.fail_after(30):
            while chunk := await c.stream.receive_some(65536):
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0]
    assert b"transfer-encoding" not in head.lower() and body == b"0;1;2;3;4;end"


@BOTH
async def test_expect_100_continue_is_answered_when_the_app_reads_the_body(server: str) -> None:
    async with serving(server=server) as (address, _), client(address) as c:
        await c.stream.send_all(
            b"POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n"
        )
        interim = b""
        with trio.fail_after(30):
            while b"\r\n\r\n" not in interim:
                interim += await c.stream.receive_some(65536)
        assert interim.startswith(b"HTTP/1.1 100 ")
        assert interim.endswith(b"\r\n\r\n")  # nothing else before the body is sent
        await c.stream.send_all(b"body")
        assert json.loads((await c.response())[2])["body"] == "body"


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async with serving(keep_alive_timeout=0.2) as (address, _), client(address) as c:
        await c.stream.send_all(post(b"/x", b""))
        assert (await c.response())[0] == 200
        assert await c.closed()


async def test_each_idle_connection_closes_at_its_own_keep_alive_deadline(
    autojump_clock: object,
) -> None:
    """The server's one idle timer closes a connection ``keep_alive_timeout`` after its last
    response (not after the first request, nor while its app runs), each at its own time."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await trio.sleep(25)
        await echo(scope, receive, send)

    server = ServerState(
        app,
        lifespan_state={},
        keep_alive_timeout=10,
        header_timeout=60,
        write_timeout=60,
        max_header_bytes=16384,
    )
    start = trio.current_time()
    closed_at: dict[str, float] = {}

    async def connect(name: str, after: float, *paths: bytes) -> None:
        ours, theirs = trio.socket.socketpair()
        c = Client(trio.SocketStream(theirs))
        nursery.start_soon(server.handle, trio.SocketStream(ours))
        for path in paths:
            await trio.sleep_until(start + after)
            await c.stream.send_all(post(path, b""))
            assert (await c.response())[0] == 200
            after += 6
        with trio.fail_after(100):
            assert await c.stream.receive_some(65536) == b""
        closed_at[name] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.sweep_idle)
        async with trio.open_nursery() as clients:
            clients.start_soon(connect, "once", 0, b"/a")
            clients.start_soon(connect, "twice", 0, b"/a", b"/b")  # at 0 and 6
            clients.start_soon(connect, "slow", 3, b"/slow")  # answered at 28
        nursery.cancel_scope.cancel()
    assert closed_at == {"once": 10, "twice": 16, "slow": 38}
    assert not server.idle


async def test_many_idle_connections_due_together_each_close_at_their_deadline(
    autojump_clock: object,
) -> None:
    """Hundreds of connections answered at the same instants (one group at 0, one at 4, half
    of the first group asking again at 9) all time out at their own deadlines, none later and
    none early, and leave no idle entry (the sweeper's queue after many deletions)."""
    server = _server_state(echo, keep_alive_timeout=10)
    start = trio.current_time()
    closed_at: list[tuple[int, float]] = []

    async def connect(index: int, *times: float) -> None:
        ours, theirs = trio.socket.socketpair()
        c = Client(trio.SocketStream(theirs))
        nursery.start_soon(server.handle, trio.SocketStream(ours))
        for at in times:
            await trio.sleep_until(start + at)
            await c.stream.send_all(post(b"/a", b""))
            assert (await c.response())[0] == 200
        with trio.fail_after(100):
            assert await c.stream.receive_some(65536) == b""
        closed_at.append((index, trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.sweep_idle)
        async with trio.open_nursery() as clients:
            for index in range(300):
                times = (0.0, 9.0) if index % 2 else (0.0,)
                clients.start_soon(connect, index, *times if index < 200 else (4.0,))
        nursery.cancel_scope.cancel()
    expected = {i: 14.0 if i >= 200 else 19.0 if i % 2 else 10.0 for i in range(300)}
    assert dict(closed_at) == expected
    assert not server.idle


async def test_without_keep_alive_each_request_is_answered_and_its_connection_closed(
    autojump_clock: object,
) -> None:
    """``keep_alive_timeout=0`` means no keep-alive (nginx's ``keepalive_timeout 0``): each
    connection's first request is answered with ``connection: close`` and the connection
    closed after it (a request pipelined behind it is not served); a connection that sends
    nothing closes after ``header_timeout``; and there is no idle timer."""
    server = _server_state(echo, keep_alive_timeout=0)
    sweep = server.sweep_idle()
    try:
        with pytest.raises(StopIteration):
            sweep.send(None)  # returns before it would wait: a timer of 0 s would spin
    finally:
        sweep.close()
    async with trio.open_nursery() as nursery:
        ours, theirs = trio.socket.socketpair()
        c = Client(trio.SocketStream(theirs))
        nursery.start_soon(server.handle, trio.SocketStream(ours))
        await c.stream.send_all(post(b"/a", b"one") + post(b"/b", b"two"))
        status, headers, body = await c.response()
        assert (status, headers.get(b"connection")) == (200, b"close")
        assert json.loads(body)["path"] == "/a"
        try:
            assert await c.closed()
        except trio.BrokenResourceError:
            pass  # closed with /b unread: a reset is a close too

        ours, theirs = trio.socket.socketpair()
        c = Client(trio.SocketStream(theirs))
        nursery.start_soon(server.handle, trio.SocketStream(ours))
        before = trio.current_time()
        with trio.fail_after(100):
            assert await c.stream.receive_some(65536) == b""
        assert trio.current_time() - before == 60  # header_timeout

        # Shutting down closes a connection still waiting for its request at once.
        ours, theirs = trio.socket.socketpair()
        c = Client(trio.SocketStream(theirs))
        nursery.start_soon(server.handle, trio.SocketStream(ours))
        await trio.sleep(1)
        before = trio.current_time()
        server.close_idle()
        with trio.fail_after(100):
            assert await c.stream.receive_some(65536) == b""
        assert trio.current_time() == before
    assert not server.idle


@BOTH
async def test_cleartext_http2_with_prior_knowledge_is_served(server: str) -> None:
    async with (
        serving(server=server) as ((host, port), _),
        httpx.AsyncClient(http1=False, http2=True, base_url=f"http://{host}:{port}") as c,
    ):
        answers = [await c.post("/h2", content=b"x" * n) for n in (0, 10, 100_000)]
    assert {a.http_version for a in answers} == {"HTTP/2"}
    assert [len(a.json()["body"]) for a in answers] == [0, 10, 100_000]


# -- errors -----------------------------------------------------------------------------------


async def test_an_app_error_before_the_answer_is_an_openai_style_500() -> None:
    async with serving() as (address, _), client(address) as c:
        await c.stream.send_all(post(b"/fail", b""))
        status, headers, body = await c.response()
        assert status == 500 and headers[b"connection"] == b"close"
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert await c.closed()


@BOTH
async def test_an_app_error_mid_stream_cuts_the_connection_without_the_last_chunk(
    server: str,
) -> None:
    async with serving(server=server) as (address, _), client(address) as c:
        await c.stream.send_all(post(b"/fail-late", b""))
        # The connection closes before the terminating chunk: the client knows.
        with pytest.raises(h11.RemoteProtocolError, match="incomplete chunked read"):
            await c.response()


async def test_a_request_that_is_not_http_gets_an_openai_style_400() -> None:
    async with serving() as (address, _), client(address) as c:
        await c.stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, body = await c.response()
        assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"
        assert await c.closed()


async def test_a_body_the_app_did_not_read_closes_the_connection_after_the_answer() -> None:
    async def refuse(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await echo(scope, receive, send)
        else:
            headers = [(b"content-length", b"2")]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": b"no"})

    async with serving(refuse) as (address, _), client(address) as c:
        await c.stream.send_all(
            b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\npartial"
        )
        assert (await c.response())[:3:2] == (413, b"no")
        assert await c.closed()


async def test_a_response_header_with_a_line_break_is_never_sent() -> None:
    async def inject(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await echo(scope, receive, send)
            return
        value = b"x\r\nset-cookie: stolen=1"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-id", value)]})
        await send({"type": "http.response.body", "body": b""})

    async with serving(inject) as (address, _), client(address) as c:
        await c.stream.send_all(post(b"/x", b""))
        status, headers, _ = await c.response()
    assert status == 500 and b"set-cookie" not in headers


# -- the client going away, and shutting down -------------------------------------------------


async def test_a_client_that_closes_mid_response_is_an_http_disconnect() -> None:
    received: list[str] = []
    started = trio.Event()

    async def stream_forever(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await echo(scope, receive, send)
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        started.set()
        received.append((await receive())["type"])

    async with serving(stream_forever, server="h1") as (address, _), client(address) as c:
        await c.stream.send_all(post(b"/x", b""))
        await started.wait()
        await c.stream.aclose()
        await wait_until(lambda: received == ["http.disconnect"], within=30)


async def test_shutting_down_closes_idle_connections_and_lets_a_busy_one_finish() -> None:
    release = trio.Event()
    started = trio.Event()

    async def slow(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await echo(scope, receive, send)
            return
        await receive()
        if scope["path"] == "/slow":
            started.set()
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    async with (
        serving(slow, graceful_timeout=30) as (address, stop),
        client(address) as idle,
        client(address) as busy,
    ):
        await idle.stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await idle.response(b"GET"))[::2] == (200, b"done")
        await busy.stream.send_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        await started.wait()
        stop.set()
        assert await idle.closed()
        release.set()
        status, headers, body = await busy.response(b"GET")
        assert (status, headers[b"connection"], body) == (200, b"close", b"done")
        assert await busy.closed()


async def test_pipelining_during_a_long_answer_is_read_only_so_far_ahead() -> None:
    release = trio.Event()

    async def long_answer(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/long":
            await send({"type": "http.response.body", "body": b"wait", "more_body": True})
            async with trio.open_nursery() as nursery:
                # Waiting for the client to go away reads what it sends meanwhile.
                nursery.start_soon(receive)
                await release.wait()
                nursery.cancel_scope.cancel()
        await send({"type": "http.response.body", "body": b"ok"})

    server = _server_state(long_answer)
    ours, theirs = trio.socket.socketpair()
    connection = Connection(server, trio.SocketStream(ours))
    request = b"GET /short HTTP/1.1\r\nhost: x\r\n\r\n"
    count = 2 * _READ_AHEAD // len(request) + 100
    c = Client(trio.SocketStream(theirs))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await c.stream.send_all(b"GET /long HTTP/1.1\r\nhost: x\r\n\r\n")
        nursery.start_soon(c.stream.send_all, request * count)
        await wait_until(lambda: connection.read_ahead > _READ_AHEAD, within=30)
        # The server stopped reading: the rest waits in the socket, not in the server.
        assert connection.read_ahead <= _READ_AHEAD + 2**16
        assert len(connection.queue) < count
        release.set()
        answers = [await c.response(b"GET") for _ in range(count + 1)]
        await c.stream.aclose()
    assert answers[0][2] == b"waitok" and {a[2] for a in answers[1:]} == {b"ok"}


def _server_state(app: App, keep_alive_timeout: float = 60) -> ServerState:
    return ServerState(
        app,
        lifespan_state={},
        keep_alive_timeout=keep_alive_timeout,
        header_timeout=60,
        write_timeout=60,
        max_header_bytes=16384,
    )


# -- the body without waiting (BODY_NOWAIT) ---------------------------------------------------


async def test_a_scope_reads_only_its_own_request_body_without_waiting() -> None:
    first: list[Scope] = []
    seen: list[tuple[bytes | None, bytes | None]] = []

    async def nowait(scope: Scope, receive: Any, send: Any) -> None:
        if first:
            # The first request's scope, kept past its response, must not read this body.
            stale = first[0]["extensions"][BODY_NOWAIT]()
            own = scope["extensions"][BODY_NOWAIT]()
            seen.append((stale, own))
        else:
            first.append(scope)
            own = scope["extensions"][BODY_NOWAIT]()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": own or b""})

    server = _server_state(nowait)
    ours, theirs = trio.socket.socketpair()
    c = Client(trio.SocketStream(theirs))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, trio.SocketStream(ours))
        await c.stream.send_all(post(b"/a", b"first") + post(b"/b", b"second"))
        answers = [(await c.response())[2] for _ in range(2)]
        await c.stream.aclose()
    assert answers == [b"first", b"second"]
    assert seen == [(None, b"second")]


async def test_a_body_partly_received_is_not_read_again_without_waiting() -> None:
    server = _server_state(echo)
    ours, theirs = trio.socket.socketpair()
    connection = Connection(server, trio.SocketStream(ours))
    connection._feed(b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\nabc")
    request = connection._request = connection.queue[0]
    assert await connection.receive() == {"type": "http.request", "body": b"abc", "more_body": True}
    connection._feed(b"def")
    assert request.complete
    # The app holds "abc" already: the rest comes from `receive`, never as the whole body.
    assert request.scope["extensions"][BODY_NOWAIT]() is None
    assert await connection.receive() == {
        "type": "http.request",
        "body": b"def",
        "more_body": False,
    }
    connection.close()
    theirs.close()


# -- a property: however the bytes are cut, the answers are the same --------------------------

_REQUESTS = [
    b"GET /g?q=%C3%A9 HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n\r\n",
    post(b"/p", b'{"hello": "world"}', b"content-type: application/json"),
    chunked(b"/c", b"one,", b"two,", b"three"),
    post(b"/empty", b""),
]


@settings(max_examples=40, deadline=None)
@given(
    order=st.lists(st.sampled_from(range(len(_REQUESTS))), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12),
)
async def test_requests_cut_anywhere_get_the_same_answers(
    order: list[int], cuts: list[int]
) -> None:
    server = _server_state(echo)
    data = b"".join(_REQUESTS[i] for i in order)
    points = sorted({min(c, len(data)) for c in cuts} | {len(data)})
    ours, theirs = trio.socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, trio.SocketStream(ours))
        c = Client(trio.SocketStream(theirs))
        previous = 0
        for point in points:
            await c.stream.send_all(data[previous:point])
            previous = point
        answers = [json.loads((await c.response())[2]) for _ in order]
        await c.stream.aclose()
    expected = {
        0: ("GET", "/g", "q=%C3%A9", ""),
        1: ("POST", "/p", "", '{"hello": "world"}'),
        2: ("POST", "/c", "", "one,two,three"),
        3: ("POST", "/empty", "", ""),
    }
    assert [(a["method"], a["path"], a["query"], a["body"]) for a in answers] == [
        expected[i] for i in order
    ]
