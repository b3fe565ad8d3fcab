"""What interlock's HTTP client to an engine (interlock/engines/openai/_http.py) does when the
engine, or the client in front of interlock, does something awkward: a client that goes
mid-stream closes the engine's connection; a request the engine read is never sent twice; a
1xx answer before the real one; a head that never ends, or never comes; descriptors from 1024
on; a body cut, reset or written a byte at a time; a cancelled read; answers nested too deeply
to decode.

Real sockets on loopback: a small raw HTTP/1.1 server per test that misbehaves as described.
The tests wait on conditions (an event the server sets), never on the wall clock.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import pytest
import trio
import trio.testing
from test_engine_connections import (
    BURST_TOKENS,
    PROMPT,
    answer,
    engine_server,
    listening,
    read_request,
    sse_chunk,
)

from interlock._errors import RequestError, WorkerGone
from interlock.engines.openai import OpenAIEngine
from interlock.engines.openai._http import (
    MAX_HEAD_BYTES,
    SEND_TIMEOUT,
    EngineConnectError,
    EngineConnections,
    EngineProtocolError,
)
from interlock.wire import PreprocessedRequest

BODY = json.dumps({"prompt": list(PROMPT), "stream": True}).encode()
#: Generous bound on waiting for a condition on loopback (a hang fails instead of blocking).
DEADLINE = 30


async def test_a_client_that_goes_mid_stream_closes_the_engine_connection() -> None:
    first_token = json.dumps(
        {"choices": [{"index": 0, "text": "", "token_ids": [7], "finish_reason": None}]}
    )
    closed = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        async with stream:
            while (head := await read_request(stream, buffer)) is not None:
                line = head.split(b"\r\n", 1)[0]
                if line.startswith(b"GET /health"):
                    await stream.send_all(answer("200 OK", b""))
                elif line.startswith(b"GET /v1/models"):
                    await stream.send_all(answer("200 OK", b'{"data": [{"id": "m"}]}'))
                elif line.startswith(b"POST /v1/completions"):
                    await stream.send_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"transfer-encoding: chunked\r\n\r\n" + sse_chunk(first_token)
                    )
                    # A long generation: it goes on until the client closes the connection.
                    if await stream.receive_some(100) == b"":
                        closed.set()
                    return
                else:
                    await stream.send_all(answer("404 Not Found", b"{}"))

    async with trio.open_nursery() as nursery, listening(handler) as url:
        engine = OpenAIEngine(url, instance_id=1, health_interval=60)
        await nursery.start(engine.run)
        request = PreprocessedRequest(token_ids=PROMPT, max_tokens=50)
        # Held, so that only the client's own close (not garbage collection) closes the socket.
        opened = engine.open_stream(request)
        with trio.CancelScope() as client:
            async with opened as stream:
                async for output in stream:
                    assert output.token_ids == (7,)
                    client.cancel()  # the client disconnects while the engine generates
        assert client.cancelled_caught
        with trio.fail_after(DEADLINE):
            await closed.wait()
        nursery.cancel_scope.cancel()


async def test_a_request_the_engine_read_is_not_sent_again_and_breaks_as_worker_gone() -> None:
    posts: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        async with stream:
            while (head := await read_request(stream, buffer)) is not None:
                line = head.split(b"\r\n", 1)[0]
                if line.startswith(b"POST /v1/completions"):
                    posts.append(1)
                    return  # read the request, then the engine dies before answering
                if line.startswith(b"GET /health"):
                    await stream.send_all(answer("200 OK", b""))
                elif line.startswith(b"GET /v1/models"):
                    await stream.send_all(answer("200 OK", b'{"data": [{"id": "m"}]}'))
                else:
                    await stream.send_all(answer("404 Not Found", b"{}"))

    async with trio.open_nursery() as nursery, listening(handler) as url:
        engine = OpenAIEngine(url, instance_id=1, health_interval=60)
        await nursery.start(engine.run)
        # A request on a fresh connection, and one on a reused one (the health poll's).
        connections = engine._connections
        assert connections is not None
        status, _ = await connections.get("/health")
        assert status == 200
        for reused in (True, False):
            with pytest.raises(WorkerGone, match=r"closed the connection|connection broke"):
                async with engine.open_stream(PreprocessedRequest(token_ids=PROMPT)) as stream:
                    [output async for output in stream]
            assert len(posts) == 1, f"reused={reused}: the engine got the request {posts}"
            posts.clear()
        nursery.cancel_scope.cancel()


async def test_a_request_whose_answer_broke_after_part_of_its_head_is_not_sent_again() -> None:
    posts: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        async with stream:
            while await read_request(stream, buffer) is not None:
                posts.append(1)
                if len(posts) == 2:
                    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-ty")
                    return
                await stream.send_all(answer("200 OK", b'{"ok": 1}'))

    async with listening(handler) as url:
        connections = EngineConnections(url)
        response = await connections.post("/x", BODY)
        assert await response.read() == b'{"ok": 1}'
        response.close()
        with pytest.raises(EngineProtocolError):
            await connections.post("/x", BODY)
        assert len(posts) == 2
        await connections.aclose()


async def test_an_early_hints_answer_is_skipped_and_the_next_request_gets_its_own() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        served = 0
        async with stream:
            while await read_request(stream, buffer) is not None:
                served += 1
                await stream.send_all(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n")
                await stream.send_all(answer("200 OK", f"answer {served}".encode()))

    accepted: list[int] = []

    async def counting(stream: trio.SocketStream) -> None:
        accepted.append(1)
        await handler(stream)

    async with listening(counting) as url:
        connections = EngineConnections(url)
        for n in (1, 2, 3):
            response = await connections.post("/x", BODY)
            assert response.status == 200
            assert (b"link", b"</a>") not in response.headers
            assert await response.read() == f"answer {n}".encode()
            response.close()
        await connections.aclose()
    assert len(accepted) == 1  # the pooled connection served every request


async def test_an_answer_whose_head_never_ends_fails_without_reading_it_all() -> None:
    sent = trio.Event()
    line = b"x-junk: " + b"a" * 1000 + b"\r\n"

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await read_request(stream, bytearray())
            await stream.send_all(b"HTTP/1.1 200 OK\r\n")
            try:
                while True:  # headers without end, until the client hangs up
                    await stream.send_all(line)
            except trio.BrokenResourceError:
                sent.set()

    async with listening(handler) as url:
        connections = EngineConnections(url)
        with pytest.raises(EngineProtocolError, match=f"no end of headers within {MAX_HEAD_BYTES}"):
            await connections.post("/x", BODY)
        with trio.fail_after(DEADLINE):
            await sent.wait()  # the client closed the connection
        await connections.aclose()


@contextmanager
def descriptors_taken(count: int) -> Iterator[None]:
    """Open ``count`` descriptors, so that the next sockets get numbers past them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 256
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
    try:
        yield
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_connections_on_descriptors_past_1024_are_reused() -> None:
    accepted: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        accepted.append(stream.socket.fileno())
        await engine_server(stream)

    with descriptors_taken(1100):
        async with listening(handler) as url:
            connections = EngineConnections(url)
            for _ in range(5):
                response = await connections.post("/v1/completions", BODY)
                body = await response.read()
                assert body.count(b'"token_ids"') == len(BURST_TOKENS)
                response.close()
            pooled = connections._idle
            assert pooled and pooled[0]._stream is not None
            assert pooled[0]._stream.socket.fileno() >= 1024  # type: ignore[attr-defined]
            await connections.aclose()
    assert len(accepted) == 1, accepted


