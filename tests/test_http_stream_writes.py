"""What the HTTP layer writes per request: a backlog leaves in one write with an event per
output, and only a request that runs a while watches for its client going away.

The app is called as the server calls it (ASGI ``scope``, ``receive``, ``send``) on a real
pipeline over mock workers, in virtual time, so that the test decides when the client takes
each write and when it leaves.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from interlock import Components, Pipeline, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine, MockTiming
from interlock.http import HttpMetrics, Preprocessor, build_app
from interlock.http._app import WATCH_DISCONNECT_AFTER
from interlock.http._cli import mock_token_pool

Message = dict[str, Any]


@attrs.define
class _Client:
    """One request's side of the ASGI conversation: what the app sent, and how often it asked
    for more of the request (a disconnect watcher does)."""

    body: bytes
    #: Called with each ``http.response.body`` message before the app's send returns (a slow
    #: client: the send waits for it).
    on_body: Callable[[Message], Awaitable[None]] | None = None
    #: Whether the client is gone: a receive after the body answers http.disconnect at once.
    gone: bool = False
    #: A receive after the body raises (an ASGI server's receive that fails).
    broken: bool = False
    sent: list[Message] = attrs.field(factory=list)
    receives: int = 0
    #: Receives still waiting when each message was sent (a watcher that outlives its
    #: request would read the client's next request).
    waiting_at_send: list[int] = attrs.field(factory=list)
    _waiting: int = 0
    _left: trio.Event = attrs.field(factory=trio.Event)

    async def receive(self) -> Message:
        self.receives += 1
        if self.receives == 1:
            return {"type": "http.request", "body": self.body, "more_body": False}
        if self.broken:
            raise RuntimeError("the server's receive failed")
        if not self.gone:
            self._waiting += 1
            try:
                await self._left.wait()
            finally:
                self._waiting -= 1
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.waiting_at_send.append(self._waiting)
        self.sent.append(message)
        if message["type"] == "http.response.body" and self.on_body is not None:
            await self.on_body(message)

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


@attrs.frozen
class _Served:
    app: Any
    pipeline: Pipeline
    engine: MockEngine
    metrics: HttpMetrics

    async def call(self, client: _Client) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"test"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(client.body)).encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        await self.app(scope, client.receive, client.send)

    async def wait_idle(self) -> None:
        # Virtual time: polling costs nothing, and nothing signals "idle".
        while self.pipeline.in_flight or self.engine.active_requests:  # noqa: ASYNC110
            await trio.sleep(0.001)


@asynccontextmanager
async def _serving(timing: MockTiming | None = None) -> AsyncIterator[_Served]:
    preprocessor = Preprocessor.default()
    tokenizer = preprocessor.tokenizer
    engine = MockEngine(
        1,
        "agg",
        timing=timing or MockTiming(),
        token_pool=mock_token_pool(tokenizer),
        tokenizer=tokenizer,
    )
    metrics = HttpMetrics()
    components = Components(workers=[engine], tokenizer=tokenizer, transition_sinks=[metrics])
    async with build_pipeline(PipelineConfig(), components) as pipeline:
        app = build_app(pipeline, preprocessor=preprocessor, metrics=metrics)
        yield _Served(app, pipeline, engine, metrics)


def _request(stream: bool, max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": "mock",
            "messages": [{"role": "user", "content": "Tell me about railway interlockings."}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "seed": 7,
            "stream": stream,
        }
    ).encode()


def _normalised(body: bytes) -> bytes:
    """The stream without what differs between two requests: their id and creation time."""
    body = re.sub(rb'"id":"[^"]*"', b'"id":"-"', body)
    return re.sub(rb'"created":\d+', b'"created":0', body)


async def test_a_backlog_leaves_in_one_write_with_an_event_per_output(
    autojump_clock: object,
) -> None:
    async with _serving() as served:
        keeping_up = _Client(_request(True, 24))
        await served.call(keeping_up)

        async def fall_behind(message: Message) -> None:
            # The first write waits until the answer is complete on the server.
            if len(behind.bodies) == 1:
                await served.wait_idle()

        behind = _Client(_request(True, 24), on_body=fall_behind)
        await served.call(behind)
    # The client that fell behind got the rest in one write ...
    assert len(behind.bodies) == 2, behind.bodies
    # ... of the same events, byte for byte, as the client that kept up: one per output.
    assert _normalised(b"".join(behind.bodies)) == _normalised(b"".join(keeping_up.bodies))
    assert behind.bodies[1].endswith(b"data: [DONE]\n\n")
    assert behind.bodies[1].count(b"data: ") > 10, "the backlog is many events, not one"
    assert len(keeping_up.bodies) > 10, "outputs that arrive one by one are written one by one"


async def test_a_short_answer_never_watches_for_its_client(autojump_clock: object) -> None:
    async with _serving(MockTiming.zero()) as served:
        for stream in (False, True):
            client = _Client(_request(stream, 8))
            await served.call(client)
            assert client.sent[0]["status"] == 200
            # Only the request body was received: no task waited on http.disconnect.
            assert client.receives == 1, (stream, client.receives)


async def test_a_long_request_whose_client_left_is_cancelled(autojump_clock: object) -> None:
    # Real mock-model time (virtual here): 5000 tokens would take far longer than the watch
    # delay, so only noticing the client gone ends them.
    async with _serving(MockTiming(speedup_ratio=1.0)) as served:
        for stream in (False, True):
            client = _Client(_request(stream, 5000), gone=True)
            with trio.fail_after(WATCH_DISCONNECT_AFTER + 60):
                await served.call(client)
            await served.wait_idle()
            assert client.receives == 2, "the watcher asked once, and learnt the client left"
        assert served.engine.requests_cancelled == 2
        assert served.engine.requests_finished == 0
        assert served.metrics.requests.get(("/v1/chat/completions", "499")) == 2
        paths = [
            served.pipeline.transition_log.path(r)
            for r in served.pipeline.transition_log.by_request()
        ]
        assert paths == [["received", "preprocessed", "routed", "decoding", "cancelled"]] * 2


async def test_a_long_answer_whose_client_stays_ends_its_watcher_before_answering(
    autojump_clock: object,
) -> None:
    # A whole answer runs in one task: its watcher runs beside it (a system task), and must
    # be gone before the answer goes, since the connection then reads the next request.
    async with _serving(MockTiming(speedup_ratio=1.0)) as served:
        client = _Client(_request(False, 400))
        started = trio.current_time()
        await served.call(client)
        assert trio.current_time() - started > WATCH_DISCONNECT_AFTER
        assert client.sent[0]["status"] == 200
        assert client.receives == 2, "the watcher asked once"
        assert client.waiting_at_send == [0, 0], "the watcher ended before the answer"
        await served.wait_idle()
        assert served.engine.requests_finished == 1


async def test_a_request_with_no_output_yet_whose_client_left_is_cancelled(
    autojump_clock: object,
) -> None:
    # Waiting for a first token (a long prefill, a queue) gives no output to notice the time
    # by: the watchdog starts the watcher anyway, so the client's leaving frees the worker.
    async with _serving() as served:
        for stream in (False, True):
            served.engine.stall(600)
            client = _Client(_request(stream, 8), gone=True)
            started = trio.current_time()
            await served.call(client)
            assert trio.current_time() - started <= 1.5 * WATCH_DISCONNECT_AFTER
            assert client.receives == 2
            assert not any(m["type"] == "http.response.body" for m in client.sent)
            await served.wait_idle()
        assert served.engine.requests_finished == 0
        assert served.metrics.requests.get(("/v1/chat/completions", "499")) == 2


async def test_a_failing_receive_leaves_the_answer_unwatched_and_logs_its_request(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    # The watcher of a whole answer is a system task, outside the request's context: its log
    # line names the request itself, and its failure must not end the answer (nor the run).
    async with _serving(MockTiming(speedup_ratio=1.0)) as served:
        client = _Client(_request(False, 400), broken=True)
        with caplog.at_level(logging.ERROR, logger="interlock"):
            await served.call(client)
        assert client.sent[0]["status"] == 200
        answer = json.loads(b"".join(client.bodies))
        assert answer["usage"]["completion_tokens"] == 400
        assert client.receives == 2, "the watcher asked once"
        failures = [r for r in caplog.records if "going away failed" in r.getMessage()]
        assert len(failures) == 1 and answer["id"] in failures[0].getMessage()
        await served.wait_idle()
        assert served.engine.requests_finished == 1
