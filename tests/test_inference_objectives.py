"""GAIE's InferenceObjective priorities and flow fairness, from the request headers
``x-gateway-inference-objective`` and ``x-gateway-inference-fairness-id``: configured with
``--objective NAME=PRIORITY`` (or the ``[objectives]`` table), honoured by the endpoint
picker (in-process, virtual time) and by ``interlock serve`` (a real process, over HTTP with
httpx and the official client): higher priority first, negative sheddable (429 at once while
every worker is full), an objective not configured counting as 0, and flows taking turns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
from helpers import frontend_parser
from test_gateway_ext_proc import (
    KV,
    HttpMock,
    chat_body,
    immediate,
    load_is_zero,
    request_body,
    request_headers,
    set_headers,
)
from test_overload_http import TIMEOUT, serving

from interlock import Components, ConfigError, build_pipeline
from interlock._config import resolve_objectives
from interlock.engines.mock import MockTiming, mock_token_pool
from interlock.gateway import ExtProcPicker
from interlock.http import HttpMetrics, Preprocessor, build_app
from interlock.http._cli import resolve

OBJECTIVES = {"critical": 5, "standard": 0, "batch": -1}

# -- configuration ----------------------------------------------------------------------------


def test_flags_and_the_toml_table_give_the_priorities_and_a_flag_wins(tmp_path: Path) -> None:
    path = tmp_path / "interlock.toml"
    path.write_text('router_mode = "kv"\n[objectives]\ncritical = 3\nbatch = -1\n"a/b" = 2\n')
    args = frontend_parser().parse_args(
        ["serve", "--config", str(path), "--objective", "critical=7", "--objective", "chat=1"]
    )
    setup = resolve(args)
    assert setup.objectives == {"critical": 7, "batch": -1, "a/b": 2, "chat": 1}
    assert setup.config.router_mode == "kv"  # the table holds no knobs
    assert resolve(frontend_parser().parse_args(["serve"])).objectives == {}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["critical"], "--objective 'critical': no '='"),
        (["critical=high"], "--objective 'critical=high': the priority must be a whole number"),
        (["critical=1.5"], "must be a whole number"),
        (["=3"], "an objective's name must be"),
        (["critical=1", "critical=2"], "the objective 'critical' is given twice"),
    ],
)
def test_a_bad_objective_flag_is_a_config_error_naming_it(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        resolve_objectives(flags, {})
    assert caught.value.knobs == ("objectives",)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[objectives]\ncritical = "high"\n', r"\[objectives\] 'critical': the priority must be"),
        ("[objectives]\ncritical = 1.5\n", "must be a whole number"),
        ("[objectives]\ncritical = true\n", "must be a whole number"),
        ("objectives = 3\n", r"\[objectives\] must be a table of NAME = PRIORITY"),
        ("[objectives]\ncritical = 1\ncritical = 2\n", "not valid TOML"),
    ],
)
def test_a_bad_objectives_table_is_a_config_error_naming_the_file_and_entry(
    tmp_path: Path, table: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(table)
    args = frontend_parser().parse_args(["route", "--config", str(path)])
    with pytest.raises(ConfigError, match=message) as caught:
        resolve(args)
    assert str(path) in str(caught.value)


# -- the endpoint picker ------------------------------------------------------------------------


@attrs.define
class Picker:
    picker: ExtProcPicker
    pipeline: Any


@asynccontextmanager
async def picker(**knobs: Any) -> AsyncIterator[Picker]:
    """A picker over one HTTP mock worker with one slot, and `OBJECTIVES`."""
    preprocessor = Preprocessor.default()
    tokenizer = preprocessor.tokenizer
    engine = HttpMock(
        1,
        timing=MockTiming.zero(),
        token_pool=mock_token_pool(tokenizer),
        tokenizer=tokenizer,
        block_size=KV.kv_block_size,
    )
    engine.base_url = "http://10.0.0.1:8000"
    config = KV.evolve(max_inflight_per_worker=1, **knobs)
    metrics = HttpMetrics()
    components = Components(workers=[engine], tokenizer=tokenizer, transition_sinks=[metrics])
    async with build_pipeline(config, components) as pipeline:
        app = build_app(
            pipeline,
            model="mock",
            preprocessor=preprocessor,
            metrics=metrics,
            objectives=OBJECTIVES,
        )
        yield Picker(ExtProcPicker(app.state.frontend), pipeline)


class Stream:
    """One ext_proc stream held open (its booking lasts until `end`)."""

    def __init__(self, p: Picker, nursery: trio.Nursery, name: str, **headers: str) -> None:
        self.name = name
        self.answers: list[Any] = []
        self.picked = trio.Event()
        self._send, receive = trio.open_memory_channel[Any](4)
        nursery.start_soon(self._run, p, receive)
        extra = [(k.replace("_", "-"), v) for k, v in headers.items()]
        self._send.send_nowait(request_headers(extra=extra))
        self._send.send_nowait(request_body(chat_body(f"request {name}"), True))

    async def _run(self, p: Picker, receive: Any) -> None:
        async for answer in p.picker.process(receive):
            self.answers.append(answer)
            self.picked.set()

    async def end(self) -> None:
        await self._send.aclose()


async def queued(p: Picker, nursery: trio.Nursery, name: str, **headers: str) -> Stream:
    """A `Stream`, once it waits in the queue (so that the streams queue in creation order)."""
    before = p.pipeline.queued
    stream = Stream(p, nursery, name, **headers)
    await trio.testing.wait_all_tasks_blocked()
    assert p.pipeline.queued == before + 1
    return stream


async def test_a_pick_waits_with_its_objectives_priority_and_an_unknown_one_counts_as_0(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picker(max_queued_requests=10) as p:
        async with trio.open_nursery() as nursery:
            order: list[str] = []
            holder = Stream(p, nursery, "holder")
            await holder.picked.wait()
            waiting = [
                Stream(p, nursery, "unknown", x_gateway_inference_objective="no-such-objective"),
                Stream(p, nursery, "none"),
                Stream(p, nursery, "critical", x_gateway_inference_objective="critical"),
                Stream(p, nursery, "standard", x_gateway_inference_objective="standard"),
            ]
            await trio.testing.wait_all_tasks_blocked()
            assert p.pipeline.queued == 4  # an unknown objective waits: it is not sheddable
            await holder.end()
            for _ in waiting:
                await trio.testing.wait_all_tasks_blocked()
                stream = next(s for s in waiting if s.picked.is_set() and s.name not in order)
                order.append(stream.name)
                assert "x-gateway-destination-endpoint" in set_headers(
                    stream.answers[0], "request_headers"
                )
                await stream.end()
            # Priority 5 first, then the three of priority 0, oldest first.
            assert order == ["critical", "unknown", "none", "standard"]
        assert await load_is_zero(p.pipeline)


async def test_a_sheddable_objective_is_429_while_the_pool_is_full_and_picked_when_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picker(max_queued_requests=10) as p:
        async with trio.open_nursery() as nursery:
            holder = Stream(p, nursery, "holder")
            await holder.picked.wait()
            shed = Stream(p, nursery, "batch", x_gateway_inference_objective="batch")
            await shed.picked.wait()
            status, error = immediate(shed.answers)
            assert status == 429 and error["error"]["code"] == "overloaded"
            assert "sheddable (priority -1 < 0)" in error["error"]["message"]
            await holder.end()
        async with trio.open_nursery() as nursery:
            again = Stream(p, nursery, "batch", x_gateway_inference_objective="batch")
            await again.picked.wait()
            assert "x-gateway-destination-endpoint" in set_headers(
                again.answers[0], "request_headers"
            )
            await again.end()
        assert await load_is_zero(p.pipeline)


async def test_picks_of_different_flows_take_turns(autojump_clock: trio.testing.MockClock) -> None:
    async with picker(max_queued_requests=20) as p, trio.open_nursery() as nursery:
        holder = Stream(p, nursery, "holder")
        await holder.picked.wait()
        waiting = [
            await queued(p, nursery, f"{flow}{i}", x_gateway_inference_fairness_id=flow)
            for flow, count in (("bulk", 5), ("chat", 2))
            for i in range(count)
        ]
        order: list[str] = []
        await holder.end()
        for _ in waiting:
            await trio.testing.wait_all_tasks_blocked()
            stream = next(s for s in waiting if s.picked.is_set() and s.name not in order)
            order.append(stream.name)
            await stream.end()
        # The chat flow arrived behind five of bulk, and alternates with it.
        assert order == ["bulk0", "chat0", "bulk1", "chat1", "bulk2", "bulk3", "bulk4"]


# -- interlock serve ------------------------------------------------------------------------------


def _body(index: int, max_tokens: int = 60) -> dict[str, Any]:
    return {
        "model": "mock",
        "prompt": f"request {index}: tell me a long story",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }


async def test_serve_honours_the_objective_header_and_keeps_positive_ones_for_trusted_keys(
    tmp_path: Path,
) -> None:
    config = tmp_path / "interlock.toml"
    config.write_text("[objectives]\ncritical = 5\nbatch = -1\n")
    # A tenth of real speed: the holder's 4000 tokens take minutes, far past the test's
    # timeout, so it holds the only slot until the test releases it (hangs up).
    flags = ["--workers", "1", "--speedup", "0.1", "--max-inflight-per-worker", "1"]
    flags += ["--max-queued-requests", "4", "--config", str(config)]
    flags += ["--api-key", "user-key", "--trusted-api-key", "ops-key"]
    async with serving(*flags) as url:
        trusted = {"authorization": "Bearer ops-key"}
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, headers=trusted) as http:
            # An ordinary key may not jump the queue with an objective...
            refused = await http.post(
                "/v1/completions",
                json=_body(0, 5) | {"stream": False},
                headers={
                    "authorization": "Bearer user-key",
                    "x-gateway-inference-objective": "critical",
                },
            )
            assert refused.status_code == 403, refused.text
            error = refused.json()["error"]
            assert error["param"] == "x-gateway-inference-objective"
            assert error["code"] == "permission_denied"
            # ... but may name a sheddable one or one not configured.
            for objective in ("batch", "nobody-configured-this"):
                ok = await http.post(
                    "/v1/completions",
                    json=_body(0, 5) | {"stream": False},
                    headers={
                        "authorization": "Bearer user-key",
                        "x-gateway-inference-objective": objective,
                    },
                )
                assert ok.status_code == 200, ok.text

            finished: list[str] = []

            async def one(name: str, objective: str | None) -> None:
                headers = {} if objective is None else {"x-gateway-inference-objective": objective}
                await _finish(http, finished, name, headers)

            async with trio.open_nursery() as nursery:
                holder = trio.CancelScope()
                await nursery.start(_hold, http, holder)
                nursery.start_soon(one, "plain", None)
                await _wait_queued(http, 1)
                nursery.start_soon(one, "critical", "critical")
                await _wait_queued(http, 2)
                # A sheddable objective is refused at once while every worker is full.
                client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="ops-key", max_retries=0)
                try:
                    with pytest.raises(openai.RateLimitError) as shed:
                        await client.completions.create(
                            model="mock",
                            prompt="batch work",
                            max_tokens=5,
                            extra_headers={"x-gateway-inference-objective": "batch"},
                        )
                    assert shed.value.code == "overloaded"
                finally:
                    await client.close()
                holder.cancel()  # the holder hangs up: its slot frees
            # The critical request, younger than the plain one, got the slot first.
            assert finished == ["critical", "plain"]


async def test_an_ordinary_keys_requests_are_one_flow_whatever_fairness_id_they_send(
    tmp_path: Path,
) -> None:
    # Tenant a sends a fresh fairness id with each request, hoping for a flow (a turn) each;
    # tenant b sends one request, naming a's first flow. Both keys are ordinary: each key is
    # one flow, so b's request goes right after a's first, not behind all of a's.
    flags = ["--workers", "1", "--speedup", "0.1", "--max-inflight-per-worker", "1"]
    flags += ["--api-key", "tenant-a", "--api-key", "tenant-b", "--trusted-api-key", "ops-key"]
    async with serving(*flags) as url:
        trusted = {"authorization": "Bearer ops-key"}
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, headers=trusted) as http:
            finished: list[str] = []

            async def one(name: str, key: str, flow: str) -> None:
                headers = {
                    "authorization": f"Bearer {key}",
                    "x-gateway-inference-fairness-id": flow,
                }
                await _finish(http, finished, name, headers)

            async with trio.open_nursery() as nursery:
                holder = trio.CancelScope()
                await nursery.start(_hold, http, holder)
                for index in range(3):
                    nursery.start_soon(one, f"a{index}", "tenant-a", f"fresh-{index}")
                    await _wait_queued(http, index + 1)
                nursery.start_soon(one, "b", "tenant-b", "fresh-0")
                await _wait_queued(http, 4)
                holder.cancel()  # the holder hangs up: its slot frees
            assert finished == ["a0", "b", "a1", "a2"]


async def _finish(
    http: httpx.AsyncClient, finished: list[str], name: str, headers: dict[str, str]
) -> None:
    """Stream a 5-token completion with ``headers``; append ``name`` to ``finished`` at its
    end."""
    async with http.stream("POST", "/v1/completions", json=_body(0, 5), headers=headers) as answer:
        assert answer.status_code == 200, await answer.aread()
        async for line in answer.aiter_lines():
            if line == "data: [DONE]":
                finished.append(name)


async def _hold(
    http: httpx.AsyncClient,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold the server's only slot with a streamed request until ``scope`` is cancelled (the
    client hangs up, which frees the slot); started at its first token. Its 4000 tokens take
    minutes at ``--speedup 0.1``, far past the test's timeout: it never ends by itself."""
    with scope:
        async with http.stream("POST", "/v1/completions", json=_body(0, 4000)) as answer:
            assert answer.status_code == 200, await answer.aread()
            lines = answer.aiter_lines()
            async for line in lines:
                if line.startswith("data: {"):
                    task_status.started()
                    break
            async for _ in lines:
                pass
        raise AssertionError("the holder ended before the test released it")


async def _wait_queued(http: httpx.AsyncClient, count: int) -> None:
    """Poll the server's /health until ``count`` requests wait in its queue."""
    with trio.fail_after(TIMEOUT):
        while (await http.get("/health")).json()["queued"] != count:  # noqa: ASYNC110
            await trio.sleep(0.02)
