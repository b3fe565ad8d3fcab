"""nvext, the GAIE headers and the query-only shapes over raw HTTP (reference/dynamo.md 5, 3.7)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from test_http_harness import CHAT, Served, serving

from interlock import PipelineConfig
from interlock.engines.mock import MockTiming

MESSAGES = [{"role": "user", "content": "Which worker?"}]


def _events(text: str) -> list[str]:
    assert text.endswith("\n\n"), f"an SSE stream ends with a blank line: {text[-40:]!r}"
    return [e for e in text.split("\n\n") if e]


def _prompt_ids(served: Served) -> list[int]:
    return served.preprocessor.encode_chat(MESSAGES)


def _assert_query_body(body: dict[str, Any], prompt: list[int], prefill: int, decode: int) -> None:
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "nvext"}
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert body["usage"] is None
    assert body["nvext"] == {
        "worker_id": {
            "prefill_worker_id": prefill,
            "prefill_dp_rank": 0,
            "decode_worker_id": decode,
            "decode_dp_rank": 0,
        },
        "token_ids": prompt,
    }


@pytest.mark.parametrize(
    "annotation", ["query_instance_id", "query_instance_id:", "query_instance_id:abc"]
)
async def test_query_instance_id_answers_the_reference_shape_and_runs_nothing(
    annotation: str,
) -> None:
    async with serving() as served, served.client() as client:
        body = {"model": "mock", "messages": MESSAGES, "nvext": {"annotations": [annotation]}}
        answer = await client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200
        data = answer.json()
        decode = data["nvext"]["worker_id"]["decode_worker_id"]
        _assert_query_body(data, _prompt_ids(served), decode, decode)
        assert data["object"] == "chat.completion"

        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        events = _events(streamed.text)
        assert len(events) == 2 and events[1] == "data: [DONE]"
        chunk = json.loads(events[0].removeprefix("data: "))
        assert set(chunk) == {"id", "object", "created", "model", "choices", "nvext"}
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["choices"] == [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        assert chunk["nvext"]["token_ids"] == _prompt_ids(served)
        assert set(chunk["nvext"]["worker_id"]) == {
            "prefill_worker_id",
            "prefill_dp_rank",
            "decode_worker_id",
            "decode_dp_rank",
        }
        assert "timing" not in chunk["nvext"]
        assert sum(w.requests_started for w in served.workers) == 0, "a query executed"
        assert await served.pipeline.load() == {}, "a query booked load"


async def test_query_only_completions_and_token_data() -> None:
    async with serving() as served, served.client() as client:
        body = {
            "model": "mock",
            "prompt": "ignored: token_data wins",
            "nvext": {"annotations": ["query_instance_id:"], "token_data": [5, 6, 7, 8]},
        }
        data = (await client.post("/v1/completions", json=body)).json()
        assert data["object"] == "text_completion"
        assert data["choices"] == [
            {"index": 0, "text": "", "logprobs": None, "finish_reason": None}
        ]
        assert data["nvext"]["token_ids"] == [5, 6, 7, 8]
        streamed = await client.post("/v1/completions", json={**body, "stream": True})
        chunk = json.loads(_events(streamed.text)[0].removeprefix("data: "))
        assert chunk["choices"] == [
            {"index": 0, "text": "", "logprobs": None, "finish_reason": None}
        ]


async def test_a_similar_annotation_is_not_a_query() -> None:
    async with serving() as served, served.client() as client:
        body = {**CHAT, "nvext": {"annotations": ["query_instance_id_extra:1"]}}
        data = (await client.post("/v1/chat/completions", json=body)).json()
    assert data["choices"][0]["finish_reason"] in ("stop", "length") and "nvext" not in data


async def test_query_only_disaggregated_names_both_workers() -> None:
    async with serving(workers=2, prefill_workers=1) as served, served.client() as client:
        body = {
            "model": "mock",
            "messages": MESSAGES,
            "nvext": {"annotations": ["query_instance_id:"]},
        }
        data = (await client.post("/v1/chat/completions", json=body)).json()
        _assert_query_body(
            data, _prompt_ids(served), 3, data["nvext"]["worker_id"]["decode_worker_id"]
        )
        assert data["nvext"]["worker_id"]["decode_worker_id"] in (1, 2)


async def test_a_query_only_pipeline_answers_every_request_as_a_query() -> None:
    async with serving(PipelineConfig(routing="query_only")) as served, served.client() as client:
        data = (
            await client.post("/v1/chat/completions", json={"model": "mock", "messages": MESSAGES})
        ).json()
        decode = data["nvext"]["worker_id"]["decode_worker_id"]
        _assert_query_body(data, _prompt_ids(served), decode, decode)
        refused = await client.post(
            "/v1/chat/completions",
            json={"model": "mock", "messages": MESSAGES},
            headers={"x-worker-instance-id": "1"},
        )
        assert (
            refused.status_code == 400
            and refused.json()["error"]["param"] == "x-worker-instance-id"
        )


async def test_discover_refuses_client_chosen_workers_by_default() -> None:
    async with serving() as served, served.client() as client:
        for field in ("backend_instance_id", "prefill_worker_id", "decode_worker_id"):
            answer = await client.post("/v1/chat/completions", json={**CHAT, "nvext": {field: 1}})
            error = answer.json()["error"]
            assert answer.status_code == 400, answer.text
            assert error["param"] == f"nvext.{field}" and error["code"] == "worker_ids_not_allowed"
            assert error["type"] == "invalid_request_error"
        for header in ("x-worker-instance-id", "x-prefill-instance-id"):
            answer = await client.post("/v1/chat/completions", json=CHAT, headers={header: "2"})
            assert answer.status_code == 400 and answer.json()["error"]["param"] == header
        assert sum(w.requests_started for w in served.workers) == 0


async def test_headers_override_nvext_when_worker_ids_are_allowed() -> None:
    config = PipelineConfig(allow_request_worker_ids=True)
    async with serving(config, workers=3) as served, served.client() as client:
        body = {**CHAT, "nvext": {"backend_instance_id": 1, "extra_fields": ["worker_id"]}}
        by_body = (await client.post("/v1/chat/completions", json=body)).json()
        assert by_body["nvext"]["worker_id"]["decode_worker_id"] == 1
        by_header = await client.post(
            "/v1/chat/completions", json=body, headers={"x-worker-instance-id": "3"}
        )
        assert by_header.json()["nvext"]["worker_id"] == {
            "prefill_worker_id": 3,
            "prefill_dp_rank": 0,
            "decode_worker_id": 3,
            "decode_dp_rank": 0,
        }
        assert served.workers[2].requests_finished == 1


async def test_direct_to_known_needs_and_uses_the_named_workers() -> None:
    config = PipelineConfig(routing="direct_to_known")
    async with serving(config, workers=2, prefill_workers=2) as served, served.client() as client:
        missing = await client.post("/v1/chat/completions", json=CHAT)
        assert missing.status_code == 400
        assert missing.json()["error"]["code"] == "worker_id_required"
        body = {**CHAT, "nvext": {"extra_fields": ["worker_id"]}}
        headers = {"x-worker-instance-id": "2", "x-prefill-instance-id": "4"}
        answer = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["nvext"]["worker_id"]["decode_worker_id"] == 2
        assert answer.json()["nvext"]["worker_id"]["prefill_worker_id"] == 4
        assert served.prefill_workers[1].requests_finished == 1
        unknown = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"x-worker-instance-id": "99"}
        )
        assert unknown.status_code == 400 and "99" in unknown.json()["error"]["message"]


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-worker-instance-id", "abc"),
        ("x-worker-instance-id", "-1"),
        ("x-prefill-instance-id", "18446744073709551616"),
        ("x-dp-rank", "one"),
        ("x-enable-local-updates", "maybe"),
    ],
)
async def test_bad_header_values_are_400_naming_the_header(header: str, value: str) -> None:
    config = PipelineConfig(allow_request_worker_ids=True)
    async with serving(config) as served, served.client() as client:
        answer = await client.post("/v1/chat/completions", json=CHAT, headers={header: value})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == header


async def _first_chunk_then(served: Served, headers: dict[str, str]) -> dict[int, Any]:
    """Open a slow stream, read its first event, and return the router's load at that point."""
    body = {**CHAT, "max_tokens": 5000, "stream": True}
    path = "/v1/chat/completions"
    async with (
        served.client() as client,
        client.stream("POST", path, json=body, headers=headers) as r,
    ):
        async for _ in r.aiter_bytes():
            return await served.pipeline.load()
    raise AssertionError("the stream ended before its first chunk")


