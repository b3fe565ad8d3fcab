"""Hostile and broken clients: dripped requests, clients that stop reading, requests too
expensive to serve on the event loop, the limits that answer them 4xx, and hypothesis-made
bodies that must never get a 5xx (docs/operations.md, "Hostile and slow clients")."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from helpers import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http_harness import CHAT, serving

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine, MockTiming
from interlock.http import HttpLimits, Preprocessor, build_app
from interlock.http._cli import mock_token_pool
from interlock.processing import ByteTokenizer

# -- a real `interlock serve` process, spoken to over raw sockets ----------------------------


@asynccontextmanager
async def _serve_process(*flags: str) -> AsyncIterator[tuple[str, int]]:
    """``interlock serve`` on a free port with ``flags``; yields its host and port."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "interlock", "serve", "--port", "0", "--zero-time", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        buffer = b""
        with trio.fail_after(60):
            while b"listening on " not in buffer or not buffer.endswith(b"\n"):
                chunk = await process.stdout.receive_some(65536)
                assert chunk, f"serve exited early: {buffer.decode()}"
                buffer += chunk
        url = buffer.decode().split("listening on ")[1].split()[0]
        host, port = url.removeprefix("http://").rsplit(":", 1)
        yield host, int(port)
    finally:
        process.kill()
        await process.wait()


