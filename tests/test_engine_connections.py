"""How interlock's requests reach an OpenAI-compatible engine (interlock/engines/openai/_http.py):
keep-alive connections serve request after request, a connection the engine closed while it
sat idle is replaced without failing the request, and a burst of SSE chunks that arrived
together reaches the pipeline as one output carrying every token, in order.

Real sockets on loopback: interlock's mock engine behind vLLM's HTTP surface seen through a
proxy that counts connections, and a small raw HTTP/1.1 server where the test must choose the
bytes and their timing (a keep-alive timeout, a burst).
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from test_etcd_security import make_certificates

from interlock.engines.mock import MockEngine, MockTiming, serve_mock_openai
from interlock.engines.openai import OpenAIEngine
from interlock.engines.openai._http import EngineConnections
from interlock.wire import EngineOutput, PreprocessedRequest

PROMPT = tuple(range(40, 140))


@asynccontextmanager
async def listening(
    handler: Callable[[Any], Awaitable[None]], tls: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """Serve each connection to 127.0.0.1 with ``handler`` (over TLS with ``tls``); yield the
    URL."""
    async with trio.open_nursery() as nursery:
        if tls is None:
            serve = functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        else:
            serve = functools.partial(trio.serve_ssl_over_tcp, handler, 0, tls, host="127.0.0.1")
        listeners = await nursery.start(serve)
        listener = getattr(listeners[0], "transport_listener", listeners[0])
        port = listener.socket.getsockname()[1]
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def counting_proxy(target: str) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A TCP proxy to ``target``'s host and port; yields its URL and the first request line of
    every connection it accepted."""
    host, port = target.removeprefix("http://").split(":")
    first_lines: list[bytes] = []

    async def handle(client: trio.SocketStream) -> None:
        first = await client.receive_some(65536)
        first_lines.append(first.split(b"\r\n", 1)[0])
        async with client, await trio.open_tcp_stream(host, int(port)) as upstream:
            await upstream.send_all(first)

            async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                try:
                    while data := await source.receive_some(65536):
                        await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()  # one side closed: close both

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)

    async with listening(handle) as url:
        yield url, first_lines


async def read_request(stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
    """The next request's head (its body is read and dropped); None when the client closed."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += await stream.receive_some(65536)
    buffer[:] = rest[length:]
    return head


def answer(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


def sse_chunk(data: str) -> bytes:
    event = f"data: {data}\n\n".encode()
    return f"{len(event):x}\r\n".encode() + event + b"\r\n"


#: A whole streamed completion of 5 tokens, as vLLM frames it (one chunk per token, the finish
#: reason on the last, then usage and [DONE]), chunked, with the body's end.
BURST_TOKENS = [11, 12, 13, 14, 15]
BURST = (
    b"".join(
        sse_chunk(
            json.dumps(
                {
                    "choices": [
                        {
                            "index": 0,
                            "text": "",
                            "token_ids": [token],
                            "finish_reason": "length" if token == 15 else None,
                        }
                    ]
                }
            )
        )
        for token in BURST_TOKENS
    )
    + sse_chunk(
        json.dumps({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 5}})
    )
    + sse_chunk("[DONE]")
    + b"0\r\n\r\n"
)


async def engine_server(
    stream: trio.abc.Stream, *, close_after_answer: bool = False, root: bytes = b""
) -> None:
    """The part of vLLM's surface OpenAIEngine reads, under the path ``root``, with every
    completion streamed in one write (`BURST`); ``close_after_answer``: close each connection
    after its first answer without saying so (as a server whose keep-alive timeout fired)."""
    buffer = bytearray()
    async with stream:
        while (head := await read_request(stream, buffer)) is not None:
            line = head.split(b"\r\n", 1)[0]
            if line.startswith(b"GET " + root + b"/health"):
                await stream.send_all(answer("200 OK", b""))
            elif line.startswith(b"GET " + root + b"/v1/models"):
                await stream.send_all(answer("200 OK", b'{"data": [{"id": "burst"}]}'))
            elif line.startswith(b"POST " + root + b"/v1/completions"):
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n" + BURST
                )
                if close_after_answer:
                    return
            else:
                await stream.send_all(answer("404 Not Found", b'{"error": "no"}'))


async def stream_outputs(engine: OpenAIEngine) -> list[EngineOutput]:
    request = PreprocessedRequest(token_ids=PROMPT, max_tokens=5)
    async with engine.open_stream(request) as stream:
        return [output async for output in stream]


async def test_one_connection_serves_request_after_request() -> None:
    async with trio.open_nursery() as nursery:
        mock = MockEngine(1, "agg", timing=MockTiming.zero())
        server = await nursery.start(
            lambda task_status: serve_mock_openai(mock, task_status=task_status)
        )
        async with counting_proxy(server.url) as (url, first_lines):
            engine = OpenAIEngine(url, instance_id=1, health_interval=60)
            await nursery.start(engine.run)
            for _ in range(10):
                outputs = await stream_outputs(engine)
                assert sum(len(o.token_ids) for o in outputs) == 5
                assert outputs[-1].finish_reason == "length"
            # The start-up checks and every request after them found the connection the one
            # before left idle.
            assert first_lines == [b"GET /health HTTP/1.1"], first_lines
        nursery.cancel_scope.cancel()


async def test_a_connection_the_engine_closed_while_idle_is_replaced() -> None:
    accepted = []

    async def handler(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await engine_server(stream, close_after_answer=True)

    async with listening(handler) as url:
        connections = EngineConnections(url)
        body = json.dumps({"prompt": list(PROMPT), "stream": True}).encode()
        for _ in range(3):
            response = await connections.post("/v1/completions", body)
            assert response.status == 200
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
            response.close()
        await connections.aclose()
    assert len(accepted) == 3  # one per request, none of them failed


async def test_a_burst_of_chunks_is_one_output_with_every_token() -> None:
    async with trio.open_nursery() as nursery, listening(engine_server) as url:
        engine = OpenAIEngine(url, instance_id=1, health_interval=60)
        await nursery.start(engine.run)
        outputs = await stream_outputs(engine)
        nursery.cancel_scope.cancel()
    assert [o.token_ids for o in outputs] == [tuple(BURST_TOKENS)]
    assert outputs[0].finish_reason == "length"
    assert outputs[0].usage is not None and outputs[0].usage.completion_tokens == 5


async def test_an_https_engine_under_a_path_is_reached_with_its_ca(tmp_path: Path) -> None:
    make_certificates(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tmp_path / "server.pem", tmp_path / "server-key.pem")
    handler = functools.partial(engine_server, root=b"/v")
    async with trio.open_nursery() as nursery, listening(handler, server_tls) as url:
        engine = OpenAIEngine(
            f"{url}/v", instance_id=1, health_interval=60, verify=str(tmp_path / "ca.pem")
        )
        await nursery.start(engine.run)
        outputs = await stream_outputs(engine)
        nursery.cancel_scope.cancel()
    assert [o.token_ids for o in outputs] == [tuple(BURST_TOKENS)]