async def test_enable_local_updates_false_skips_the_routers_bookkeeping() -> None:
    timing = MockTiming(speedup_ratio=10.0)
    async with serving(timing=timing) as served:
        with trio.fail_after(20):
            booked = await _first_chunk_then(served, {})
            assert booked, "a normal request books its load"
            await served.wait_idle()
            unbooked = await _first_chunk_then(served, {"x-enable-local-updates": "false"})
            assert unbooked == {}, "x-enable-local-updates: false must not book load"
            await served.wait_idle()


async def test_token_data_skips_tokenization() -> None:
    async with serving() as served, served.client() as client:
        body = {**CHAT, "nvext": {"token_data": [72, 105, 33]}}
        data = (await client.post("/v1/chat/completions", json=body)).json()
        assert data["usage"]["prompt_tokens"] == 3
        outside = await client.post(
            "/v1/chat/completions", json={**CHAT, "nvext": {"token_data": [1, 10**6]}}
        )
        assert outside.status_code == 400
        assert outside.json()["error"]["param"] == "nvext.token_data[1]"


@pytest.mark.parametrize("stream", [False, True])
async def test_extra_fields_worker_id_timing_and_completion_token_ids(stream: bool) -> None:
    async with serving() as served, served.client() as client:
        body = {
            **CHAT,
            "stream": stream,
            "nvext": {"extra_fields": ["worker_id", "timing", "completion_token_ids"]},
        }
        answer = await client.post("/v1/chat/completions", json=body)
    if stream:
        events = _events(answer.text)
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "length"
        nvext = last["nvext"]
    else:
        nvext = answer.json()["nvext"]
    assert set(nvext) == {"worker_id", "timing", "completion_token_ids"}
    assert nvext["worker_id"]["decode_worker_id"] in (1, 2)
    assert len(nvext["completion_token_ids"]) == 8
    timing = nvext["timing"]
    assert {"request_received_ms", "ttft_ms", "total_time_ms"} <= set(timing)
    assert 0 <= timing["ttft_ms"] <= timing["total_time_ms"]


