"""The tier's engines are what the rest of the tier relies on: real vLLM servers that take
token-id prompts and return token ids, a prefill/decode pair sharing KV through their
ExampleConnector folder, and a kill that leaves nothing behind (their KV events:
test_vllm_kv_events.py; restarting a killed engine: test_harness.py).

Prompts are random token ids from seeded generators, a different seed per test, so no test
finds another's blocks in a cache.
"""

from __future__ import annotations

import json
import random

import httpx
import pytest
from engine_tier import (
    BLOCK_SIZE,
    PD_PAIR,
    SERVED_MODEL_NAME,
    EngineTier,
    VllmEngine,
    group_members,
)

TIMEOUT = 60.0


def random_prompt(seed: int, length: int) -> list[int]:
    """``length`` token ids the Qwen3 tokenizer can produce (below its special tokens)."""
    generator = random.Random(seed)
    return [generator.randrange(1000, 150000) for _ in range(length)]


def complete(engine: VllmEngine, prompt: list[int], **fields: object) -> dict[str, object]:
    """POST a token-id prompt to the engine's /v1/completions; the JSON answer (asserts 200)."""
    body = {
        "model": SERVED_MODEL_NAME,
        "prompt": prompt,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        **fields,
    }
    response = httpx.post(f"{engine.base_url}/v1/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, (engine.id, response.text)
    answer: dict[str, object] = response.json()
    return answer


def cached_tokens(answer: dict[str, object]) -> int:
    usage = answer["usage"]
    assert isinstance(usage, dict)
    details = usage["prompt_tokens_details"]
    assert isinstance(details, dict), usage
    return int(details["cached_tokens"])


def test_every_engine_answers_a_token_id_prompt_with_the_token_ids(
    engine_tier: EngineTier,
) -> None:
    prompt = random_prompt(1, 100)
    for engine in engine_tier.engines:
        answer = complete(engine, prompt, return_token_ids=True)
        [choice] = answer["choices"]  # type: ignore[misc]
        assert choice["prompt_token_ids"] == prompt, engine.id
        assert len(choice["token_ids"]) == 4, (engine.id, choice)
        assert choice["finish_reason"] == "length", (engine.id, choice)
        assert answer["usage"]["prompt_tokens"] == len(prompt)  # type: ignore[index]


def test_a_stream_carries_each_new_token_id_and_the_prompt_ids_in_its_first_chunk(
    engine_tier: EngineTier,
) -> None:
    engine = engine_tier.engine(2)
    prompt = random_prompt(2, 70)
    body = {
        "model": SERVED_MODEL_NAME,
        "prompt": prompt,
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    chunks = []
    with httpx.stream(
        "POST", f"{engine.base_url}/v1/completions", json=body, timeout=TIMEOUT
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    *token_chunks, usage_chunk = chunks
    assert token_chunks[0]["choices"][0]["prompt_token_ids"] == prompt
    generated = [tid for chunk in token_chunks for tid in chunk["choices"][0]["token_ids"]]
    assert len(generated) == 5
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5


def test_a_prompt_prefilled_on_one_engine_of_the_pair_is_found_on_the_other(
    engine_tier: EngineTier,
) -> None:
    prefill, decode = (engine_tier.engine(engine_id) for engine_id in PD_PAIR)
    prompt = random_prompt(3, 300)
    first = complete(prefill, prompt, max_tokens=1)
    assert cached_tokens(first) == 0
    second = complete(decode, prompt)
    # ExampleConnector saves the block-aligned prompt without its last token.
    assert cached_tokens(second) == (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
    # Engine 2 keeps its own folder: nothing of the pair's reaches it.
    assert cached_tokens(complete(engine_tier.engine(2), prompt)) == 0


@pytest.mark.kills_engine
def test_a_killed_engine_leaves_no_process_behind(engine_tier_as_is: EngineTier) -> None:
    # Last of the tier (engine_tier_as_is), so nothing waits for the engine the kill -9 test
    # killed to start again (test_harness.py starts killed engines again, on a stand-in for
    # vLLM); engine 2 is started again only if something else took it down.
    engine_tier_as_is.restart_unhealthy_engines(only=[2])
    engine = engine_tier_as_is.engine(2)
    assert engine.healthy()
    pgid = engine.pgid
    # The API server, its EngineCore and its Worker (and helpers) all share the group.
    assert len(group_members(pgid)) >= 3
    engine.kill()
    assert group_members(pgid) == []
    assert not engine.healthy()
