"""LoRA adapters on a real vLLM (docs/engines.md#lora-adapters): engine 2 of the tier serves
``ad1`` and ``ad2`` besides ``tiny`` (``--enable-lora --max-loras 1``), engine 1 only ``tiny``.
A request naming an adapter goes only to engine 2, through ``interlock serve`` and through a real
Envoy with ``interlock route --ext-proc-port`` as its picker (there with llm-d's
``x-llm-d-model-name-rewrite`` header naming the adapter); a name no engine serves is a 404.

Which engine ran the adapter is read from the engines' own ``/metrics`` (vLLM counts the request,
and names the adapter in ``vllm:lora_requests_info``), not from anything interlock says.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai
import trio
from _envoy import gateway_config, open_envoy, require_envoy
from engine_tier import LORA_ADAPTERS, LORA_ENGINE, SERVED_MODEL_NAME, EngineTier
from test_serve_over_vllm import WORKER_ID, client, engine_counter, engines, interlock_serve, words

TIMEOUT = 120.0
SUCCESS = "vllm:request_success_total"


def _successes(tier: EngineTier) -> list[float]:
    return [engine_counter(tier, i, SUCCESS) for i in (1, 2)]


def _adapters_seen(tier: EngineTier, engine_id: int) -> set[str]:
    """Every adapter the engine's ``vllm:lora_requests_info`` series name as running (one
    series per state it has been in)."""
    text = httpx.get(f"{tier.engine(engine_id).base_url}/metrics", timeout=10).text
    series = r'^vllm:lora_requests_info\{[^}]*running_lora_adapters="([^"]*)"'
    found = re.findall(series, text, re.M)
    return {name for names in found for name in names.split(",") if name}


def _counted_on(tier: EngineTier, before: list[float], count: int) -> list[float]:
    """The engines' finished-request counts once ``count`` more are counted (vLLM counts a
    request just after its answer ends)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        after = _successes(tier)
        if sum(after) - sum(before) >= count:
            return [a - b for a, b in zip(after, before, strict=True)]
        assert time.monotonic() < deadline, "the engines did not count the requests"
        time.sleep(0.05)  # polling the condition under the deadline above


def test_serve_sends_an_adapter_only_to_the_engine_serving_it(engine_tier: EngineTier) -> None:
    assert LORA_ENGINE == 2
    with interlock_serve(engine_tier, *engines(engine_tier, "1", "2"), name="serve-lora") as url:
        listed = {card["id"] for card in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
        assert listed == {SERVED_MODEL_NAME, *LORA_ADAPTERS}
        api = client(url)
        before = _successes(engine_tier)
        for n in range(4):
            answer = api.completions.create(
                model="ad2",
                prompt="lora serve: " + words(40 + n, 20),
                max_tokens=3,
                extra_body=WORKER_ID,
            )
            assert answer.model == "ad2"
            assert answer.model_extra["nvext"]["worker_id"]["decode_worker_id"] == LORA_ENGINE
        assert _counted_on(engine_tier, before, 4) == [0.0, 4.0]
        assert "ad2" in _adapters_seen(engine_tier, LORA_ENGINE)
        missing = httpx.post(
            f"{url}/v1/completions",
            json={"model": "ad9", "prompt": "x", "max_tokens": 1},
            timeout=TIMEOUT,
        )
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"


async def test_envoy_sends_a_rewritten_adapter_request_to_its_engine(
    engine_tier: EngineTier, tmp_path: Path
) -> None:
    require_envoy()
    ext_proc, health = engine_tier.ports.pick(), engine_tier.ports.pick()
    flags = [
        *engines(engine_tier, "1", "2"),
        "--ext-proc-port", str(ext_proc), "--ext-proc-health-port", str(health),
        "--router-mode", "kv",
    ]  # fmt: skip
    addresses = [engine_tier.engine(i).address for i in (1, 2)]
    with interlock_serve(engine_tier, *flags, name="gateway-lora", command="route"):
        config = gateway_config(
            ext_proc=f"127.0.0.1:{ext_proc}", ext_proc_health_port=health, pool=addresses
        )
        async with open_envoy(config, tmp_path) as envoy:
            api = openai.OpenAI(
                base_url=f"{envoy.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0
            )
            before = _successes(engine_tier)
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
            assert await trio.to_thread.run_sync(_counted_on, engine_tier, before, 3) == [0.0, 3.0]
            assert "ad1" in _adapters_seen(engine_tier, LORA_ENGINE)