@pytest.mark.parametrize(
    ("nvext", "param"),
    [
        ({"backend_instanceid": 1}, "nvext.backend_instanceid"),
        ({"extra_fields": ["worker_ids"]}, "nvext.extra_fields[0]"),
        ({"annotations": "query_instance_id"}, "nvext.annotations"),
        ({"token_data": []}, "nvext.token_data"),
        ({"token_data": [1, -2]}, "nvext.token_data[1]"),
        ({"greed_sampling": "yes"}, "nvext.greed_sampling"),
        ({"agent_hints": {"osl": -1}}, "nvext.agent_hints.osl"),
        ({"agent_hints": {"ttl": 3}}, "nvext.agent_hints.ttl"),
        ("nvext", "nvext"),
    ],
)
async def test_bad_nvext_is_400_naming_the_field(nvext: Any, param: str) -> None:
    async with serving() as served, served.client() as client:
        answer = await client.post("/v1/chat/completions", json={**CHAT, "nvext": nvext})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


async def test_greed_sampling_and_agent_hints_are_accepted() -> None:
    async with serving() as served, served.client() as client:
        body = {
            **CHAT,
            "nvext": {
                "greed_sampling": True,
                "max_thinking_tokens": 64,
                "agent_hints": {"osl": 100, "priority": 1, "latency_sensitivity": 0.5},
            },
        }
        answer = await client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text


