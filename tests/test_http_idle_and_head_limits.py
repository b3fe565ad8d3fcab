"""The h1 server's idle sweeper and head limits at their edges: a request readable at its
keep-alive deadline is served, keep_alive_timeout 0 answers one request a connection, a peer
that resets an idle connection leaves nothing behind, a small head after many pipelined
requests is not a 431."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
from typing import Any

import pytest
import trio
import trio._core._run
import trio.testing
from test_http_server import Client, echo, post

from interlock.http._h1 import ServerState


def _state(keep_alive_timeout: float = 10, max_header_bytes: int = 16384) -> ServerState:
    return ServerState(
        echo,
        lifespan_state={},
        keep_alive_timeout=keep_alive_timeout,
        header_timeout=60,
        write_timeout=60,
        max_header_bytes=max_header_bytes,
    )


async def test_without_keep_alive_the_first_request_is_still_answered(
    autojump_clock: object,
) -> None:
    """``keep_alive_timeout=0`` (nginx's ``keepalive_timeout 0``: no keep-alive) should serve
    each connection's request and close after it, not refuse every connection."""
    server = _state(keep_alive_timeout=0)
    ours, theirs = trio.socket.socketpair()
    c = Client(trio.SocketStream(theirs))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.sweep_idle)
        nursery.start_soon(server.handle, trio.SocketStream(ours))
        await c.stream.send_all(post(b"/a", b"hi"))
        try:
            status, headers, _ = await c.response()
        except trio.BrokenResourceError:
            status, headers = 0, {}  # reset: the request was never read
        nursery.cancel_scope.cancel()
    assert (status, headers.get(b"connection")) == (200, b"close")


class _Fixed(random.Random):
    """trio's scheduler under pytest-trio (``_ALLOW_DETERMINISTIC_SCHEDULING``) sorts each
    batch of runnable tasks by creation and shuffles it with ``_r``: a constant ``random()``
    fixes the shuffle, so which of two tasks woken together runs first."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    "order",
    [
        pytest.param(0.01, id="connection-first"),
        # Closed unread before the fix: the cancel-scope wait sweep_idle replaced served it
        # in either order (I/O reschedules a task before deadlines expire).
        pytest.param(0.75, id="sweeper-first"),
    ],
)
async def test_a_request_readable_when_its_deadline_is_noticed_is_served(
    order: float, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop is busy (here: the clock jumps) from just before a connection's keep-alive
    deadline to just after it; the client's next request arrived before the deadline, so it is
    in the socket when the loop next polls, in the same pass that expires the deadline."""
    monkeypatch.setattr(trio._core._run, "_ALLOW_DETERMINISTIC_SCHEDULING", True)
    monkeypatch.setattr(trio._core._run, "_r", _Fixed(order))
    server = _state(keep_alive_timeout=10)
    ours, theirs = trio.socket.socketpair()
    c = Client(trio.SocketStream(theirs))
    async with trio.open_nursery() as nursery:
        if hasattr(server, "sweep_idle"):
            nursery.start_soon(server.sweep_idle)
        nursery.start_soon(server.handle, trio.SocketStream(ours))
        await c.stream.send_all(post(b"/a", b""))
        assert (await c.response())[0] == 200
        await trio.sleep(9.5)  # idle since the answer: 0.5 s to go
        # Sent and the clock moved on in one step (no checkpoint between): the loop is busy
        # from before the deadline to after it.
        request = post(b"/b", b"next")
        assert os.write(theirs.fileno(), request) == len(request)
        autojump_clock.jump(1)
        try:
            status = (await c.response())[0]
        except trio.BrokenResourceError:
            status = 0  # closed with the request unread
        nursery.cancel_scope.cancel()
    assert status == 200


async def test_a_small_head_after_many_pipelined_requests_in_one_read_is_not_431() -> None:
    server = _state(keep_alive_timeout=60)
    ours, theirs = trio.socket.socketpair()
    c = Client(trio.SocketStream(theirs))
    small = post(b"/a", b"")  # ~50 bytes
    count = 400  # ~20 KB, each head far under the 16 KiB limit
    last = post(b"/last", b"")
    async with trio.open_nursery() as nursery:
        # All in the socket before the server reads: one read holds them, the last head cut.
        await c.stream.send_all(small * count + last[:10])
        nursery.start_soon(server.handle, trio.SocketStream(ours))
        statuses = [(await c.response())[0] for _ in range(count)]
        with contextlib.suppress(trio.BrokenResourceError):
            await c.stream.send_all(last[10:])  # (the server may have answered and closed)
        statuses.append((await c.response())[0])
        nursery.cancel_scope.cancel()
    assert statuses == [200] * (count + 1)


async def test_the_sweeper_never_closes_a_connection_whose_app_runs(
    autojump_clock: object,
) -> None:
    """Checked correct: a connection is in ``idle`` only while it polls; a body trickling in
    after ``Expect: 100-continue`` and a slow app both run past keep-alive deadlines."""

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await trio.sleep(25)
        await echo(scope, receive, send)

    server = ServerState(
        slow,
        lifespan_state={},
        keep_alive_timeout=10,
        header_timeout=60,
        write_timeout=60,
        max_header_bytes=16384,
    )
    ours, theirs = trio.socket.socketpair()
    c = Client(trio.SocketStream(theirs))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.sweep_idle)
        nursery.start_soon(server.handle, trio.SocketStream(ours))
        head = b"POST /u HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\nexpect: 100-continue\r\n\r\n"
        await c.stream.send_all(head)
        for part in (b"ab", b"cd", b"ef"):
            await trio.sleep(9)
            await c.stream.send_all(part)
        assert (await c.response())[0] == 200
        await c.stream.send_all(post(b"/slow", b""))
        assert (await c.response())[0] == 200
        before = trio.current_time()
        assert await c.stream.receive_some(65536) == b""
        assert trio.current_time() - before == 10
        nursery.cancel_scope.cancel()


async def test_a_peer_that_resets_an_idle_connection_ends_it_and_leaves_no_idle_entry(
    autojump_clock: object,
) -> None:
    """Checked correct: the poll-then-read wait sees a reset (ECONNRESET from the read) or a
    close (an empty read) and ends the connection; nothing stays in ``idle``."""
    server = _state(keep_alive_timeout=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.sweep_idle)
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        for how in ("reset", "close"):
            c = trio.socket.socket()
            await c.connect(listener.getsockname())
            ours, _ = await listener.accept()
            done = trio.Event()

            async def serve(ours: Any = ours, done: trio.Event = done) -> None:
                await server.handle(trio.SocketStream(ours))
                done.set()

            nursery.start_soon(serve)
            await c.send(post(b"/a", b""))
            assert (await c.recv(65536)).startswith(b"HTTP/1.1 200 ")
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.idle) == 1
            if how == "reset":
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            with trio.fail_after(1):  # well before the keep-alive deadline
                await done.wait()
            assert not server.idle
        listener.close()
        nursery.cancel_scope.cancel()
