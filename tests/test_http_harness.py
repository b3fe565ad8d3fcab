"""The served-instance harness the HTTP tests share, and the server's basic endpoints.

`serving` starts a real pipeline and a real Hypercorn server on 127.0.0.1 (port 0) inside the
test's trio run, with the real clock (sockets do not mix with an autojumping clock).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import pytest
import trio

from interlock import Components, Pipeline, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine, MockTiming
from interlock.http import (
    ApiKeys,
    HttpLimits,
    HttpMetrics,
    ModelRewrites,
    Preprocessor,
    build_app,
    serve_http,
)
from interlock.http._cli import mock_token_pool


@attrs.frozen
class Served:
    url: str
    pipeline: Pipeline
    workers: Sequence[MockEngine]
    prefill_workers: Sequence[MockEngine]
    metrics: HttpMetrics
    preprocessor: Preprocessor

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kwargs)

    async def wait_idle(self) -> None:
        """Wait until no worker runs anything and the router has nothing booked."""
        for _ in range(1000):
            busy = sum(w.active_requests for w in (*self.workers, *self.prefill_workers))
            if busy == 0 and await self.pipeline.load() == {} and self.pipeline.in_flight == 0:
                return
            await trio.sleep(0.01)
        raise AssertionError(
            f"still busy after 10 s: workers {[w.active_requests for w in self.workers]}, "
            f"load {await self.pipeline.load()}, in flight {self.pipeline.in_flight}"
        )


@asynccontextmanager
async def serving(
    config: PipelineConfig | None = None,
    *,
    workers: int = 2,
    prefill_workers: int = 0,
    timing: MockTiming | None = None,
    preprocessor: Preprocessor | None = None,
    model: str = "mock",
    limits: HttpLimits | None = None,
    route_api: bool = False,
    engine_kwargs: dict[str, Any] | None = None,
    api_keys: ApiKeys | None = None,
    model_rewrites: ModelRewrites | None = None,
) -> AsyncIterator[Served]:
    """A pipeline on mock workers behind a real HTTP server; closed when the block ends."""
    config = config or PipelineConfig()
    preprocessor = preprocessor or Preprocessor.default()
    tokenizer = preprocessor.tokenizer
    common: dict[str, Any] = {
        "timing": timing or MockTiming.zero(),
        "token_pool": mock_token_pool(tokenizer),
        "tokenizer": tokenizer,
        "block_size": config.kv_block_size,
        **(engine_kwargs or {}),
    }
    role = "decode" if prefill_workers else "agg"
    engines = [MockEngine(i, role, **common) for i in range(1, workers + 1)]
    prefill = [
        MockEngine(i, "prefill", **common)
        for i in range(workers + 1, workers + prefill_workers + 1)
    ]
    metrics = HttpMetrics()
    components = Components(
        workers=engines,
        prefill_workers=prefill,
        tokenizer=tokenizer,
        transition_sinks=[metrics],
    )
    with trio.fail_after(60):
        async with build_pipeline(config, components) as pipeline:
            app = build_app(
                pipeline,
                model=model,
                preprocessor=preprocessor,
                metrics=metrics,
                limits=limits,
                route_api=route_api,
                api_keys=api_keys,
                model_rewrites=model_rewrites,
            )
            async with trio.open_nursery() as nursery:
                url = await nursery.start(serve_http, app, "127.0.0.1", 0)
                yield Served(url, pipeline, engines, prefill, metrics, preprocessor)
                nursery.cancel_scope.cancel()


CHAT = {"model": "mock", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}


# -- the basic endpoints -----------------------------------------------------------------------


async def test_models_health_live_and_metrics() -> None:
    async with serving() as served, served.client() as client:
        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["mock"] and models["object"] == "list"
        assert (await client.get("/v1/models/mock")).json()["id"] == "mock"
        missing = await client.get("/v1/models/gpt-4")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
        health = await client.get("/health")
        assert health.status_code == 200 and health.json()["workers"] == [1, 2]
        assert (await client.get("/live")).json() == {"status": "live"}
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        text = (await client.get("/metrics")).text
    for name in (
        'interlock_http_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0',
        "interlock_time_to_first_token_seconds_count 1.0",
        "interlock_inter_token_latency_seconds_count 7.0",
        'interlock_transitions_total{dst="done",src="decoding",trigger="finish"} 1.0',
        "interlock_worker_routed_requests_total{",
        "interlock_router_prefix_hit_rate",
        "interlock_migrations_total 0.0",
        "interlock_fallbacks_total 0.0",
        "interlock_output_tokens_total 8.0",
    ):
        assert name in text, f"{name!r} missing from /metrics:\n{text}"


async def test_health_is_503_without_workers() -> None:
    async with serving() as served, served.client() as client:
        for worker in served.workers:
            await served.pipeline.remove_worker(worker.instance_id)
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        answer = await client.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "no_workers_available"


async def test_unknown_paths_and_methods_answer_openai_style_json() -> None:
    async with serving() as served, served.client() as client:
        missing = await client.get("/v1/embeddings")
        assert missing.status_code == 404 and "error" in missing.json()
        wrong = await client.get("/v1/chat/completions")
        assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"


async def test_streaming_connections_use_tcp_nodelay(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every connection the server accepts is a trio SocketStream; record its TCP_NODELAY.
    seen: list[int] = []
    original = trio.SocketStream.__init__

    def recording_init(self: trio.SocketStream, sock: Any) -> None:
        original(self, sock)
        seen.append(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(trio.SocketStream, "__init__", recording_init)
    async with serving() as served, served.client() as client:
        before = len(seen)
        answer = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert answer.status_code == 200
    server_side = seen[before:]
    assert server_side, "no server-side connection was recorded"
    assert all(server_side), f"TCP_NODELAY off on a server connection: {server_side}"


def test_public_surface_is_pinned() -> None:
    import interlock.http

    assert sorted(interlock.http.__all__) == [
        "ApiKeys",
        "Drain",
        "HttpError",
        "HttpLimits",
        "HttpMetrics",
        "ModelRewrites",
        "Preprocessor",
        "add_route_parser",
        "add_serve_parser",
        "build_app",
        "serve_http",
    ]
    for name in interlock.http.__all__:
        assert hasattr(interlock.http, name)


async def test_disaggregated_requests_are_counted_per_leg() -> None:
    async with serving(workers=2, prefill_workers=1) as served, served.client() as client:
        for _ in range(2):
            answer = await client.post("/v1/chat/completions", json=CHAT)
            assert answer.status_code == 200, answer.text
        text = (await client.get("/metrics")).text
    assert 'interlock_worker_routed_requests_total{leg="prefill",worker_id="3"} 2.0' in text
    assert 'leg="decode",worker_id="1"} 1.0' in text and 'leg="decode",worker_id="2"} 1.0' in text
    assert (
        'interlock_transitions_total{dst="prefilling",src="routed",trigger="start_prefill"} 2.0'
        in text
    )
