"""The route-only API: decisions with and without bookkeeping, and a gateway's release calls."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from helpers import frontend_parser
from test_http_harness import serving

from interlock import PipelineConfig

TOKENS = list(range(1, 41))


async def test_route_without_booking_leaves_no_load() -> None:
    async with serving(route_api=True, workers=3) as served, served.client() as client:
        answer = await client.post("/v1/route", json={"token_ids": TOKENS})
        assert answer.status_code == 200, answer.text
        decision = answer.json()
        assert decision["booked"] is False
        assert decision["decode_worker_id"] == decision["prefill_worker_id"]
        assert decision["decode_worker_id"] in (1, 2, 3)
        assert decision["disaggregated"] is False
        assert decision["prompt_tokens"] == 40
        assert {"overlap_blocks", "cost", "split_reason", "selections", "request_id"} <= set(
            decision
        )
        leg = decision["selections"][0]
        assert leg["leg"] == "agg" and leg["worker_id"] == decision["decode_worker_id"]
        assert [c["worker_id"] for c in leg["candidates"]] == [1, 2, 3]
        assert "token_ids" not in decision
        assert await served.pipeline.load() == {}
        assert sum(w.requests_started for w in served.workers) == 0


async def test_booking_then_prefill_complete_then_free() -> None:
    async with serving(route_api=True) as served, served.client() as client:
        body = {"token_ids": TOKENS, "book": True, "request_id": "gw-1"}
        decision = (await client.post("/v1/route", json=body)).json()
        worker = decision["decode_worker_id"]
        assert decision["booked"] is True and decision["request_id"] == "gw-1"
        load = await served.pipeline.load()
        assert load[worker].active_requests == 1 and load[worker].prefill_tokens == 40
        # What an operator (or a test in another process) sees of the booking.
        metrics = (await client.get("/metrics")).text
        assert f'interlock_router_booked_requests{{worker_id="{worker}"}} 1.0' in metrics

        again = await client.post("/v1/route", json=body)
        assert again.status_code == 409 and again.json()["error"]["code"] == "already_booked"

        done = await client.post("/v1/route/gw-1/prefill_complete")
        assert done.json() == {"request_id": "gw-1", "released": "prefill"}
        load = await served.pipeline.load()
        assert load[worker].active_requests == 1 and load[worker].prefill_tokens == 0

        freed = await client.post("/v1/route/gw-1/free")
        assert freed.json() == {"request_id": "gw-1", "released": "all"}
        assert await served.pipeline.load() == {}
        metrics = (await client.get("/metrics")).text
        assert f'interlock_router_booked_requests{{worker_id="{worker}"}} 0.0' in metrics
        for path in ("/v1/route/gw-1/free", "/v1/route/nope/prefill_complete"):
            unknown = await client.post(path)
            assert (
                unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_request"
            )


async def test_route_by_messages_or_prompt_tokenizes_like_the_frontend() -> None:
    async with serving(route_api=True) as served, served.client() as client:
        messages = [{"role": "user", "content": "Route me."}]
        by_messages = await client.post(
            "/v1/route", json={"messages": messages, "include_token_ids": True}
        )
        assert by_messages.json()["token_ids"] == served.preprocessor.encode_chat(messages)
        by_prompt = await client.post(
            "/v1/route", json={"prompt": "plain text", "include_token_ids": True}
        )
        assert by_prompt.json()["token_ids"] == served.preprocessor.encode_text("plain text")


async def test_route_disaggregated_names_prefill_and_decode() -> None:
    cluster = serving(route_api=True, workers=2, prefill_workers=1)
    async with cluster as served, served.client() as client:
        decision = (await client.post("/v1/route", json={"token_ids": TOKENS})).json()
    assert decision["disaggregated"] is True
    assert decision["prefill_worker_id"] == 3 and decision["decode_worker_id"] in (1, 2)
    assert [s["leg"] for s in decision["selections"]] == ["prefill", "decode"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({}, 400, "token_ids"),
        ({"token_ids": TOKENS, "prompt": "x"}, 400, "prompt"),
        ({"token_ids": []}, 400, "token_ids"),
        ({"token_ids": [1, "2"]}, 400, "token_ids[1]"),
        ({"token_ids": TOKENS, "bok": True}, 400, "bok"),
        ({"token_ids": TOKENS, "book": "yes"}, 400, "book"),
        ({"token_ids": TOKENS, "model": "other"}, 404, "model"),
        ({"token_ids": TOKENS, "request_id": 5}, 400, "request_id"),
        ({"messages": []}, 400, "messages"),
        ({"token_ids": TOKENS, "cache_salt": ""}, 400, "cache_salt"),
        ({"token_ids": TOKENS, "router_config_override": {"overlap_score_weight": -1}}, 400,
         "router_config_override.overlap_score_weight"),
    ],
)  # fmt: skip
async def test_bad_route_requests(body: dict[str, Any], status: int, param: str) -> None:
    async with serving(route_api=True) as served, served.client() as client:
        answer = await client.post("/v1/route", json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param


async def test_the_route_api_is_off_unless_asked_for() -> None:
    async with serving() as served, served.client() as client:
        assert (await client.post("/v1/route", json={"token_ids": TOKENS})).status_code == 404


async def test_route_api_in_a_query_only_pipeline_can_book() -> None:
    config = PipelineConfig(routing="query_only")
    async with serving(config, route_api=True) as served, served.client() as client:
        body = {"token_ids": TOKENS, "book": True}
        decision = (await client.post("/v1/route", json=body)).json()
        assert (await served.pipeline.load())[decision["decode_worker_id"]].active_requests == 1
        await client.post(f"/v1/route/{decision['request_id']}/free")
        assert await served.pipeline.load() == {}


def test_route_once_answers_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    args = frontend_parser().parse_args(
        ["route", "--workers", "3", "--once", json.dumps({"token_ids": TOKENS})]
    )
    assert args.run(args) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["decode_worker_id"] in (1, 2, 3) and decision["booked"] is False


async def test_route_once_against_a_running_router() -> None:
    async with serving(PipelineConfig(routing="query_only"), route_api=True) as served:
        args = frontend_parser().parse_args(
            ["route", "--url", served.url, "--once", json.dumps({"token_ids": TOKENS})]
        )
        assert await trio.to_thread.run_sync(args.run, args) == 0
        bad = frontend_parser().parse_args(["route", "--url", served.url, "--once", "{}"])
        assert await trio.to_thread.run_sync(bad.run, bad) == 1


def test_route_refuses_a_direct_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    args = frontend_parser().parse_args(
        ["route", "--routing", "direct_to_known", "--once", json.dumps({"token_ids": TOKENS})]
    )
    assert args.run(args) == 2
    assert "routing must be 'query_only'" in capsys.readouterr().err