async def test_a_failed_tls_handshake_closes_its_tcp_connection() -> None:
    closed = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            # Not TLS: the client's handshake fails on this.
            await stream.send_all(answer("400 Bad Request", b"plain HTTP here"))
            while await stream.receive_some(65536):
                pass
            closed.set()

    async with listening(handler) as url:
        connections = EngineConnections(url.replace("http:", "https:"), verify=False)
        with pytest.raises(EngineConnectError) as failed:
            await connections.post("/x", BODY)
        with trio.fail_after(DEADLINE):
            await closed.wait()
        del failed  # held until the connection closed: its traceback holds the socket
        await connections.aclose()


async def test_a_response_finished_after_aclose_closes_its_connection() -> None:
    closed = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await read_request(stream, bytearray())
            await stream.send_all(answer("200 OK", b'{"ok": 1}'))
            while await stream.receive_some(65536):
                pass
            closed.set()

    async with listening(handler) as url:
        connections = EngineConnections(url)
        response = await connections.post("/x", BODY)
        await connections.aclose()
        assert await response.read() == b'{"ok": 1}'
        response.close()
        assert connections._idle == []
        with trio.fail_after(DEADLINE):
            await closed.wait()


def token_chunk(token: int, finish_reason: str | None = None) -> bytes:
    choice = {"index": 0, "text": "", "token_ids": [token], "finish_reason": finish_reason}
    return sse_chunk(json.dumps({"choices": [choice]}))


