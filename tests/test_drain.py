"""Draining on SIGTERM: ``interlock serve`` and ``interlock worker`` finish what is in flight.

Real processes on 127.0.0.1 with the real clock; the mock model runs at ``--speedup 1`` (about
6 ms a token) so that streams are still running when the signal arrives. Every wait polls a
condition under ``trio.fail_after``; every process is killed in a ``finally``.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from helpers import side_by_side
from test_etcd_discovery import PREFIX, Etcd, etcd, wait_for  # noqa: F401 (etcd: a fixture)
from test_http_cli import _serve_process
from test_http_remote_workers import serving_over
from test_remote_workers import WorkerProcess, start_worker, stop

from interlock import Components, PipelineConfig, WorkerRefused, build_pipeline
from interlock.discovery import EtcdClient, worker_key
from interlock.engines.mock import MockEngine, mock_token_pool
from interlock.http import Drain, HttpMetrics, Preprocessor, build_app
from interlock.http._cli import call_asgi
from interlock.wire import PreprocessedRequest

TIMEOUT = 60
#: Tokens per stream: about 3 s at --speedup 1, long enough to be in flight at the signal.
TOKENS = 500


@attrs.define
class Stream:
    """One streaming completion as a client saw it."""

    events: list[Any] = attrs.field(factory=list)
    done: bool = False
    text: str = ""

    @property
    def started(self) -> bool:
        return bool(self.events)

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [e["error"] for e in self.events if "error" in e]

    @property
    def usage(self) -> dict[str, Any] | None:
        return next((e["usage"] for e in self.events if e.get("usage")), None)

    @property
    def finish_reason(self) -> str | None:
        return next(
            (
                c["finish_reason"]
                for e in self.events
                for c in e.get("choices", ())
                if c.get("finish_reason")
            ),
            None,
        )


async def read_stream(client: httpx.AsyncClient, n: int, tokens: int, stream: Stream) -> None:
    body = {
        "model": "mock",
        "prompt": f"Stream number {n} tells a long story.",
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                stream.done = True
                continue
            event = json.loads(data)
            stream.events.append(event)
            for choice in event.get("choices", ()):
                stream.text += choice.get("text") or ""


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    await wait_for(condition, what, within=TIMEOUT)


def completion(tokens: int = 4) -> dict[str, Any]:
    return {"model": "mock", "prompt": "hi", "max_tokens": tokens}


async def _stderr(process: trio.Process) -> str:
    assert process.stderr is not None
    parts = []
    while chunk := await process.stderr.receive_some(65536):
        parts.append(chunk)
    return b"".join(parts).decode()


# -- interlock serve ---------------------------------------------------------------------------


async def test_sigterm_lets_the_streams_in_flight_finish_and_answers_503_meanwhile() -> None:
    process, url, _ = await _serve_process(
        "serve", "--port", "0", "--speedup", "1", "--workers", "2"
    )
    try:
        with trio.fail_after(TIMEOUT):
            streams = [Stream() for _ in range(8)]
            async with (
                httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client,
                trio.open_nursery() as nursery,
            ):
                assert (await client.get("/health")).status_code == 200
                for n, stream in enumerate(streams):
                    nursery.start_soon(read_stream, client, n, TOKENS, stream)
                await wait_until(lambda: all(s.started for s in streams), "8 streams to start")
                process.send_signal(signal.SIGTERM)
                # A fresh connection each, as a load balancer's health check makes.
                async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as fresh:
                    while (health := await fresh.get("/health")).status_code == 200:  # noqa: ASYNC110
                        await trio.sleep(0.01)  # the signal is on its way
                    assert health.status_code == 503
                    assert health.json()["status"] == "draining"
                    refused = await fresh.post("/v1/completions", json=completion())
                    assert refused.status_code == 503
                    assert refused.headers["connection"] == "close"
                    assert refused.json()["error"]["code"] == "shutting_down"
                    metrics = (await fresh.get("/metrics")).text
                    assert "interlock_draining 1.0" in metrics
            code = await process.wait()
            stderr = await _stderr(process)
        assert code == 0, stderr
        for stream in streams:
            assert stream.done and not stream.errors, stream.events[-3:]
            assert stream.finish_reason == "length"
            assert stream.usage is not None and stream.usage["completion_tokens"] == TOKENS
        assert "SIGTERM, stopping: draining 8 request(s)" in stderr, stderr
        assert "drained: 8 request(s) finished, 0 cut" in stderr, stderr
        assert "1 new one(s) refused" in stderr, stderr
        # Gone: a new connection is refused.
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
                await client.get("/health")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_end_of_the_grace_period_cuts_streams_with_an_sse_error_event() -> None:
    process, url, _ = await _serve_process(
        "serve", "--port", "0", "--speedup", "1", "--workers", "2", "--drain-timeout", "1"
    )
    # Far longer than the grace period: these never finish by themselves.
    long = 20_000
    try:
        with trio.fail_after(TIMEOUT):
            streams = [Stream() for _ in range(4)]
            whole: list[httpx.Response] = []

            async def non_stream(client: httpx.AsyncClient) -> None:
                body = completion(long) | {"ignore_eos": True}
                whole.append(await client.post("/v1/completions", json=body))

            async with (
                httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client,
                trio.open_nursery() as nursery,
            ):
                for n, stream in enumerate(streams):
                    nursery.start_soon(read_stream, client, n, long, stream)
                nursery.start_soon(non_stream, client)
                await wait_until(lambda: all(s.started for s in streams), "4 streams to start")
                while (  # noqa: ASYNC110 (another process: polling is the point)
                    "interlock_http_requests_in_flight 5.0"
                    not in (await client.get("/metrics")).text
                ):
                    await trio.sleep(0.01)  # the non-streaming request is on its way
                process.send_signal(signal.SIGTERM)
            code = await process.wait()
            stderr = await _stderr(process)
        assert code == 0, stderr
        for stream in streams:
            assert stream.done, stream.events[-3:]
            assert [e["code"] for e in stream.errors] == ["shutting_down"], stream.events[-3:]
            assert stream.finish_reason is None
        assert whole[0].status_code == 503
        assert whole[0].json()["error"]["code"] == "shutting_down"
        assert "drained: 0 request(s) finished, 5 cut" in stderr, stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_second_signal_stops_at_once() -> None:
    process, url, _ = await _serve_process(
        "serve", "--port", "0", "--speedup", "1", "--workers", "1"
    )
    try:
        with trio.fail_after(TIMEOUT):
            stream = Stream()
            async with (
                httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(read_stream, client, 0, 20_000, stream)
                await wait_until(lambda: stream.started, "the stream to start")
                process.send_signal(signal.SIGINT)  # Ctrl-C drains too (30 s by default) ...
                async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as fresh:
                    while (await fresh.get("/health")).status_code == 200:  # noqa: ASYNC110
                        await trio.sleep(0.01)  # the signal is on its way
                process.send_signal(signal.SIGINT)  # ... and the second one stops at once.
            code = await process.wait()
            stderr = await _stderr(process)
        assert code == 0, stderr
        assert stream.done and [e["code"] for e in stream.errors] == ["shutting_down"], stderr
        assert "SIGINT again, stopping at once" in stderr, stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# -- interlock worker --------------------------------------------------------------------------


@pytest.mark.parametrize("drain_timeout", ["30", "0"])
async def test_a_draining_worker_finishes_or_hands_over_its_streams(
    tmp_path: Path, drain_timeout: str
) -> None:
    flags = ["--speedup", "1", "--tokenizer", "builtin", "--log-level", "warning"]
    flags += ["--drain-timeout", drain_timeout]
    serve_flags = ("--migration-limit", "1", "--router-mode", "round_robin")
    async with serving_over(tmp_path, flags, *serve_flags) as (serve, workers):
        draining = workers[1]
        with trio.fail_after(TIMEOUT):
            streams = [Stream() for _ in range(8)]
            async with serve.client() as client, trio.open_nursery() as nursery:
                for n, stream in enumerate(streams):
                    nursery.start_soon(read_stream, client, n, TOKENS, stream)
                await wait_until(lambda: all(s.started for s in streams), "8 streams to start")
                draining.process.send_signal(signal.SIGTERM)
                # It leaves routing at once: new requests go to worker 2 only.
                while (await client.get("/health")).json()["workers"] != [2]:  # noqa: ASYNC110
                    await trio.sleep(0.01)  # the worker-left frame is on its way
                for _ in range(2):
                    body = completion() | {"nvext": {"extra_fields": ["worker_id"]}}
                    answer = (await client.post("/v1/completions", json=body)).json()
                    assert answer["nvext"]["worker_id"]["decode_worker_id"] == 2
                assert await draining.process.wait() == 0
        for stream in streams:
            assert stream.done and not stream.errors, stream.events[-3:]
            assert stream.usage is not None and stream.usage["completion_tokens"] == TOKENS
        async with serve.client() as client:
            metrics = (await client.get("/metrics")).text
        log = draining.log_text()
        if drain_timeout == "30":
            # They finished where they ran.
            assert "drained: 4 stream(s) finished, 0 cut" in log, log
            assert "interlock_migrations_total 0.0" in metrics
        else:
            # Cut at once: the frontend continued them on worker 2, every token once.
            assert "drained: 0 stream(s) finished, 4 cut" in log, log
            assert "interlock_migrations_total 4.0" in metrics


async def test_a_draining_worker_leaves_etcd_first(etcd: Etcd, tmp_path: Path) -> None:  # noqa: F811
    worker = await start_worker(
        tmp_path,
        1,
        "--speedup",
        "1",
        "--tokenizer",
        "builtin",
        "--etcd",
        etcd.url,
        "--etcd-prefix",
        PREFIX,
        "--etcd-ttl",
        "30",
    )
    key = worker_key(PREFIX, 1)
    try:
        with trio.fail_after(TIMEOUT):
            async with EtcdClient(etcd.url) as store, trio.open_nursery() as nursery:
                assert (await store.get_prefix(key))[0] != []
                engine = worker.engine()
                await nursery.start(engine.run)
                request = PreprocessedRequest(
                    token_ids=tuple(range(65, 113)),
                    max_tokens=20_000,
                    ignore_eos=True,
                    request_id="long",
                )
                async with engine.open_stream(request) as outputs:
                    await outputs.__anext__()
                    worker.process.send_signal(signal.SIGTERM)
                    # The TTL is 30 s: only the revoked lease removes the key this soon.
                    while (await store.get_prefix(key))[0] != []:  # noqa: ASYNC110
                        await trio.sleep(0.02)  # the revocation is on its way
                    assert worker.process.returncode is None  # still draining our stream
                    await wait_until(lambda: not engine.registered, "the worker-left frame")
                    with pytest.raises(WorkerRefused, match="is draining"):
                        async with engine.open_stream(
                            attrs.evolve(request, request_id="new")
                        ) as refused:
                            await refused.__anext__()
                    await outputs.__anext__()  # ours still runs
                # Leaving the stream cancels it: nothing is left to drain.
                assert await worker.process.wait() == 0
                nursery.cancel_scope.cancel()
        assert "drained: 1 stream(s) finished, 0 cut" in worker.log_text()
    finally:
        await stop(worker)


async def test_streams_finish_on_a_draining_worker_found_in_etcd_without_migration(
    etcd: Etcd,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Migration off (the default): only a drain that lets the streams finish where they run
    # completes them all.
    flags = ["--speedup", "1", "--tokenizer", "builtin", "--log-level", "warning"]
    flags += ["--etcd", etcd.url, "--etcd-prefix", PREFIX, "--etcd-ttl", "30"]
    workers: list[WorkerProcess] = []
    await side_by_side(*(partial(start_worker, tmp_path, i, *flags) for i in (1, 2)), into=workers)
    process, url, banner = await _serve_process(
        "serve", "--port", "0", "--etcd", etcd.url, "--etcd-prefix", PREFIX,
        "--router-mode", "round_robin",
    )  # fmt: skip
    try:
        assert any("found worker 1, worker 2" in line for line in banner), banner
        draining = workers[0]
        with trio.fail_after(TIMEOUT):
            streams = [Stream() for _ in range(8)]
            async with (
                httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client,
                trio.open_nursery() as nursery,
            ):
                for n, stream in enumerate(streams):
                    nursery.start_soon(read_stream, client, n, TOKENS, stream)
                await wait_until(lambda: all(s.started for s in streams), "8 streams to start")
                draining.process.send_signal(signal.SIGTERM)
                while (await client.get("/health")).json()["workers"] != [2]:  # noqa: ASYNC110
                    await trio.sleep(0.01)  # the record's deletion is on its way
                assert await draining.process.wait() == 0
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
                metrics = (await client.get("/metrics")).text
        for stream in streams:
            assert stream.done and not stream.errors, stream.events[-3:]
            assert stream.usage is not None and stream.usage["completion_tokens"] == TOKENS
        assert "interlock_migrations_total 0.0" in metrics
        assert "drained: 4 stream(s) finished, 0 cut" in draining.log_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for worker in workers:
            await stop(worker)


# -- the embedding API, in-process under virtual time ------------------------------------------


@asynccontextmanager
async def embedded_app(*, route_api: bool = False) -> AsyncIterator[Any]:
    """`build_app` over one timed mock worker (virtual time: autojump_clock)."""
    preprocessor = Preprocessor.default()
    tokenizer = preprocessor.tokenizer
    engine = MockEngine(1, "agg", token_pool=mock_token_pool(tokenizer), tokenizer=tokenizer)
    metrics = HttpMetrics()
    components = Components(workers=[engine], tokenizer=tokenizer, transition_sinks=[metrics])
    async with build_pipeline(PipelineConfig(), components) as pipeline:
        yield build_app(pipeline, preprocessor=preprocessor, metrics=metrics, route_api=route_api)


async def _stream_in_process(app: Any, tokens: int, into: list[bytes]) -> None:
    body = json.dumps(
        {
            "model": "mock",
            "prompt": "Once",
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    status, answer = await call_asgi(app, "POST", "/v1/completions", body)
    into.append(answer)
    assert status == 200


@pytest.mark.parametrize(("grace", "cut"), [(600.0, False), (1.0, True)])
async def test_an_embedder_drains_with_drain_run(
    autojump_clock: trio.testing.MockClock, grace: float, cut: bool
) -> None:
    async with embedded_app() as app, trio.open_nursery() as nursery:
        drain: Drain = app.state.drain
        bodies: list[bytes] = []
        # 2000 tokens take about 12 s of the mock model's (virtual) time.
        nursery.start_soon(_stream_in_process, app, 2000, bodies)
        await wait_for(lambda: drain.in_flight == 1, "the stream to start")
        nursery.start_soon(drain.run, grace)
        await wait_for(lambda: drain.draining, "the drain to start")
        status, health = await call_asgi(app, "GET", "/health")
        assert status == 503 and json.loads(health)["status"] == "draining"
        status, refused = await call_asgi(app, "POST", "/v1/completions", b"{}")
        assert status == 503 and json.loads(refused)["error"]["code"] == "shutting_down"
        await drain.wait_drained()
    (body,) = bodies
    events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    if cut:
        assert last["error"]["code"] == "shutting_down"
        assert (drain.finished, drain.cut_requests, drain.refused) == (0, 1, 1)
    else:
        assert last["choices"][0]["finish_reason"] == "length"
        assert (drain.finished, drain.cut_requests, drain.refused) == (1, 0, 1)


async def test_a_draining_router_refuses_new_routes_but_releases_its_bookings() -> None:
    async with embedded_app(route_api=True) as app:
        drain: Drain = app.state.drain
        route = json.dumps({"token_ids": [72, 101, 108], "request_id": "gw-1", "book": True})
        status, _ = await call_asgi(app, "POST", "/v1/route", route.encode())
        assert status == 200
        drain.start()
        status, refused = await call_asgi(app, "POST", "/v1/route", route.encode())
        assert status == 503 and json.loads(refused)["error"]["code"] == "shutting_down"
        # What the gateway booked before the drain is still released.
        status, _ = await call_asgi(app, "POST", "/v1/route/gw-1/free")
        assert status == 200
