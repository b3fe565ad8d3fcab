"""A real Envoy (docs/gateway/envoy.yaml) in front of the tier's real vLLM servers, with
``interlock route --ext-proc-port --engine ...`` as its endpoint picker (docs/gateway.md): the
issue's contract, checked as a user's gateway would see it.

Which engine served is read from the engines' own counters (``vllm:request_success_total``),
not from anything the picker says.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai
import trio
from _envoy import gateway_config, open_envoy, require_envoy, wait_for
from engine_tier import BLOCK_SIZE, SERVED_MODEL_NAME, EngineTier
from test_serve_over_vllm import engines, interlock_serve, router_kv_blocks, words

TIMEOUT = 120.0
SERVED = "x-conformance-test-served-endpoint"


def _successes(tier: EngineTier) -> list[float]:
    return [tier.engine(i).metric("vllm:request_success_total") for i in (1, 2)]


def _served_by(tier: EngineTier, before: list[float]) -> int:
    """The engine (1 or 2) whose count of finished requests grew since ``before``: a response
    names its endpoint only to the conformance hook's requests."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        after = _successes(tier)
        grown = [i for i, (a, b) in enumerate(zip(after, before, strict=True), 1) if a > b]
        if grown:
            return grown[0]
        assert time.monotonic() < deadline, "no engine counted the request as finished"
        time.sleep(0.05)  # polling the condition under the deadline above


async def test_envoy_routes_to_the_vllm_interlock_picks(
    engine_tier: EngineTier, tmp_path: Path
) -> None:
    require_envoy()
    ext_proc, health = engine_tier.ports.pick(), engine_tier.ports.pick()
    flags = [
        *engines(engine_tier, "1", "2"),
        "--ext-proc-port", str(ext_proc), "--ext-proc-health-port", str(health),
        "--router-mode", "kv", "--router-temperature", "0",
        "--kv-events-bind", engine_tier.kv_endpoint,
    ]  # fmt: skip
    addresses = [engine_tier.engine(i).address for i in (1, 2)]
    with interlock_serve(engine_tier, *flags, name="gateway", command="route") as route_url:
        config = gateway_config(
            ext_proc=f"127.0.0.1:{ext_proc}", ext_proc_health_port=health, pool=addresses
        )
        async with open_envoy(config, tmp_path) as envoy:
            api = openai.OpenAI(
                base_url=f"{envoy.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0
            )

            # The contract: test-epp-endpoint-selection: host:port goes there, and the
            # response says so.
            for target in (2, 1):
                before = _successes(engine_tier)
                raw = await trio.to_thread.run_sync(
                    lambda t=target: api.chat.completions.with_raw_response.create(
                        model=SERVED_MODEL_NAME,
                        messages=[{"role": "user", "content": "gateway: " + words(21, 12)}],
                        max_tokens=3,
                        extra_headers={"test-epp-endpoint-selection": addresses[t - 1]},
                    )
                )
                assert raw.parse().choices[0].message.content is not None
                assert raw.headers.get(SERVED) == addresses[target - 1]
                after = _successes(engine_tier)
                assert [a - b for a, b in zip(after, before, strict=True)] == [
                    1.0 if i == target else 0.0 for i in (1, 2)
                ]

            # KV affinity on the engines' own KV events, streamed through Envoy.
            system = "gateway kv system prompt: " + words(22, 300)

            def ask(turn: int) -> tuple[int, str, int]:
                before = _successes(engine_tier)
                with api.chat.completions.with_streaming_response.create(
                    model=SERVED_MODEL_NAME,
                    messages=[
                        {"role": "system", "content": system},
                        {"role": "user", "content": f"turn {turn}"},
                    ],
                    max_tokens=3,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                ) as raw:
                    chunks = list(raw.parse())
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    usage = chunks[-1].usage
                    assert usage is not None
                    details = usage.prompt_tokens_details
                    cached = details.cached_tokens if details and details.cached_tokens else 0
                    assert SERVED not in raw.headers, "shown only to the conformance hook"
                return _served_by(engine_tier, before), text, cached

            owner_id, _, _ = await trio.to_thread.run_sync(ask, 0)

            async def indexed() -> bool:
                blocks = await trio.to_thread.run_sync(router_kv_blocks, route_url)
                return blocks.get(owner_id, 0) >= 300 // BLOCK_SIZE

            await wait_for(indexed, f"engine {owner_id}'s KV events in the router", within=60)
            for turn in (1, 2):
                served, text, cached = await trio.to_thread.run_sync(ask, turn)
                assert served == owner_id, f"turn {turn} left the prefix's engine"
                assert text
                assert cached >= BLOCK_SIZE

            # Every booking was released with its response.
            async def nothing_booked() -> bool:
                async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                    text = (await client.get(f"{route_url}/metrics")).text
                found = re.findall(
                    r'^interlock_router_booked_requests\{worker_id="\d+"\} (\S+)$', text, re.M
                )
                return bool(found) and not any(float(v) for v in found)

            await wait_for(nothing_booked, "the router's booked load back to zero")