def scripted_engine(
    on_completion: Callable[[trio.SocketStream], Awaitable[str | None]],
) -> tuple[Callable[[trio.SocketStream], Awaitable[None]], list[int]]:
    """An engine that answers each completion with ``on_completion(stream)`` (which returns
    "close" to end the connection), and the list its connections are counted in."""
    connections: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        connections.append(1)
        buffer = bytearray()
        async with stream:
            while (head := await read_request(stream, buffer)) is not None:
                line = head.split(b"\r\n", 1)[0]
                if line.startswith(b"GET /health"):
                    await stream.send_all(answer("200 OK", b""))
                elif line.startswith(b"GET /v1/models"):
                    await stream.send_all(answer("200 OK", b'{"data": [{"id": "m"}]}'))
                elif line.startswith(b"POST /v1/completions"):
                    if await on_completion(stream) == "close":
                        return
                else:
                    await stream.send_all(answer("404 Not Found", b"{}"))

    return handler, connections


def serve_one_answer(head: bytes, body: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """An engine whose every completion is answered with ``head`` and then ``body``, as is."""

    async def completion(stream: trio.SocketStream) -> None:
        await stream.send_all(head + body)

    return scripted_engine(completion)[0]


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def serve_one_burst(body: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """An engine whose every completion is ``body``, sent in one write."""
    return serve_one_answer(SSE_HEAD, body)


@pytest.mark.parametrize("broken", [False, True])
async def test_a_long_burst_is_joined_into_outputs_of_at_most_256_tokens(broken: bool) -> None:
    tokens = list(range(1000, 1600))
    body = b"".join(token_chunk(t) for t in tokens)
    if broken:
        error = {"error": {"message": "EngineCore encountered an issue.", "code": 500}}
        body += sse_chunk(json.dumps(error))
    else:
        body += token_chunk(1600, "length") + sse_chunk("[DONE]") + b"0\r\n\r\n"
        tokens.append(1600)
    handler = serve_one_burst(body)
    got: list[int] = []
    sizes: list[int] = []
    async with trio.open_nursery() as nursery, listening(handler) as url:
        engine = OpenAIEngine(url, instance_id=1, health_interval=60)
        await nursery.start(engine.run)
        request = PreprocessedRequest(token_ids=PROMPT, max_tokens=len(tokens))
        failing: AbstractContextManager[object] = (
            pytest.raises(WorkerGone, match="EngineCore") if broken else nullcontext()
        )
        with failing:
            async with engine.open_stream(request) as stream:
                async for output in stream:
                    got.extend(output.token_ids)
                    sizes.append(len(output.token_ids))
        nursery.cancel_scope.cancel()
    # Every token, in order, before any failure (migration keeps them).
    assert got == tokens
    assert max(sizes) <= 256 and sum(sizes) == len(tokens)
    assert len(sizes) <= len(tokens) // 256 + 2, sizes  # joined, not one output per token


async def test_a_request_the_engine_does_not_read_fails_after_the_send_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()  # accepts, never reads

    async with listening(handler) as url:
        connections = EngineConnections(url)
        # Larger than any socket buffers on the way: the write must wait for the engine.
        body = b"[" + b"1," * (32 * 1024 * 1024) + b"1]"
        with pytest.raises(EngineProtocolError, match=f"within {SEND_TIMEOUT}s"):
            await connections.post("/v1/completions", body)
        await connections.aclose()


#: Nested past where msgspec and json run out of Python's stack (about 985 and 940 levels).
DEEP = b"[" * 2000 + b"]" * 2000


@pytest.mark.parametrize("where", ["stream", "prefill", "500", "400"])
async def test_an_answer_nested_too_deeply_is_a_broken_stream_not_a_crash(where: str) -> None:
    # msgspec and json recurse through every level, fields not read too: a RecursionError
    # came out of open_stream (a 500 to the client, no migration) instead of a WorkerGone.
    role = "agg"
    expected: type[Exception] = WorkerGone
    if where == "stream":
        head = SSE_HEAD
        body = token_chunk(1) + sse_chunk('{"x": ' + DEEP.decode() + ', "choices": []}')
        match = r"sent a chunk nested too deeply to read.* after 1 tokens"
    elif where == "prefill":
        role = "prefill"
        answered = b'{"x": %s, "choices": [{"token_ids": [1], "finish_reason": "length"}]}'
        head, body = b"", answer("200 OK", answered % DEEP)
        match = "sent an unreadable answer"
    else:  # an error answer whose body cannot be read: the status decides
        head, body = b"", answer(f"{where} Oops", b'{"error": %s}' % DEEP)
        if where == "400":
            expected = RequestError
        match = r"rejected the request \(400\): HTTP 400" if where == "400" else "answered 500"
    async with trio.open_nursery() as nursery, listening(serve_one_answer(head, body)) as url:
        engine = OpenAIEngine(url, instance_id=1, health_interval=60, role=role)
        await nursery.start(engine.run)
        got: list[int] = []
        with pytest.raises(expected, match=match), trio.fail_after(DEADLINE):
            async with engine.open_stream(PreprocessedRequest(token_ids=PROMPT)) as stream:
                async for output in stream:
                    got.extend(output.token_ids)
        # The tokens before the broken chunk came out first (migration keeps them).
        assert got == ([1] if where == "stream" else [])
        nursery.cancel_scope.cancel()


WHOLE = (
    token_chunk(1)
    + token_chunk(2)
    + token_chunk(3, "length")
    + sse_chunk(json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}}))
    + sse_chunk("[DONE]")
    + b"0\r\n\r\n"
)


