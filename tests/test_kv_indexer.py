"""The event-driven KV index: stored/removed/cleared events, contiguous-prefix matching, event-id
gaps and dumps. The state-machine test at the end drives it against a plain reference model."""

from __future__ import annotations

import pytest

from interlock.kv import (
    EventGap,
    KvCleared,
    KvIndexer,
    KvRemoved,
    KvStored,
    ParentBlockNotFound,
    StoredBlock,
    WorkerOutOfSync,
)


def chain(
    worker: int, event_id: int, tokens: list[int], *, parent: int | None = None, ids: int = 0
) -> KvStored:
    """A stored chain whose engine block ids are ``ids + tokens_hash`` (distinct per test)."""
    return KvStored(worker, event_id, parent, tuple(StoredBlock(ids + t, t) for t in tokens))


def scores(index: KvIndexer, hashes: list[int]) -> dict[int, int]:
    return index.find_matches(hashes).scores


class TestStoredRemovedCleared:
    def test_stored_chain_matches_its_prefix(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [10, 11, 12]))
        assert scores(index, [10, 11, 12]) == {1: 3}
        assert scores(index, [10, 11, 12, 13]) == {1: 3}
        assert scores(index, [10, 11]) == {1: 2}
        assert scores(index, [11, 12]) == {}
        assert scores(index, []) == {}

    def test_stored_extends_a_parent_block(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [10, 11]))
        index.apply(chain(1, 1, [12], parent=11))
        assert scores(index, [10, 11, 12]) == {1: 3}
        assert index.snapshot(1) == {10: (10,), 11: (10, 11), 12: (10, 11, 12)}

    def test_removed_block_breaks_the_contiguous_prefix(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [10, 11, 12, 13]))
        index.apply(KvRemoved(1, 1, (11,)))
        # Blocks 12 and 13 are still cached, but a prompt can only reuse a prefix.
        assert scores(index, [10, 11, 12, 13]) == {1: 1}
        assert index.blocks_of(1) == {10, 12, 13}
        assert index.tree_size(1) == 3

    def test_removing_an_unknown_block_is_ignored(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [10]))
        index.apply(KvRemoved(1, 1, (999,)))
        assert index.blocks_of(1) == {10}
        assert index.last_event_id(1) == 1

    def test_cleared_drops_only_that_worker(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [10, 11]))
        index.apply(chain(2, 0, [10, 11]))
        index.apply(KvCleared(1, 1))
        assert scores(index, [10, 11]) == {2: 2}
        assert index.tree_size(1) == 0
        assert index.workers == {1, 2}

    def test_a_parent_can_be_extended_after_its_own_parent_was_evicted(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [10, 11]))
        index.apply(KvRemoved(1, 1, (10,)))
        index.apply(chain(1, 2, [12], parent=11))
        assert scores(index, [10, 11, 12]) == {}
        index.apply(chain(1, 3, [10]))
        assert scores(index, [10, 11, 12]) == {1: 3}

    def test_restoring_a_held_block_is_idempotent(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [10, 11]))
        index.apply(chain(1, 1, [10, 11]))
        assert index.tree_size(1) == 2
        index.apply(KvRemoved(1, 2, (11,)))
        assert scores(index, [10, 11]) == {1: 1}

    def test_identical_blocks_under_two_engine_ids_are_held_until_both_go(self) -> None:
        # An engine without prefix caching gives identical content fresh random ids.
        index = KvIndexer()
        index.apply(chain(1, 0, [10, 11], ids=100))
        index.apply(chain(1, 1, [10, 11], ids=200))
        assert index.tree_size(1) == 4
        index.apply(KvRemoved(1, 2, (111,)))
        assert scores(index, [10, 11]) == {1: 2}
        index.apply(KvRemoved(1, 3, (211,)))
        assert scores(index, [10, 11]) == {1: 1}

    def test_tree_sizes_list_every_known_worker(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [10, 11, 12]))
        index.apply(chain(2, 0, [20]))
        index.apply(KvRemoved(3, 0, (5,)))
        found = index.find_matches([10])
        assert found.scores == {1: 1}
        assert found.tree_sizes == {1: 3, 2: 1, 3: 0}


