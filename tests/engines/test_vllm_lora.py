"""LoRA adapters on a real vLLM (docs/engines.md#lora-adapters): engine 5, started for this
module, serves ``ad1`` and ``ad2`` besides ``tiny`` (``--enable-lora --max-loras 1``), engine 1
of the tier only ``tiny``. A request naming an adapter goes only to engine 5, through
``interlock serve`` and through a real Envoy with ``interlock route --ext-proc-port`` as its
picker (there with llm-d's ``x-llm-d-model-name-rewrite`` header naming the adapter); a name no
engine serves is a 404.

Which engine ran the adapter is read from the engines' own ``/metrics`` (vLLM counts the request,
and names the adapter in ``vllm:lora_requests_info``), not from anything interlock says.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trio
from _envoy import gateway_config, open_envoy, require_envoy
from engine_tier import (
    BLOCK_SIZE,
    LORA_ADAPTERS,
    SERVED_MODEL_NAME,
    VLLM_PYTHON,
    EngineTier,
    VllmEngine,
    engine_flag,
    ensure_tiny_loras,
)
from test_serve_over_vllm import WORKER_ID, client, interlock_serve, words
from test_vllm_engines import random_prompt
from test_vllm_kv_events import blocks_found, mirrored, prefill

from interlock.kv import kv_salt

TIMEOUT = 120.0
SUCCESS = "vllm:request_success_total"
LORA_ENGINE_ID = 5


@pytest.fixture(scope="module")
def lora_engine(_engine_tier_session: EngineTier) -> Iterator[VllmEngine]:
    """Engine 5: like the session's engines, plus the tiny model's LoRA adapters."""
    tier = _engine_tier_session
    loras = ensure_tiny_loras(tier.model_dir.parent, VLLM_PYTHON)
    with tier.running_engine(LORA_ENGINE_ID, loras=loras) as engine:
        yield engine


def _successes(pair: tuple[VllmEngine, VllmEngine]) -> list[float]:
    return [engine.metric(SUCCESS) for engine in pair]


def _flags(pair: tuple[VllmEngine, VllmEngine]) -> list[str]:
    return [flag for engine in pair for flag in engine_flag(engine)]


def _adapters_seen(engine: VllmEngine) -> set[str]:
    """Every adapter the engine's ``vllm:lora_requests_info`` series name as running (one
    series per state it has been in)."""
    text = engine.metrics_text()
    series = r'^vllm:lora_requests_info\{[^}]*running_lora_adapters="([^"]*)"'
    found = re.findall(series, text, re.M)
    return {name for names in found for name in names.split(",") if name}


def _counted_on(
    pair: tuple[VllmEngine, VllmEngine], before: list[float], count: int
) -> list[float]:
    """The engines' finished-request counts once ``count`` more are counted (vLLM counts a
    request just after its answer ends)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        after = _successes(pair)
        if sum(after) - sum(before) >= count:
            return [a - b for a, b in zip(after, before, strict=True)]
        assert time.monotonic() < deadline, "the engines did not count the requests"
        time.sleep(0.05)  # polling the condition under the deadline above


def test_serve_sends_an_adapter_only_to_the_engine_serving_it(
    engine_tier: EngineTier, lora_engine: VllmEngine
) -> None:
    pair = (engine_tier.engine(1), lora_engine)
    with interlock_serve(engine_tier, *_flags(pair), name="serve-lora") as url:
        listed = {card["id"] for card in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
        assert listed == {SERVED_MODEL_NAME, *LORA_ADAPTERS}
        api = client(url)
        before = _successes(pair)
        for n in range(4):
            answer = api.completions.create(
                model="ad2",
                prompt="lora serve: " + words(40 + n, 20),
                max_tokens=3,
                extra_body=WORKER_ID,
            )
            assert answer.model == "ad2"
            assert answer.model_extra["nvext"]["worker_id"]["decode_worker_id"] == LORA_ENGINE_ID
        assert _counted_on(pair, before, 4) == [0.0, 4.0]
        assert "ad2" in _adapters_seen(lora_engine)
        missing = httpx.post(
            f"{url}/v1/completions",
            json={"model": "ad9", "prompt": "x", "max_tokens": 1},
            timeout=TIMEOUT,
        )
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"


async def test_envoy_sends_a_rewritten_adapter_request_to_its_engine(
    engine_tier: EngineTier, lora_engine: VllmEngine, tmp_path: Path
) -> None:
    require_envoy()
    pair = (engine_tier.engine(1), lora_engine)
    ext_proc, health = engine_tier.ports.pick(), engine_tier.ports.pick()
    flags = [
        *_flags(pair),
        "--ext-proc-port", str(ext_proc), "--ext-proc-health-port", str(health),
        "--router-mode", "kv",
    ]  # fmt: skip
    addresses = [engine.address for engine in pair]
    with interlock_serve(engine_tier, *flags, name="gateway-lora", command="route"):
        config = gateway_config(
            ext_proc=f"127.0.0.1:{ext_proc}", ext_proc_health_port=health, pool=addresses
        )
        async with open_envoy(config, tmp_path) as envoy:
            api = openai.OpenAI(
                base_url=f"{envoy.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0
            )
            before = _successes(pair)
            for n in range(3):
                answer = await trio.to_thread.run_sync(
                    lambda n=n: api.chat.completions.create(
                        model=SERVED_MODEL_NAME,
                        messages=[{"role": "user", "content": "lora gw: " + words(50 + n, 12)}],
                        max_tokens=3,
                        extra_headers={"x-llm-d-model-name-rewrite": "ad1"},
                    )
                )
                # The engine answered as the adapter (docs/gateway/envoy.yaml sends the
                # picker no response body, so the name is not put back).
                assert answer.model == "ad1"
            assert await trio.to_thread.run_sync(_counted_on, pair, before, 3) == [0.0, 3.0]
            assert "ad1" in _adapters_seen(lora_engine)


async def test_an_adapters_blocks_are_indexed_under_its_name_apart_from_the_base_models(
    lora_engine: VllmEngine,
) -> None:
    # The same tokens as the base model and as ``ad1``, then other tokens as ``ad1`` alone:
    # vLLM's events carry ``lora_name`` (and the name in every block's extra keys), and the
    # mirror keys them by it, so each finds its own blocks and never the other's.
    shared = random_prompt(41, 2 * BLOCK_SIZE + 3)
    adapter_only = random_prompt(42, 3 * BLOCK_SIZE)
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        await prefill(http, lora_engine, shared)
        await prefill(http, lora_engine, shared, model="ad1")
        await prefill(http, lora_engine, adapter_only, model="ad1")
    index, events = await mirrored(lora_engine)
    named = [e for e in events if list(e.token_ids[:BLOCK_SIZE]) == adapter_only[:BLOCK_SIZE]]
    assert named, "vLLM did not announce the adapter's blocks"
    assert named[0].lora_name == "ad1", named[0]
    ad1, ad2 = kv_salt("ad1"), kv_salt("ad2")
    assert blocks_found(index, adapter_only, ad1) == 3
    assert blocks_found(index, adapter_only, None) == 0
    assert blocks_found(index, adapter_only, ad2) == 0
    assert blocks_found(index, shared, ad1) == 2
    assert blocks_found(index, shared, None) == 2