async def run_streams(
    handler: Callable[[trio.SocketStream], Awaitable[None]], n: int = 1
) -> list[Any]:
    """``n`` requests in turn: each one's outputs, or the WorkerGone it raised."""
    results: list[Any] = []
    async with trio.open_nursery() as nursery, listening(handler) as url:
        engine = OpenAIEngine(url, instance_id=1, health_interval=60)
        await nursery.start(engine.run)
        for _ in range(n):
            try:
                with trio.fail_after(DEADLINE):
                    request = PreprocessedRequest(token_ids=PROMPT, max_tokens=3)
                    async with engine.open_stream(request) as s:
                        results.append([o async for o in s])
            except WorkerGone as exc:
                results.append(exc)
        nursery.cancel_scope.cancel()
    return results


async def test_a_body_written_a_byte_at_a_time_is_read_whole_and_its_connection_reused() -> None:
    async def completion(stream: trio.SocketStream) -> None:
        for byte in SSE_HEAD + WHOLE:
            await stream.send_all(bytes([byte]))
            await trio.lowlevel.checkpoint()

    handler, connections = scripted_engine(completion)
    for outputs in await run_streams(handler, 3):
        assert not isinstance(outputs, Exception), outputs
        assert [t for o in outputs for t in o.token_ids] == [1, 2, 3]
        assert outputs[-1].finish_reason == "length" and outputs[-1].usage is not None
    assert len(connections) == 1  # every request on the start-up checks' connection


