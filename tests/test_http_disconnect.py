"""A client that disconnects cancels its request: the worker stops and the load is freed."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
import trio
from test_http_harness import Served, serving

from interlock.engines.mock import MockTiming

# Real mock-model time: a 5000-token answer would take most of a minute, so only a
# disconnect can end it within the test.
SLOW = MockTiming(speedup_ratio=1.0)


async def _connect(served: Served, body: dict[str, object]) -> trio.SocketStream:
    address = urlsplit(served.url)
    assert address.hostname is not None and address.port is not None
    stream = await trio.open_tcp_stream(address.hostname, address.port)
    payload = json.dumps(body).encode()
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return stream


def _body(stream: bool) -> dict[str, object]:
    return {
        "model": "mock",
        "messages": [{"role": "user", "content": "Talk for a long time."}],
        "max_tokens": 5000,
        "ignore_eos": True,
        "stream": stream,
    }


async def _busy(served: Served) -> None:
    for _ in range(1000):
        if sum(w.active_requests for w in served.workers):
            return
        await trio.sleep(0.01)
    raise AssertionError("the request never reached a worker")


@pytest.mark.parametrize("stream", [True, False])
async def test_disconnect_cancels_the_request_and_frees_the_worker(stream: bool) -> None:
    async with serving(timing=SLOW) as served:
        with trio.fail_after(30):
            connection = await _connect(served, _body(stream))
            if stream:
                received = b""
                while b"data: " not in received:
                    received += await connection.receive_some(65536)
                assert received.startswith(b"HTTP/1.1 200")
            else:
                await _busy(served)
            assert await served.pipeline.load() != {}, "the running request must book its load"
            await connection.aclose()
            await served.wait_idle()
        assert sum(w.requests_cancelled for w in served.workers) == 1
        assert sum(w.requests_finished for w in served.workers) == 0
        paths = [
            served.pipeline.transition_log.path(r)
            for r in served.pipeline.transition_log.by_request()
        ]
        assert paths == [["received", "preprocessed", "routed", "decoding", "cancelled"]]
        endpoint = ("/v1/chat/completions", "499")
        assert served.metrics.requests.get(endpoint) == 1, served.metrics.requests


async def test_other_streams_carry_on_when_one_client_leaves() -> None:
    async with serving(timing=MockTiming(speedup_ratio=50.0)) as served:
        with trio.fail_after(30):
            leaving = await _connect(served, _body(True))
            staying = await _connect(served, {**_body(True), "max_tokens": 20})
            received = b""
            while b"data: " not in received:
                received += await leaving.receive_some(65536)
            await leaving.aclose()
            answer = b""
            while not answer.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
                chunk = await staying.receive_some(65536)
                assert chunk, "the staying stream was cut"
                answer += chunk
            await staying.aclose()
            await served.wait_idle()
        assert sum(w.requests_finished for w in served.workers) == 1
        assert b'"finish_reason":"length"' in answer
