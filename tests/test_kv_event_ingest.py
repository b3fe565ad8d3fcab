"""A long prompt's KV events, as a vLLM publishes them, reach the router's index whole: over a
real ZMQ socket into `KvEventFeed`, through the engine's `KvMirror` (which publishes the run as
columns, `StoredBlocks`) into `KvIndexer`; and vLLM's one-event-per-block eviction of it comes
out as one removal. Plus what `StoredBlocks` promises as a sequence.

ZMQ's slow joiner: the publisher resends a warm-up batch on a topic of its own until the feed has
one, so the batches after it arrive in order. Waits are on conditions; `fail_after` only bounds
a hang.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import zmq

from interlock.engines.openai import KvMirror
from interlock.engines.openai._kv_feed import KvEventFeed, kv_topic
from interlock.kv import (
    KvEvent,
    KvIndexer,
    KvRemoved,
    KvStored,
    StoredBlock,
    StoredBlocks,
    compute_block_hashes,
    compute_sequence_hashes,
)
from interlock.wire import (
    KvBatchLayout,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmKvBatch,
    encode_kv_batch,
    kv_message_frames,
)

BLOCK = 16
ENGINE = 3
HANG = 30  # seconds: only a guard against a hang, never a timing assertion


class Router:
    """The router's side of one engine: its mirror publishing into an index."""

    def __init__(self) -> None:
        self.index = KvIndexer()
        self.published: list[KvEvent] = []
        self.mirror = KvMirror(ENGINE, BLOCK, self.publish)
        self.changed = trio.Event()

    def publish(self, event: KvEvent) -> None:
        self.published.append(event)
        self.index.apply(event)

    def on_batch(self, seq: int, batch: VllmKvBatch) -> None:
        self.mirror.on_batch(seq, batch)
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        while len(self.published) < count:
            await self.changed.wait()
            self.changed = trio.Event()


@asynccontextmanager
async def engine_publishing_to(feed: KvEventFeed) -> AsyncIterator[zmq.Socket[Any]]:
    """A PUB connected to the feed as vLLM's is, past ZMQ's slow-joiner window."""
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(feed.endpoint)
    warmed = trio.Event()
    unsubscribe = feed.subscribe(10**6, lambda _seq, _batch: warmed.set())
    try:
        empty = encode_kv_batch(VllmKvBatch(ts=0.0, events=()))
        while not warmed.is_set():
            pub.send_multipart(kv_message_frames(kv_topic(10**6), 0, empty))
            with trio.move_on_after(0.05):
                await warmed.wait()
        unsubscribe()
        yield pub
    finally:
        pub.close(linger=0)


@pytest.mark.parametrize("layout", ["map", "array"])
async def test_a_100k_token_prompts_blocks_reach_the_index_and_leave_it(
    layout: KvBatchLayout,
) -> None:
    rng = random.Random(7)
    tokens = [rng.randrange(151_936) for _ in range(100_000)]
    local = compute_block_hashes(tokens, BLOCK)
    ids = compute_sequence_hashes(local)  # vLLM's ids are its own; any unique u64 do
    stored = VllmBlockStored(
        block_hashes=ids,
        parent_block_hash=None,
        token_ids=tokens,
        block_size=BLOCK,
        medium="GPU",
        extra_keys=[None] * len(ids),
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )
    # vLLM's lazy eviction: one BlockRemoved of one hash per block, all in one step's batch.
    evicted = [VllmBlockRemoved([h], "GPU", 0) for h in reversed(ids)]
    router = Router()
    feed = KvEventFeed("tcp://127.0.0.1:0")
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(feed.run)
            feed.subscribe(ENGINE, router.on_batch)
            async with engine_publishing_to(feed) as pub:
                before = feed.stats
                for seq, events in enumerate([[stored], evicted]):
                    payload = encode_kv_batch(VllmKvBatch(1.0, events, 0), layout=layout)
                    pub.send_multipart(kv_message_frames(kv_topic(ENGINE), seq, payload))
                    await router.wait_for(seq + 1)
                    if seq == 0:
                        scores = router.index.find_matches(compute_block_hashes(tokens, BLOCK))
                        assert scores.scores == {ENGINE: 6_250}
                        assert router.index.node_count == 6_250
            after = feed.stats
            nursery.cancel_scope.cancel()
    first, second = router.published
    assert isinstance(first, KvStored) and type(first.blocks) is StoredBlocks
    assert first.blocks.block_hashes == tuple(ids) and first.blocks.tokens_hashes == tuple(local)
    assert isinstance(second, KvRemoved) and second.block_hashes == tuple(reversed(ids))
    assert router.index.tree_size(ENGINE) == 0 and router.index.node_count == 0
    assert router.mirror.blocks() == {}
    assert after.delivered - before.delivered == 2 and after.undecodable == before.undecodable


def test_a_prompt_extending_other_workers_blocks_is_filed_under_them() -> None:
    # The bulk path walks the part of the tree other workers hold, then adds the rest.
    index = KvIndexer()
    shared = [101, 102, 103]
    index.apply(KvStored(1, 0, None, StoredBlocks([1, 2, 3], shared)))
    index.apply(KvStored(2, 0, None, StoredBlocks(range(10, 30), [*shared, *range(200, 217)])))
    assert index.node_count == 20
    assert index.find_matches([*shared, 200]).scores == {1: 3, 2: 4}
    # The same worker again under fresh ids: the nodes are shared, nothing leaks when removed.
    index.apply(KvStored(2, 1, None, StoredBlocks(range(40, 60), [*shared, *range(200, 217)])))
    index.apply(KvRemoved(2, 2, range(10, 30)))
    assert index.find_matches([*shared, *range(200, 217)]).scores == {1: 3, 2: 20}
    index.apply(KvRemoved(2, 3, range(40, 60)))
    assert index.node_count == 3 and index.find_matches(shared).scores == {1: 3}


# -- StoredBlocks -------------------------------------------------------------------------------


def test_stored_blocks_read_as_the_blocks_they_hold() -> None:
    columns = StoredBlocks([1, 2, 3], [10, 20, 30])
    blocks = (StoredBlock(1, 10), StoredBlock(2, 20), StoredBlock(3, 30))
    assert len(columns) == 3 and tuple(columns) == blocks
    assert columns[1] == StoredBlock(2, 20) and columns[-1] == StoredBlock(3, 30)
    assert columns[1:] == StoredBlocks([2, 3], [20, 30]) == blocks[1:]
    assert columns == blocks and blocks == columns and columns != blocks[:2]
    assert hash(columns) == hash(blocks)
    assert StoredBlock(2, 20) in columns and StoredBlock(2, 30) not in columns
    assert pickle.loads(pickle.dumps(columns)) == columns
    assert KvStored(1, 0, None, columns) == KvStored(1, 0, None, blocks)
    assert KvStored(1, 0, None, columns).blocks is columns
    assert type(KvStored(1, 0, None, list(blocks)).blocks) is tuple


def test_stored_blocks_need_one_tokens_hash_per_block() -> None:
    with pytest.raises(ValueError, match="one tokens hash per block hash"):
        StoredBlocks([1, 2], [10])
