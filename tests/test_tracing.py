"""OpenTelemetry tracing: a SERVER span per HTTP request, a CLIENT span per engine leg, the
state machine's transitions as span events, and the W3C traceparent carried to the engines.

In-process tests hand the pipeline a tracer provider of their own (``Components``), so no
global OpenTelemetry state leaks between tests; the real-process test exports over OTLP/HTTP
to a small collector and reads the traceparent the engine received from its log."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
from helpers import stop_processes, wait_until
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine, MockTiming, mock_token_pool
from interlock.http import HttpMetrics, Preprocessor, build_app
from interlock.wire import PreprocessedRequest

MESSAGES = [{"role": "user", "content": "Trace me"}]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@asynccontextmanager
async def traced_app(
    config: PipelineConfig | None = None,
    *,
    engines: Sequence[dict[str, Any]] = ({}, {}),
    prefill: Sequence[dict[str, Any]] = (),
) -> AsyncIterator[tuple[httpx.AsyncClient, InMemorySpanExporter, HttpMetrics]]:
    """The app on mock workers (one per ``engines`` entry: MockEngine keyword arguments; and
    prefill workers, one per ``prefill`` entry), its spans in memory, in-process through
    httpx's ASGI transport."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    preprocessor = Preprocessor.default()
    roles = ["decode" if prefill else "agg"] * len(engines) + ["prefill"] * len(prefill)
    made = [
        MockEngine(
            i,
            role,
            token_pool=mock_token_pool(preprocessor.tokenizer),
            tokenizer=preprocessor.tokenizer,
            **{"timing": MockTiming.zero(), **kwargs},
        )
        for i, (role, kwargs) in enumerate(zip(roles, [*engines, *prefill], strict=True), start=1)
    ]
    workers = made[: len(engines)]
    metrics = HttpMetrics()
    components = Components(
        workers=workers,
        prefill_workers=made[len(engines) :],
        tokenizer=preprocessor.tokenizer,
        transition_sinks=[metrics],
        tracer_provider=provider,
    )
    async with build_pipeline(config or PipelineConfig(), components) as pipeline:
        app = build_app(pipeline, preprocessor=preprocessor, metrics=metrics)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client, exporter, metrics


