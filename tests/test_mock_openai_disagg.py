"""Disaggregation through the mock's vLLM surface, as vLLM with the NIXL connector does it
(reference/vllm-cpu.md section 4b, reference/engines.md section 3): a prefill leg answers with
NIXL-shaped ``kv_transfer_params``; a decode leg that carries them verbatim is served as one
whose prompt KV arrived (cached tokens, the external-hit metrics), and the params it received
can be read back from the mock-only ``/mock/state``.
"""

from __future__ import annotations

from test_mock_openai_surface import _metrics, _value, mock_vllm

from interlock.engines.mock import mock_continuation

PROMPT = list(range(1000, 1100))  # 100 tokens: 6 full blocks of 16 and 4 more


async def test_prefill_answers_nixl_params_and_decode_uses_them_verbatim() -> None:
    headers = {"X-Request-Id": "pd-test-1"}
    async with mock_vllm() as (prefill, p_client), mock_vllm() as (decode, d_client):
        p_leg = await p_client.post(
            "/v1/completions",
            json={
                "prompt": PROMPT,
                "max_tokens": 1,
                "stream": False,
                "kv_transfer_params": {
                    "do_remote_decode": True,
                    "do_remote_prefill": False,
                    "remote_engine_id": None,
                    "remote_block_ids": None,
                    "remote_host": None,
                    "remote_port": None,
                },
            },
            headers=headers,
        )
        params = p_leg.json()["kv_transfer_params"]
        d_leg = await d_client.post(
            "/v1/completions",
            json={
                "prompt": PROMPT,
                "max_tokens": 8,
                "kv_transfer_params": params,
                "return_token_ids": True,
            },
            headers=headers,
        )
        state = (await d_client.get("/mock/state")).json()
        d_metrics = _metrics((await d_client.get("/metrics")).text)
        p_state = (await p_client.get("/mock/state")).json()
    assert p_leg.status_code == 200 and d_leg.status_code == 200
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_block_ids"] == [list(range(1, 8))]  # 7 blocks, the partial one too
    assert params["remote_engine_id"] == prefill.engine_uuid
    assert params["remote_request_id"].startswith("cmpl-pd-test-1-0-")
    assert params["remote_host"] == "127.0.0.1" and params["remote_port"] == prefill.port
    assert params["remote_num_tokens"] == 100 and params["transfer_mode"] == "pull"
    assert params["tp_size"] == 1 and params["remote_prefill_cached_tokens"] == 0
    assert p_state["last_kv_transfer_params_sent"] == params
    body = d_leg.json()
    assert body["kv_transfer_params"] is None
    # The decode leg samples the first token again, as vLLM's D does.
    assert body["choices"][0]["token_ids"] == mock_continuation(PROMPT, 8)
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert state["last_kv_transfer_params_received"] == params
    assert state["kv_transfers"] == 1 and state["kv_transfers_invalid"] == 0
    assert _value(d_metrics, "vllm:external_prefix_cache_hits_total") == 96
    assert _value(d_metrics, "vllm:external_prefix_cache_queries_total") == 100
    assert _value(d_metrics, "vllm:prefix_cache_hits_total") == 0
    assert (
        _value(d_metrics, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == 96
    )
    assert decode.engine.requests_finished == 1


async def test_incomplete_params_are_recomputed_locally() -> None:
    async with mock_vllm() as (server, client):
        body = (
            await client.post(
                "/v1/completions",
                json={
                    "prompt": PROMPT,
                    "max_tokens": 2,
                    "kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": "x"},
                },
            )
        ).json()
        state = (await client.get("/mock/state")).json()
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert state["kv_transfers"] == 0 and state["kv_transfers_invalid"] == 1
    assert server.stats.last_kv_transfer_params_received == {
        "do_remote_prefill": True,
        "remote_engine_id": "x",
    }


async def test_a_prefill_leg_that_stopped_early_returns_no_params() -> None:
    async with mock_vllm() as (_, client):
        body = (
            await client.post(
                "/v1/completions",
                json={
                    "prompt": PROMPT,
                    "max_tokens": 5,
                    "stop_token_ids": [mock_continuation(PROMPT, 1)[0]],
                    "kv_transfer_params": {"do_remote_decode": True},
                },
            )
        ).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["kv_transfer_params"] is None