@pytest.mark.parametrize("cut", [5, 40, len(token_chunk(1)) + 3])
async def test_eof_mid_chunk_is_a_worker_gone(cut: int) -> None:
    async def completion(stream: trio.SocketStream) -> str:
        await stream.send_all(SSE_HEAD + (token_chunk(1) + token_chunk(2))[:cut])
        return "close"

    [result] = await run_streams(scripted_engine(completion)[0])
    assert isinstance(result, WorkerGone), result


async def test_a_reset_mid_body_is_a_worker_gone() -> None:
    async def completion(stream: trio.SocketStream) -> str:
        await stream.send_all(SSE_HEAD + token_chunk(1))
        # Linger 0: the close sends a RST, not a FIN.
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return "close"

    [result] = await run_streams(scripted_engine(completion)[0])
    assert isinstance(result, WorkerGone), result


async def test_a_cancelled_read_keeps_its_bytes_and_the_connection_usable() -> None:
    go = trio.Event()

    async def completion(stream: trio.SocketStream) -> None:
        await stream.send_all(SSE_HEAD + token_chunk(1))
        await go.wait()
        await stream.send_all(
            token_chunk(2) + token_chunk(3, "length") + sse_chunk("[DONE]") + b"0\r\n\r\n"
        )

    async with listening(scripted_engine(completion)[0]) as url:
        connections = EngineConnections(url)
        response = await connections.post("/v1/completions", b"{}")
        assert b'"token_ids": [1]' in await response.receive()
        with trio.CancelScope() as scope:
            scope.cancel()
            await response.receive()  # cancelled before any byte came
        assert scope.cancelled_caught
        go.set()
        with trio.fail_after(DEADLINE):
            rest = await response.read()
        assert b'"token_ids": [2]' in rest and b"[DONE]" in rest
        assert response.complete
        response.close()
        assert len(connections._idle) == 1
        status, _ = await connections.get("/health")
        assert status == 200
        await connections.aclose()


async def test_a_client_cancelled_after_the_whole_stream_gives_the_connection_back() -> None:
    async def completion(stream: trio.SocketStream) -> None:
        await stream.send_all(SSE_HEAD + WHOLE)

    handler, connections = scripted_engine(completion)
    async with trio.open_nursery() as nursery, listening(handler) as url:
        engine = OpenAIEngine(url, instance_id=1, health_interval=60)
        await nursery.start(engine.run)
        request = PreprocessedRequest(token_ids=PROMPT, max_tokens=3)
        with trio.CancelScope() as client:
            async with engine.open_stream(request) as s:
                outputs = [o async for o in s]
                client.cancel()
        assert client.cancelled_caught
        assert [t for o in outputs for t in o.token_ids] == [1, 2, 3]
        assert engine._connections is not None and len(engine._connections._idle) == 1
        async with engine.open_stream(request) as s:  # and it still carries a request
            assert [t for o in [o async for o in s] for t in o.token_ids] == [1, 2, 3]
        assert len(connections) == 1
        nursery.cancel_scope.cancel()


async def test_an_engine_that_never_answers_the_head_is_a_worker_gone_after_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hold = trio.Event()

    async def completion(stream: trio.SocketStream) -> None:
        await hold.wait()  # reads the request, answers nothing

    async with trio.open_nursery() as nursery, listening(scripted_engine(completion)[0]) as url:
        engine = OpenAIEngine(url, instance_id=1, health_interval=600, idle_timeout=5.0)
        await nursery.start(engine.run)
        request = PreprocessedRequest(token_ids=PROMPT, max_tokens=3)
        with pytest.raises(WorkerGone, match=r"sent no response within engine_idle_timeout=5\.0s"):
            async with engine.open_stream(request) as s:
                [o async for o in s]
        hold.set()
        nursery.cancel_scope.cancel()