async def test_kv_routing_over_http_reports_the_prefix_overlap() -> None:
    config = PipelineConfig(router_mode="kv")
    async with serving(config, workers=3, route_api=True) as served, served.client() as client:
        long = [{"role": "user", "content": "A long shared system prompt. " * 8}]
        body = {
            "model": "mock",
            "messages": long,
            "max_tokens": 4,
            "nvext": {"extra_fields": ["worker_id", "timing"]},
        }
        first = (await client.post("/v1/chat/completions", json=body)).json()
        await served.wait_idle()
        second = (await client.post("/v1/chat/completions", json=body)).json()
        route = (await client.post("/v1/route", json={"messages": long})).json()
        metrics = (await client.get("/metrics")).text
    worker = first["nvext"]["worker_id"]["decode_worker_id"]
    assert second["nvext"]["worker_id"]["decode_worker_id"] == worker, "the cached prefix lost"
    assert second["nvext"]["timing"]["kv_hit_rate"] > 0.5
    assert route["decode_worker_id"] == worker and route["overlap_blocks"] > 0
    assert route["cost"] is not None and route["selections"][0]["policy"] == "kv"
    (sample,) = [m for m in metrics.splitlines() if m.startswith("interlock_router_prefix_hit")]
    hit_rate = float(sample.split()[1])
    assert hit_rate > 0


async def test_worker_id_without_the_metrics_sink_comes_from_the_transition_log() -> None:
    # An app built without passing its HttpMetrics to the pipeline never sees the routing
    # decision as it happens; nvext.worker_id still has to be right.
    import httpx

    from interlock import Components, build_pipeline
    from interlock.engines.mock import MockEngine
    from interlock.http import Preprocessor, build_app

    preprocessor = Preprocessor.default()
    workers = [MockEngine(7, timing=MockTiming.zero(), token_pool=[104, 105])]
    components = Components(workers=workers, tokenizer=preprocessor.tokenizer)
    async with build_pipeline(PipelineConfig(), components) as pipeline:
        app = build_app(pipeline, preprocessor=preprocessor)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            body = {**CHAT, "nvext": {"extra_fields": ["worker_id"]}}
            answer = await client.post("/v1/chat/completions", json=body)
    assert answer.json()["nvext"]["worker_id"]["decode_worker_id"] == 7


class _SkipNote(Exception):
    """A custom policy's note about a worker it skipped, kept in its selection's ``inputs``:
    an exception with an ``__init__`` of its own (it pickles, but does not unpickle)."""

    def __init__(self, worker_id: int, why: str) -> None:
        super().__init__(f"worker {worker_id}: {why}")
        self.worker_id = worker_id


class _NotingPolicy:
    name = "noting"

    def choose(self, leg: Any, candidates: Any, request: Any) -> Any:
        from interlock.actors import candidate_records
        from interlock.wire import SelectionRecord

        return SelectionRecord(
            leg=leg,
            policy=self.name,
            chosen=candidates[0].worker_id,
            candidates=candidate_records(candidates),
            inputs={"skipped": [_SkipNote(99, "draining")]},
        )


async def test_worker_id_from_the_transition_log_of_a_long_request_under_a_custom_policy(
    autojump_clock: trio.abc.Clock,
) -> None:
    # As above, for a request that runs while ~70 others come and go (its first records are
    # no longer the log's newest when it ends), under a policy of the application's own.
    import httpx

    from interlock import Components, build_pipeline
    from interlock.engines.mock import MockEngine
    from interlock.http import Preprocessor, build_app

    preprocessor = Preprocessor.default()
    components = Components(
        workers=[MockEngine(7, token_pool=[104, 105])],
        tokenizer=preprocessor.tokenizer,
        selection_policy=lambda config: _NotingPolicy(),
    )
    async with build_pipeline(PipelineConfig(), components) as pipeline:
        app = build_app(pipeline, preprocessor=preprocessor)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            answers: list[httpx.Response] = []

            async def long_request() -> None:
                body = {**CHAT, "max_tokens": 300, "nvext": {"extra_fields": ["worker_id"]}}
                answers.append(await client.post("/v1/chat/completions", json=body))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_request)
                for _ in range(70):
                    short = await client.post(
                        "/v1/chat/completions", json={**CHAT, "max_tokens": 1}
                    )
                    assert short.status_code == 200
                assert not answers, "the long request must still be running"
    (answer,) = answers
    assert answer.status_code == 200, answer.text
    assert answer.json()["nvext"]["worker_id"]["decode_worker_id"] == 7