async def _answer_then_close(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection (a failure after 30 s)."""
    received = b""
    with trio.fail_after(30):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


def _status_and_error(response: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


async def test_dripped_headers_and_bodies_get_408_and_are_closed() -> None:
    async with _serve_process("--request-read-timeout", "0.5", "--route-api") as (host, port):
        # Headers that never end.
        headers = await trio.open_tcp_stream(host, port)
        await headers.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        status, error = _status_and_error(await _answer_then_close(headers))
        assert status == 408 and error["code"] == "request_timeout", error
        assert "headers" in error["message"]
        # A body declared and then dripped: one byte, then nothing.
        for path in (b"/v1/chat/completions", b"/v1/completions", b"/v1/route"):
            body = await trio.open_tcp_stream(host, port)
            await body.send_all(
                b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                b"\r\ncontent-length: 100\r\n\r\n{" % path
            )
            status, error = _status_and_error(await _answer_then_close(body))
            assert status == 408 and error["code"] == "request_timeout", (path, error)
            assert "--request-read-timeout" in error["message"]
        # The server still serves.
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            metrics = (await client.get("/metrics")).text
        assert "interlock_http_requests_in_flight 0.0" in metrics


async def test_five_hundred_slowloris_connections_do_not_stop_a_normal_request() -> None:
    async with _serve_process() as (host, port):
        # 500 connections that each send part of a request head, then nothing more for now
        # (the default --request-read-timeout, 60 s, has not run out for any of them).
        dripping = []
        for index in range(500):
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-n: %d" % index
            )
            dripping.append(stream)
        try:
            # Another byte on each, as a slowloris client keeps its connections alive.
            for stream in dripping:
                await stream.send_all(b"1")
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
                answer = await client.post("/v1/chat/completions", json=CHAT)
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["message"]["content"]
                streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
                assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        finally:
            for stream in dripping:
                await stream.aclose()


async def test_oversized_headers_get_an_openai_style_431() -> None:
    async with _serve_process() as (host, port):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(
            b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n"
        )
        status, error = _status_and_error(await _answer_then_close(stream))
        assert status == 431 and error["code"] == "headers_too_large", error


async def test_a_client_that_stops_reading_is_disconnected_after_the_write_timeout() -> None:
    flags = ("--max-model-len", "400000", "--write-timeout", "0.5", "--workers", "1")
    async with _serve_process(*flags) as (host, port):
        sock = trio.socket.socket()
        # A small receive window, so the server's writes block soon.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, port))
        stream = trio.SocketStream(sock)
        body = json.dumps(
            {**CHAT, "max_tokens": 300_000, "stream": True, "ignore_eos": True}
        ).encode()
        await stream.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
            b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:

            async def metric(name: str) -> float:
                text = (await client.get("/metrics")).text
                (line,) = [m for m in text.splitlines() if m.startswith(name + " ")]
                return float(line.split()[1])

            # The request is cancelled (too far behind, or dropped by the write timeout) and
            # the connection let go, without the client reading a byte.
            with trio.fail_after(60):
                while await metric("interlock_http_requests_in_flight") != 0:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            health = (await client.get("/health")).json()
            assert health["in_flight"] == 0, health
            assert await metric("interlock_http_stream_buffered_bytes") == 0
        stream.socket.close()


# -- in-process: a served pipeline, and the app itself ---------------------------------------


async def test_fifty_streams_never_read_stay_bounded_and_free_their_workers() -> None:
    limit = 512
    limits = HttpLimits(max_stream_buffer_bytes=limit, max_model_len=400_000)
    async with serving(workers=2, limits=limits) as served:
        host, port = served.url.removeprefix("http://").rsplit(":", 1)
        body = json.dumps(
            {**CHAT, "max_tokens": 300_000, "stream": True, "ignore_eos": True}
        ).encode()
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
            b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        sockets = []
        for _ in range(50):
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect((host, int(port)))
            await sock.send(request)
            sockets.append(sock)
        metrics = served.metrics
        # Each stream falls behind, overflows its buffer and is cancelled: the workers are
        # freed while the clients still hold their connections, unread.
        await wait_until(lambda: metrics.stream_buffer_overflows == 50, within=120)
        await served.wait_idle()
        assert metrics.streams_open == 50
        # What is held for them is bounded: at most the limit each, plus the error event.
        assert 0 < metrics.stream_buffered_bytes <= 50 * (limit + 1024), (
            metrics.stream_buffered_bytes
        )
        for sock in sockets:
            sock.close()
        await wait_until(lambda: metrics.in_flight == 0, within=30)
        assert metrics.stream_buffered_bytes == 0 and metrics.streams_open == 0


async def test_a_client_that_reads_late_gets_the_whole_text() -> None:
    # Stop reading until the answer is complete on the server: the text arrives whole.
    async with serving(workers=1) as served, served.client() as client:
        reference = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 64})
        text = reference.json()["choices"][0]["message"]["content"]
        async with client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 64, "stream": True}
        ) as answer:
            await served.wait_idle()
            events = [line async for line in answer.aiter_lines() if line.startswith("data: {")]
    pieces = [json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events]
    assert "".join(pieces) == text
    finish = reference.json()["choices"][0]["finish_reason"]
    assert json.loads(events[-1][6:])["choices"][0]["finish_reason"] == finish


class _ThreadRecordingTokenizer(ByteTokenizer):
    """The byte tokenizer, remembering which thread each encode ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[tuple[int, threading.Thread]] = []

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if "<|im_start|>" in text:  # a rendered chat prompt
            self.prompts.append((text.count("<|im_start|>"), threading.current_thread()))
        return super().encode(text, add_special_tokens=add_special_tokens)


async def test_large_bodies_are_preprocessed_off_the_event_loop() -> None:
    tokenizer = _ThreadRecordingTokenizer()
    preprocessor = Preprocessor(tokenizer, tokenizer.chat_template)
    limits = HttpLimits(offload_body_bytes=4096, max_model_len=100_000)
    async with (
        serving(workers=1, preprocessor=preprocessor, limits=limits) as served,
        served.client() as client,
    ):
        small = await client.post("/v1/chat/completions", json=CHAT)
        messages = [{"role": "user", "content": "hi"}] * 1000
        large = await client.post(
            "/v1/chat/completions", json={**CHAT, "messages": messages, "max_tokens": 2}
        )
    assert small.status_code == 200 and large.status_code == 200, large.text
    (small_turns, small_thread), (large_turns, large_thread) = tokenizer.prompts
    assert (small_turns, large_turns) == (2, 1001)
    assert small_thread is threading.main_thread()
    assert large_thread is not threading.main_thread()


@asynccontextmanager
async def _app_client(
    limits: HttpLimits | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The app in-process (no sockets: fine under the autojump clock), and its metrics."""
    preprocessor = Preprocessor.default()
    tokenizer = preprocessor.tokenizer
    workers = [
        MockEngine(i, timing=MockTiming.zero(), token_pool=mock_token_pool(tokenizer))
        for i in (1, 2)
    ]
    components = Components(workers=workers, tokenizer=tokenizer)
    async with build_pipeline(PipelineConfig(), components) as pipeline:
        app = build_app(pipeline, preprocessor=preprocessor, limits=limits)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client, app
        assert pipeline.in_flight == 0, "a request leaked"
        assert app.state.metrics.in_flight == 0


def _is_openai_error(answer: httpx.Response) -> bool:
    error = answer.json().get("error")
    return (
        type(error) is dict
        and set(error) == {"message", "type", "param", "code"}
        and type(error["message"]) is str
        and error["type"] == "invalid_request_error"
    )


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"n": 2}, "n", "unsupported_parameter"),
        ({"max_tokens": 10**9}, "max_tokens", "context_length_exceeded"),
        ({"stop": ["x"] * 65}, "stop", "too_many_stops"),
        ({"stop": ["x" * 4000, "y" * 97]}, "stop", "stop_too_long"),
        ({"stop": ["a" * 1_000_000] * 7}, "stop", "stop_too_long"),
        ({"messages": [{"role": "user", "content": "x"}] * 101}, "messages", "too_many_messages"),
    ],
)  # fmt: skip
async def test_limits_are_4xx_naming_the_limit(
    autojump_clock: object, change: dict[str, Any], param: str, code: str
) -> None:
    limits = HttpLimits(max_messages=100)
    async with _app_client(limits) as (client, _):
        answer = await client.post("/v1/chat/completions", json={**CHAT, **change})
    assert answer.status_code == 400 and _is_openai_error(answer), answer.text
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error


# -- hypothesis: hostile bodies --------------------------------------------------------------

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["", "mock", "user", "assistant", "system", "tool", "\ud800", "x" * 5000])
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


_JSON = st.recursive(_SCALARS, _containers, max_leaves=12)
_FIELDS = st.sampled_from(
    [
        "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stream",
        "stream_options", "stop", "n", "temperature", "top_p", "seed", "tools", "tool_choice",
        "nvext", "min_tokens", "stop_token_ids", "response_format", "logit_bias", "user",
        "chat_template_kwargs", "ignore_eos", "logprobs", "echo", "best_of",
    ]
)  # fmt: skip
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"]) | _SCALARS},
    optional={"content": _JSON, "name": _JSON, "tool_calls": _JSON, "tool_call_id": _JSON},
)
_BODY = st.fixed_dictionaries(
    {"model": st.just("mock") | _SCALARS},
    optional={
        "messages": st.lists(_MESSAGE, max_size=3) | _JSON,
        "prompt": st.text(max_size=20) | st.lists(st.integers(-5, 300), max_size=5) | _JSON,
        "max_tokens": st.integers(-2, 40) | _JSON,
        "stream": st.booleans(),
    },
).flatmap(
    lambda base: st.dictionaries(_FIELDS, _JSON, max_size=3).map(lambda extra: {**base, **extra})
)


@settings(
    deadline=None,
    max_examples=60,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    body=_BODY | _JSON,
    raw=st.none() | st.binary(max_size=40),
)
async def test_hostile_bodies_get_2xx_or_an_openai_style_4xx(
    autojump_clock: object, path: str, body: Any, raw: bytes | None
) -> None:
    content = raw if raw is not None else json.dumps(body).encode()
    async with _app_client() as (client, _):
        answer = await client.post(path, content=content)
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:
        assert _is_openai_error(answer), answer.text