class TestMatching:
    def test_each_worker_scores_its_own_contiguous_prefix(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1, 2, 3, 4]))
        index.apply(chain(2, 0, [1, 2]))
        index.apply(chain(3, 0, [1, 2, 3, 9]))
        index.apply(chain(4, 0, [7, 8]))
        assert scores(index, [1, 2, 3, 4, 5]) == {1: 4, 2: 2, 3: 3}

    def test_a_worker_must_hold_the_first_block(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1, 2, 3]))
        index.apply(KvRemoved(1, 1, (1,)))
        assert scores(index, [1, 2, 3]) == {}

    def test_many_workers_leaving_at_once(self) -> None:
        index = KvIndexer()
        for worker in range(300):
            index.apply(chain(worker, 0, [1, 2, 3] if worker % 3 else [1, 2]))
        found = scores(index, [1, 2, 3])
        assert found == {w: (3 if w % 3 else 2) for w in range(300)}

    def test_the_same_tokens_at_another_position_do_not_match(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [5, 6]))
        assert scores(index, [6]) == {}
        assert scores(index, [5, 5, 6]) == {1: 1}

    def test_find_matches_returns_fresh_dicts(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1]))
        found = index.find_matches([1])
        found.scores.clear()
        found.tree_sizes.clear()
        assert index.find_matches([1]).scores == {1: 1}
        assert index.find_matches([1]).tree_sizes == {1: 1}


class TestWorkersAndMemory:
    def test_remove_worker_drops_its_entries_and_prunes_the_tree(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1, 2, 3]))
        index.apply(chain(2, 0, [1, 2, 4]))
        assert index.node_count == 4
        index.remove_worker(1)
        assert scores(index, [1, 2, 3]) == {2: 2}
        assert index.node_count == 3
        assert index.workers == {2}
        assert index.last_event_id(1) is None
        index.remove_worker(2)
        assert index.node_count == 0
        assert index.find_matches([1, 2]).tree_sizes == {}

    def test_removed_blocks_are_pruned(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1, 2, 3]))
        index.apply(KvRemoved(1, 1, (1,)))
        # Block 1's node stays: the worker still holds 2 and 3 below it.
        assert index.node_count == 3
        index.apply(KvRemoved(1, 2, (3, 2)))
        assert index.node_count == 0

    def test_removing_an_unknown_worker_is_ignored(self) -> None:
        KvIndexer().remove_worker(42)

    def test_a_removed_worker_starts_again_from_event_zero(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1]))
        index.apply(chain(1, 1, [2]))
        index.remove_worker(1)
        index.apply(chain(1, 0, [3]))
        assert index.blocks_of(1) == {3}

    def test_worker_slots_are_reused_without_leaking_matches(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1, 2]))
        index.apply(chain(2, 0, [1, 2]))
        index.remove_worker(1)
        index.apply(chain(3, 0, [1]))
        assert scores(index, [1, 2]) == {2: 2, 3: 1}

    def test_data_parallel_ranks_need_their_own_worker_ids(self) -> None:
        with pytest.raises(ValueError, match="dp_rank"):
            KvIndexer().apply(KvCleared(1, 0, dp_rank=1))


class TestEventIds:
    def test_a_new_worker_starts_at_event_zero(self) -> None:
        index = KvIndexer()
        with pytest.raises(EventGap) as info:
            index.apply(chain(1, 5, [1]))
        assert (info.value.worker_id, info.value.expected, info.value.got) == (1, 0, 5)
        assert "load_dump" in str(info.value)

    def test_gap_marks_the_worker_out_of_sync_and_holds_later_events(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1]))
        with pytest.raises(EventGap) as info:
            index.apply(chain(1, 2, [2], parent=1))
        assert (info.value.expected, info.value.got) == (1, 2)
        assert isinstance(info.value, WorkerOutOfSync)
        assert not index.is_in_sync(1)
        # Only the first failure raises; the rest wait for the dump.
        index.apply(chain(1, 3, [3], parent=2))
        assert index.blocks_of(1) == {1}
        # Routing still sees the stale blocks meanwhile.
        assert scores(index, [1, 2]) == {1: 1}

    def test_dump_then_replays_the_held_events_after_it(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1]))
        with pytest.raises(EventGap):
            index.apply(chain(1, 2, [2], parent=1))
        index.apply(chain(1, 3, [3], parent=2))
        # The dump reflects events 0 and 1 (the lost one stored block 2): event 2 is replayed.
        index.load_dump(1, [chain(1, 0, [1]), chain(1, 0, [2], parent=1)], last_event_id=1)
        assert index.is_in_sync(1)
        assert index.last_event_id(1) == 3
        assert scores(index, [1, 2, 3]) == {1: 3}

    def test_held_events_the_dump_already_reflects_are_dropped(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1]))
        with pytest.raises(EventGap):
            index.apply(KvCleared(1, 2))
        index.load_dump(1, [chain(1, 0, [7])], last_event_id=2)
        assert index.blocks_of(1) == {7}
        assert index.last_event_id(1) == 2

    def test_a_gap_inside_the_held_events_is_reported_by_load_dump(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1]))
        with pytest.raises(EventGap):
            index.apply(chain(1, 2, [2]))
        index.apply(chain(1, 5, [5]))
        with pytest.raises(EventGap) as info:
            index.load_dump(1, [chain(1, 0, [1]), chain(1, 0, [2])], last_event_id=2)
        assert (info.value.expected, info.value.got) == (3, 5)
        assert not index.is_in_sync(1)
        index.load_dump(1, [chain(1, 0, [9])], last_event_id=5)
        assert index.is_in_sync(1)
        assert index.blocks_of(1) == {9}

    def test_held_events_are_bounded(self) -> None:
        index = KvIndexer(max_pending_events=2)
        index.apply(chain(1, 0, [1]))
        with pytest.raises(EventGap):
            index.apply(chain(1, 2, [2]))
        index.apply(chain(1, 3, [3]))
        index.apply(chain(1, 4, [4]))  # pushes out event 2
        with pytest.raises(EventGap) as info:
            index.load_dump(1, [], last_event_id=1)
        assert (info.value.expected, info.value.got) == (2, 3)

    def test_duplicates_are_ignored(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1]))
        index.apply(KvRemoved(1, 1, (1,)))
        index.apply(chain(1, 0, [1]))
        assert index.blocks_of(1) == frozenset()
        assert index.is_in_sync(1)

    def test_ids_are_per_worker(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1]))
        index.apply(chain(2, 0, [1]))
        index.apply(chain(1, 1, [2]))
        assert (index.last_event_id(1), index.last_event_id(2)) == (1, 0)


