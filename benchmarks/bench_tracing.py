"""What tracing costs a request: the HTTP app driven in-process through raw ASGI calls.

Four cases on zero-time mock workers, each run back to back with tracing off in one process:
tracing off (the OpenTelemetry API alone, no SDK: what every install runs), the SDK with
sampling off (``ALWAYS_OFF``), the SDK recording every span into an exporter that drops them,
and the same with 64 output tokens (tokens make no tracing call). It prints CPU microseconds
per request (process time: other processes on a busy machine do not count) and the median of
the repeats' ratios to tracing off. ASGI is called directly (no sockets, no HTTP client), so
the frontend's own work is most of what is measured.

    python benchmarks/bench_tracing.py [--requests N] [--repeats R] [--only-off]

``--only-off`` runs just the first case, which also runs on a checkout without tracing (for
a before/after comparison: ``PYTHONPATH=<checkout> python benchmarks/bench_tracing.py
--only-off``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import trio

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine, MockTiming, mock_token_pool
from interlock.http import HttpMetrics, Preprocessor, build_app


async def _run(provider: Any, n: int, max_tokens: int, stream: bool) -> float:
    """Seconds per request over ``n`` requests."""
    preprocessor = Preprocessor.default()
    workers = [
        MockEngine(
            i,
            timing=MockTiming.zero(),
            token_pool=mock_token_pool(preprocessor.tokenizer),
            tokenizer=preprocessor.tokenizer,
        )
        for i in (1, 2)
    ]
    metrics = HttpMetrics()
    extra = {} if provider is None else {"tracer_provider": provider}
    components = Components(
        workers=workers, tokenizer=preprocessor.tokenizer, transition_sinks=[metrics], **extra
    )
    body = json.dumps(
        {"model": "mock", "prompt": "hello there", "max_tokens": max_tokens, "stream": stream}
    ).encode()
    async with build_pipeline(PipelineConfig(), components) as pipeline:
        app = build_app(pipeline, preprocessor=preprocessor, metrics=metrics)
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/completions",
            "headers": [(b"content-type", b"application/json")],
            "query_string": b"",
        }

        async def one() -> None:
            sent = False
            done = trio.Event()

            async def receive() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await done.wait()
                return {"type": "http.disconnect"}

            async def send(message: Any) -> None:
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    done.set()

            await app(dict(scope), receive, send)

        for _ in range(min(n, 200)):  # warm up
            await one()
        start = time.process_time()
        for _ in range(n):
            await one()
        return (time.process_time() - start) / n


def _providers() -> list[tuple[str, Any, int]]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    recording = TracerProvider()
    recording.add_span_processor(SimpleSpanProcessor(Drop()))
    return [
        ("SDK, sampler always_off", TracerProvider(sampler=ALWAYS_OFF), 4),
        ("SDK, every span recorded", recording, 4),
        ("SDK, every span recorded, 64 tokens", recording, 64),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only-off", action="store_true")
    args = parser.parse_args()
    cases: list[tuple[str, Any, int]] = [("tracing off (API only)", None, 4)]
    if not args.only_off:
        cases += _providers()
    print(f"{'case':40} {'µs/request':>11} {'ratio to off':>13}")
    for name, provider, tokens in cases:
        # Each repeat runs tracing off and the case back to back; the ratio is the median of
        # the repeats' ratios, which a busy machine disturbs far less than the figures.
        seconds: list[float] = []
        ratios: list[float] = []
        for _ in range(args.repeats):
            off = trio.run(_run, None, args.requests, tokens, True)
            case = (
                off if provider is None else trio.run(_run, provider, args.requests, tokens, True)
            )
            seconds.append(case)
            ratios.append(case / off)
        median = statistics.median(seconds) * 1e6
        print(f"{name:40} {median:11.1f} {statistics.median(ratios):13.3f}")


if __name__ == "__main__":
    main()
