"""Real vLLM KV events through interlock's own feed and replay (interlock.engines.openai):
every engine publishes to the one bound `KvEventFeed` under its topic ``kv@<id>``, each
batch decodes, the blocks carry the prompt's tokens, any engine replays its buffer from seq 0,
and equal tokens get equal block hashes on every engine (PYTHONHASHSEED=0 on all)."""

from __future__ import annotations

import functools

import httpx
import trio
from engine_tier import BLOCK_SIZE, SERVED_MODEL_NAME, EngineTier, VllmEngine
from test_vllm_engines import random_prompt

from interlock.engines.openai import KvEventFeed, replay_kv_batches
from interlock.engines.openai._kv_mirror import KvMirror
from interlock.kv import KvIndexer, compute_block_hashes, kv_salt
from interlock.wire import VllmBlockStored, VllmKvBatch

TIMEOUT = 60.0


async def prefill(
    client: httpx.AsyncClient, engine: VllmEngine, prompt: list[int], **fields: object
) -> None:
    """Run ``prompt`` through ``engine`` with one output token (its prompt blocks get stored);
    ``fields`` are added to the body (``model``, ``cache_salt``)."""
    body = {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    body.update(fields)
    response = await client.post(f"{engine.base_url}/v1/completions", json=body)
    assert response.status_code == 200, (engine.id, response.text)


def stored(batches: list[VllmKvBatch]) -> list[VllmBlockStored]:
    return [
        event for batch in batches for event in batch.events if isinstance(event, VllmBlockStored)
    ]


def stored_tokens(batches: list[VllmKvBatch]) -> list[int]:
    return [token for event in stored(batches) for token in event.token_ids]


async def mirrored(engine: VllmEngine) -> tuple[KvIndexer, list[VllmBlockStored]]:
    """The router's index of ``engine`` built by a `KvMirror` from every batch the engine
    replays from seq 0 (its own events, as it published them), and the stored events."""
    replayed = await replay_kv_batches(engine.replay_endpoint, 0, timeout=TIMEOUT)
    index = KvIndexer()
    mirror = KvMirror(engine.id, BLOCK_SIZE, index.apply)
    for seq, batch in replayed:
        mirror.on_batch(seq, batch)
    return index, stored([batch for _, batch in replayed])


def blocks_found(index: KvIndexer, prompt: list[int], salt: int | None) -> int:
    """How many of ``prompt``'s blocks the index finds (on any engine) under ``salt``."""
    scores = index.find_matches(compute_block_hashes(prompt, BLOCK_SIZE, salt)).scores
    return max(scores.values(), default=0)


async def test_the_engines_publish_decodable_batches_to_one_bound_feed_under_their_topics(
    engine_tier: EngineTier,
) -> None:
    engine = engine_tier.engine(1)
    feed = KvEventFeed(engine_tier.kv_endpoint)
    received: dict[int, list[tuple[int, VllmKvBatch]]] = {e.id: [] for e in engine_tier.engines}
    blocks = 3 * BLOCK_SIZE
    wanted: list[int] = []
    sent: list[list[int]] = []
    seen = trio.Event()

    def on_batch(engine_id: int, seq: int, batch: VllmKvBatch) -> None:
        received[engine_id].append((seq, batch))
        if wanted and stored_tokens([batch]) == wanted:
            seen.set()

    for each in engine_tier.engines:
        feed.subscribe(each.id, functools.partial(on_batch, each.id))
    async with httpx.AsyncClient(timeout=TIMEOUT) as client, trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        # The engines' PUBs reconnect to the new SUB and learn its subscription a moment after
        # the bind; what they publish before that is lost (a mirror would replay it). So send
        # fresh prompts until one is seen, within the deadline.
        with trio.fail_after(TIMEOUT):
            for attempt in range(1000):
                prompt = random_prompt(200 + attempt, blocks + 5)
                wanted[:] = prompt[:blocks]
                sent.append(prompt)
                await prefill(client, engine, prompt)
                with trio.move_on_after(2):
                    await seen.wait()
                if seen.is_set():
                    break
        nursery.cancel_scope.cancel()
    assert feed.stats.undecodable == 0
    assert feed.stats.unknown_topic == 0
    [last] = [e for e in stored([b for _, b in received[1]]) if list(e.token_ids) == wanted]
    assert last.block_size == BLOCK_SIZE
    assert len(last.block_hashes) == 3
    assert last.parent_block_hash is None
    seqs = [seq for seq, _ in received[1]]
    assert seqs == sorted(seqs)
    # Only engine 1 saw these prompts. Engines 2 and 3 may deliver batches of earlier tests:
    # a PUB that connects keeps queueing for its peer while no SUB is bound, and hands the
    # queue to the next SUB that binds (interlock's feed tracks seqs, so that is harmless).
    starts = range(0, blocks, BLOCK_SIZE)
    ours = {tuple(prompt[i : i + BLOCK_SIZE]) for prompt in sent for i in starts}
    for other in (2, 3):
        theirs = stored_tokens([batch for _, batch in received[other]])
        chunks = {tuple(theirs[i : i + BLOCK_SIZE]) for i in range(0, len(theirs), BLOCK_SIZE)}
        assert not chunks & ours, other


async def test_every_engine_replays_its_batches_and_equal_tokens_hash_equally_everywhere(
    engine_tier: EngineTier,
) -> None:
    prompt = random_prompt(6, 2 * BLOCK_SIZE + 3)
    hashes = {}
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        for engine in engine_tier.engines:
            await prefill(client, engine, prompt)
            replayed = await replay_kv_batches(engine.replay_endpoint, 0, timeout=TIMEOUT)
            seqs = [seq for seq, _ in replayed]
            assert seqs == list(range(len(replayed))), (engine.id, seqs)
            [event] = [
                event
                for event in stored([batch for _, batch in replayed])
                if list(event.token_ids) == prompt[: 2 * BLOCK_SIZE]
            ]
            hashes[engine.id] = event.block_hashes
    assert len(set(hashes.values())) == 1, hashes


async def test_a_cache_salts_blocks_are_indexed_apart_from_the_same_unsalted_tokens(
    engine_tier: EngineTier,
) -> None:
    # vLLM mixes ``cache_salt`` into block 0's hash and sends it in block 0's extra keys; the
    # mirror must key those blocks by the salt, or an unsalted request with the same tokens
    # would be sent after a cache it cannot use (and a salted one after the unsalted cache).
    engine = engine_tier.engine(1)
    salted_only = random_prompt(31, 3 * BLOCK_SIZE + 2)
    both = random_prompt(32, 2 * BLOCK_SIZE + 1)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        await prefill(client, engine, salted_only, cache_salt="tenant-a")
        await prefill(client, engine, both, cache_salt="tenant-a")
        await prefill(client, engine, both)
    index, events = await mirrored(engine)
    [first] = [e for e in events if list(e.token_ids[:BLOCK_SIZE]) == salted_only[:BLOCK_SIZE]]
    assert first.extra_keys is not None
    assert list(first.extra_keys[0]) == ["tenant-a"], first.extra_keys
    salt = kv_salt(cache_salt="tenant-a")
    assert blocks_found(index, salted_only, salt) == 3
    assert blocks_found(index, salted_only, None) == 0
    assert blocks_found(index, salted_only, kv_salt(cache_salt="tenant-b")) == 0
    assert blocks_found(index, both, salt) == 2
    assert blocks_found(index, both, None) == 2