class TestUnknownParent:
    def test_stored_on_an_unknown_parent_raises_and_changes_nothing(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1]))
        with pytest.raises(ParentBlockNotFound) as info:
            index.apply(chain(1, 1, [2, 3], parent=77))
        error = info.value
        assert (error.worker_id, error.event_id, error.parent_hash) == (1, 1, 77)
        assert isinstance(error, WorkerOutOfSync)
        assert index.blocks_of(1) == {1}
        assert not index.is_in_sync(1)

    def test_a_parent_held_by_another_worker_does_not_count(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1]))
        with pytest.raises(ParentBlockNotFound):
            index.apply(chain(2, 0, [2], parent=1))

    def test_dump_recovers(self) -> None:
        index = KvIndexer()
        with pytest.raises(ParentBlockNotFound):
            index.apply(chain(1, 0, [2], parent=1))
        index.load_dump(1, [chain(1, 0, [2], parent=1), chain(1, 0, [1])], last_event_id=0)
        assert scores(index, [1, 2]) == {1: 2}


class TestDumps:
    def test_dump_order_does_not_matter(self) -> None:
        index = KvIndexer()
        dump = [chain(1, 0, [4], parent=3), chain(1, 0, [3], parent=2), chain(1, 0, [1, 2])]
        index.load_dump(1, dump, last_event_id=-1)
        assert index.snapshot(1) == {1: (1,), 2: (1, 2), 3: (1, 2, 3), 4: (1, 2, 3, 4)}
        index.apply(chain(1, 0, [5], parent=4))
        assert scores(index, [1, 2, 3, 4, 5]) == {1: 5}

    def test_a_chain_whose_parent_is_not_in_the_dump_is_kept_but_never_matches(self) -> None:
        index = KvIndexer()
        index.load_dump(1, [chain(1, 0, [1]), chain(1, 0, [3], parent=2)], last_event_id=9)
        assert index.snapshot(1) == {1: (1,), 3: None}
        # The engine may still extend it; that must not fail.
        index.apply(chain(1, 10, [4], parent=3))
        assert index.snapshot(1)[4] is None
        assert scores(index, [1]) == {1: 1}
        index.apply(KvRemoved(1, 11, (3, 4)))
        assert index.node_count == 1

    def test_dump_replaces_the_previous_blocks(self) -> None:
        index = KvIndexer()
        index.apply(chain(1, 0, [1, 2]))
        index.apply(chain(2, 0, [1, 2]))
        index.load_dump(1, [chain(1, 0, [5])], last_event_id=0)
        assert index.blocks_of(1) == {5}
        assert scores(index, [1, 2]) == {2: 2}

    def test_dump_for_a_new_worker(self) -> None:
        index = KvIndexer()
        index.load_dump(7, [chain(7, 0, [1, 2])], last_event_id=41)
        assert index.workers == {7}
        index.apply(chain(7, 42, [3], parent=2))
        assert scores(index, [1, 2, 3]) == {7: 3}

    def test_dump_must_hold_one_workers_blocks(self) -> None:
        with pytest.raises(ValueError, match="exactly one worker"):
            KvIndexer().load_dump(1, [chain(2, 0, [1])], last_event_id=0)