def _one(spans: Sequence[ReadableSpan], kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.kind == kind]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def _legs(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_is_a_server_span_with_its_engine_leg_below(
    stream: bool, autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    async with traced_app() as (client, exporter, _):
        answer = await client.post(
            "/v1/chat/completions",
            json={"model": "mock", "messages": MESSAGES, "max_tokens": 6, "stream": stream},
            headers={"x-request-id": "client-7"},
        )
        assert answer.status_code == 200
        spans = exporter.get_finished_spans()
    server = _one(spans, SpanKind.SERVER)
    assert server.name == "POST /v1/chat/completions"
    attributes = server.attributes or {}
    assert attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "mock"
    assert attributes["x_request_id"] == "client-7"
    assert attributes["gen_ai.usage.output_tokens"] == 6
    assert attributes["gen_ai.latency.time_to_first_token"] >= 0
    assert attributes["gen_ai.latency.e2e"] >= attributes["gen_ai.latency.time_to_first_token"]
    assert "gen_ai.latency.time_in_queue" in attributes
    assert server.status.status_code == StatusCode.UNSET
    events = [e.name for e in server.events]
    assert events == ["preprocess", "route", "start_decode", "finish"]
    route = server.events[1].attributes or {}
    (leg,) = _legs(spans)
    assert leg.name == "chat mock"
    assert leg.parent is not None and leg.parent.span_id == server.context.span_id
    assert leg.context.trace_id == server.context.trace_id
    leg_attributes = leg.attributes or {}
    assert leg_attributes["interlock.leg"] == "agg"
    assert leg_attributes["interlock.worker_id"] == route["interlock.worker_id"]
    assert leg_attributes["gen_ai.system"] == "interlock"
    assert leg_attributes["gen_ai.usage.input_tokens"] == attributes["gen_ai.usage.input_tokens"]
    assert leg_attributes["gen_ai.usage.output_tokens"] == 6
    assert "Failed to detach context" not in caplog.text
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_an_incoming_traceparent_is_continued(autojump_clock: object) -> None:
    async with traced_app() as (client, exporter, _):
        answer = await client.post(
            "/v1/completions",
            json={"model": "mock", "prompt": "hello", "max_tokens": 3, "stream": True},
            headers={"traceparent": TRACEPARENT},
        )
        assert answer.status_code == 200
        spans = exporter.get_finished_spans()
    server = _one(spans, SpanKind.SERVER)
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == (
        "00f067aa0ba902b7"
    )
    (leg,) = _legs(spans)
    assert leg.name == "text_completion mock"
    assert format(leg.context.trace_id, "032x") == TRACE_ID


async def test_a_migration_gives_two_leg_spans_and_a_migrate_event(
    autojump_clock: object,
) -> None:
    async with traced_app(
        PipelineConfig(migration_limit=1), engines=({"crash_after_tokens": 3}, {})
    ) as (client, exporter, _):
        answer = await client.post(
            "/v1/chat/completions",
            json={"model": "mock", "messages": MESSAGES, "max_tokens": 8, "stream": True},
        )
        assert answer.status_code == 200 and "error" not in answer.text
        spans = exporter.get_finished_spans()
    server = _one(spans, SpanKind.SERVER)
    names = [e.name for e in server.events]
    assert names.count("migrate") == 1 and names.count("start_decode") == 2
    first, second = _legs(spans)
    assert (first.attributes or {})["interlock.worker_id"] == 1
    assert first.status.status_code == StatusCode.ERROR
    assert (first.attributes or {})["error.type"] == "WorkerGone"
    assert (second.attributes or {})["interlock.worker_id"] == 2
    assert (first.attributes or {})["gen_ai.usage.output_tokens"] == 3
    assert (second.attributes or {})["gen_ai.usage.output_tokens"] == 5
    assert second.status.status_code == StatusCode.UNSET
    assert server.status.status_code == StatusCode.UNSET


async def test_a_disaggregated_request_has_a_prefill_and_a_decode_leg(
    autojump_clock: object,
) -> None:
    async with traced_app(engines=({},), prefill=({},)) as (client, exporter, _):
        answer = await client.post(
            "/v1/chat/completions",
            json={"model": "mock", "messages": MESSAGES, "max_tokens": 4, "stream": True},
        )
        assert answer.status_code == 200
        spans = exporter.get_finished_spans()
    server = _one(spans, SpanKind.SERVER)
    assert [e.name for e in server.events] == [
        "preprocess", "route", "start_prefill", "finish_prefill", "start_decode", "finish",
    ]  # fmt: skip
    assert (server.events[1].attributes or {})["interlock.disaggregated"] is True
    prefill, decode = _legs(spans)
    assert [(leg.attributes or {})["interlock.leg"] for leg in (prefill, decode)] == [
        "prefill",
        "decode",
    ]
    assert (prefill.attributes or {})["interlock.worker_id"] == 2
    assert (decode.attributes or {})["interlock.worker_id"] == 1
    assert all(leg.parent is not None and leg.parent.span_id == server.context.span_id
               for leg in (prefill, decode))  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failed_request_sets_error_status_with_the_exception_type(
    stream: bool, autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    async with traced_app(engines=({"crash_after_tokens": 2},)) as (client, exporter, _):
        answer = await client.post(
            "/v1/chat/completions",
            json={"model": "mock", "messages": MESSAGES, "max_tokens": 8, "stream": stream},
        )
        assert answer.status_code == (200 if stream else 502)
        spans = exporter.get_finished_spans()
    server = _one(spans, SpanKind.SERVER)
    assert server.status.status_code == StatusCode.ERROR
    assert (server.attributes or {})["error.type"] == "WorkerGone"
    assert [e.name for e in server.events][-1] == "fail"
    (leg,) = _legs(spans)
    assert leg.status.status_code == StatusCode.ERROR
    assert "Failed to detach context" not in caplog.text
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_a_stream_left_early_under_an_embedders_span_leaks_no_span(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    components = Components(workers=[MockEngine(1)], tracer_provider=provider)
    request = PreprocessedRequest(token_ids=list(range(1, 33)), max_tokens=20)
    async with build_pipeline(PipelineConfig(), components) as pipeline:
        with provider.get_tracer("app").start_as_current_span("app"):
            async with aclosing(pipeline.generate(request)) as outputs:
                async for output in outputs:
                    if output.token_ids:
                        break
        assert trace.get_current_span() is trace.INVALID_SPAN
        spans = exporter.get_finished_spans()
    app = next(s for s in spans if s.name == "app")
    assert [e.name for e in app.events][-1] == "cancel"
    (leg,) = _legs(spans)
    assert leg.parent is not None and leg.parent.span_id == app.context.span_id
    assert leg.end_time is not None
    assert "Failed to detach context" not in caplog.text


async def test_queue_time_and_duration_by_status_are_metrics(autojump_clock: object) -> None:
    async with traced_app() as (client, _, _metrics):
        answer = await client.post(
            "/v1/completions", json={"model": "mock", "prompt": "hi", "max_tokens": 2}
        )
        assert answer.status_code == 200
        text = (await client.get("/metrics")).text
    assert "interlock_request_queue_time_seconds_count 1.0" in text
    assert (
        'interlock_http_request_duration_seconds_count{endpoint="/v1/completions",status="200"} 1.0'
        in text
    )


# -- real processes ---------------------------------------------------------------------------

TIMEOUT = 60


async def _start(argv: list[str], log: Path, env: dict[str, str]) -> tuple[trio.Process, str]:
    """Start ``python -m interlock ARGV``; return it with its first stdout line."""
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "interlock", *argv],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    assert process.stdout is not None
    text = b""
    with trio.fail_after(TIMEOUT):
        while b"\n" not in text:
            chunk = await process.stdout.receive_some(65536)
            assert chunk, f"{argv[0]} exited early:\n{log.read_text()}"  # noqa: ASYNC240
            text += chunk
    return process, text.decode().splitlines()[0]


async def _collector(listeners: list[trio.SocketListener], posts: list[str]) -> None:
    """A stand-in OTLP/HTTP collector: answers 200 to every request, records their paths."""

    async def handle(stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    connection.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    target = event.target.decode()
                elif isinstance(event, h11.EndOfMessage):
                    posts.append(target)
                    answer = h11.Response(status_code=200, headers=[("content-length", "0")])
                    await stream.send_all(connection.send(answer) or b"")
                    await stream.send_all(connection.send(h11.EndOfMessage()) or b"")
                    connection.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return

    await trio.serve_listeners(handle, listeners)


async def test_serve_exports_spans_and_hands_the_engine_a_traceparent(tmp_path: Path) -> None:
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    posts: list[str] = []
    processes: list[trio.Process] = []
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(_collector, listeners, posts)
        try:
            worker, line = await _start(
                ["worker", "--id", "1", "--openai-port", "0", "--zero-time", "--tokenizer",
                 "builtin", "--log-level", "debug"],
                tmp_path / "worker.log",
                env,
            )  # fmt: skip
            processes.append(worker)
            engine = json.loads(line)
            serve, line = await _start(
                ["serve", "--port", "0", "--engine", f"1={engine['openai_url']}",
                 "--otlp-endpoint", f"http://127.0.0.1:{port}"],
                tmp_path / "serve.log",
                env,
            )  # fmt: skip
            processes.append(serve)
            url = line.split("listening on ")[1].split(" ")[0]
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                answer = await client.post(
                    "/v1/chat/completions",
                    json={"model": "mock", "messages": MESSAGES, "max_tokens": 4},
                    headers={"traceparent": TRACEPARENT},
                )
                assert answer.status_code == 200, answer.text
            log = tmp_path / "worker.log"
            await wait_until(lambda: "traceparent" in log.read_text(), within=TIMEOUT)
            sent = next(
                line.split("traceparent ")[1].split()[0]
                for line in log.read_text().splitlines()
                if "traceparent" in line
            )
            version, trace_id, span_id, flags = sent.split("-")
            assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
            assert span_id != "00f067aa0ba902b7", "the engine's parent is interlock's leg span"
            await wait_until(lambda: "/v1/traces" in posts, within=TIMEOUT)
        finally:
            for process in reversed(processes):
                await stop_processes([process])
            nursery.cancel_scope.cancel()


def test_otlp_endpoint_without_the_sdk_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from interlock import ConfigError
    from interlock.http._tracing import configure_otlp

    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError, match=r"pip install 'interlock\[otel\]'"):
        configure_otlp("http://127.0.0.1:4318", {})
    assert configure_otlp(None, {}) is None
    # The standard variable alone (perhaps meant for another program) only warns.
    with caplog.at_level(logging.WARNING, logger="interlock.http"):
        assert configure_otlp(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) is None
    assert "pip install 'interlock[otel]'" in caplog.text


def test_otlp_endpoint_over_stale_otel_protos_says_how_to_put_them_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # xds-protos (the gateway's Envoy messages) ships an old opentelemetry-proto over the
    # real one whichever pip installs last (grpc/grpc#42429): the exporter then fails so.
    from importlib.abc import MetaPathFinder

    from interlock import ConfigError
    from interlock.http._tracing import configure_otlp

    name = "opentelemetry.exporter.otlp.proto.http.trace_exporter"

    class Stale(MetaPathFinder):
        def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
            if fullname == name:
                raise ImportError(
                    "cannot import name 'InstrumentationScope' from "
                    "'opentelemetry.proto.common.v1.common_pb2'"
                )

    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [Stale(), *sys.meta_path])
    with pytest.raises(ConfigError, match="grpc/grpc#42429") as caught:
        configure_otlp("http://127.0.0.1:4318", {})
    assert "pip install --force-reinstall --no-deps 'opentelemetry-proto==" in str(caught.value)


_GLOBAL_PROVIDER_SET_LATER = """
import httpx, trio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine, MockTiming, mock_token_pool
from interlock.http import Preprocessor, build_app

async def main():
    tokenizer = Preprocessor.default().tokenizer
    engine = MockEngine(1, timing=MockTiming.zero(), token_pool=mock_token_pool(tokenizer))
    components = Components(workers=[engine], tokenizer=tokenizer)
    async with build_pipeline(PipelineConfig(), components) as pipeline:
        app = build_app(pipeline)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            body = {"model": "mock", "prompt": "hi", "max_tokens": 2}
            assert (await client.post("/v1/completions", json=body)).status_code == 200
            exporter = InMemorySpanExporter()
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
            assert (await client.post("/v1/completions", json=body)).status_code == 200
    print(sorted(s.name for s in exporter.get_finished_spans() if s.kind.name == "SERVER"))

trio.run(main)
"""


def test_a_global_tracer_provider_set_after_startup_gets_the_server_spans() -> None:
    """The app traces through the API's global tracer when given no provider: a request before
    an SDK provider is installed makes no span (and skips making the no-op one), a request
    after it is a SERVER span. In a process of its own: the global provider is set once."""
    done = subprocess.run(
        [sys.executable, "-c", _GLOBAL_PROVIDER_SET_LATER],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "['POST /v1/completions']"
