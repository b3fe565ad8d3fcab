"""Approximate KV index (engines without KV events): learned from routing decisions, forgotten
after a TTL, bounded in size by least-recently-used pruning."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interlock.kv import ApproxKvIndexer


def scores(index: ApproxKvIndexer, hashes: list[int], now: float) -> dict[int, int]:
    return index.find_matches(hashes, now).scores


def test_defaults_follow_the_reference_router() -> None:
    index = ApproxKvIndexer()
    assert (index.ttl, index.max_blocks, index.prune_target) == (120.0, 2**20, 838_860)


def test_a_routed_prompt_matches_on_its_worker() -> None:
    index = ApproxKvIndexer()
    index.record_routed(1, [1, 2, 3], now=0.0)
    index.record_routed(2, [1, 2], now=0.0)
    found = index.find_matches([1, 2, 3, 4], now=1.0)
    assert found.scores == {1: 3, 2: 2}
    assert found.tree_sizes == {1: 3, 2: 2}
    assert len(index) == 5


def test_entries_expire_ttl_after_their_last_use() -> None:
    index = ApproxKvIndexer(ttl=10.0)
    index.record_routed(1, [1, 2, 3], now=0.0)
    assert scores(index, [1, 2, 3], now=9.999) == {1: 3}
    assert scores(index, [1, 2, 3], now=10.0) == {}
    assert len(index) == 0
    assert index.node_count == 0


def test_reuse_refreshes_only_the_blocks_used() -> None:
    index = ApproxKvIndexer(ttl=10.0)
    index.record_routed(1, [1, 2, 3], now=0.0)
    index.record_routed(1, [1, 2], now=6.0)
    assert scores(index, [1, 2, 3], now=12.0) == {1: 2}
    assert index.tree_size(1) == 2
    assert scores(index, [1, 2, 3], now=16.0) == {}


def test_expire_reports_what_it_dropped() -> None:
    index = ApproxKvIndexer(ttl=5.0)
    index.record_routed(1, [1, 2], now=0.0)
    index.record_routed(2, [1], now=3.0)
    assert index.expire(5.0) == 2
    assert index.expire(8.0) == 1
    assert index.expire(100.0) == 0


def test_time_never_runs_backwards() -> None:
    index = ApproxKvIndexer(ttl=10.0)
    index.record_routed(1, [1], now=100.0)
    index.record_routed(2, [1], now=50.0)  # treated as 100.0
    assert scores(index, [1], now=109.0) == {1: 1, 2: 1}
    assert scores(index, [1], now=110.0) == {}


def test_size_bound_prunes_least_recently_used_leaves_first() -> None:
    index = ApproxKvIndexer(max_blocks=10, prune_target_ratio=0.5)
    index.record_routed(1, [1, 2, 3, 4], now=0.0)
    index.record_routed(2, [5, 6, 7, 8], now=1.0)
    assert len(index) == 8
    index.record_routed(1, [9, 10, 11], now=2.0)
    # 11 > 10: drop the 6 oldest entries, each prompt from its tail, down to 5.
    assert len(index) == 5
    assert scores(index, [1, 2, 3, 4], now=3.0) == {}
    assert scores(index, [5, 6, 7, 8], now=3.0) == {2: 2}
    assert scores(index, [9, 10, 11], now=3.0) == {1: 3}
    assert index.find_matches([], now=3.0).tree_sizes == {1: 3, 2: 2}


def test_remove_worker_forgets_it() -> None:
    index = ApproxKvIndexer()
    index.record_routed(1, [1, 2], now=0.0)
    index.record_routed(2, [1, 3], now=0.0)
    index.remove_worker(1)
    index.remove_worker(99)
    assert scores(index, [1, 2], now=0.0) == {2: 1}
    assert len(index) == 2
    assert index.node_count == 2


@pytest.mark.parametrize(
    ("knobs", "name"),
    [
        ({"ttl": 0.0}, "ttl"),
        ({"ttl": float("inf")}, "ttl"),
        ({"max_blocks": 0}, "max_blocks"),
        ({"prune_target_ratio": 0.0}, "prune_target_ratio"),
        ({"prune_target_ratio": 1.5}, "prune_target_ratio"),
    ],
)
def test_bad_settings_are_rejected_by_name(knobs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ApproxKvIndexer(**knobs)  # type: ignore[arg-type]


class Model:
    """(worker, prefix) -> last use, oldest first; each record touches its longest prefix first."""

    def __init__(self, ttl: float, max_blocks: int, target: int) -> None:
        self.ttl, self.max_blocks, self.target = ttl, max_blocks, target
        self.entries: OrderedDict[tuple[int, tuple[int, ...]], float] = OrderedDict()

    def expire(self, now: float) -> None:
        for key, stamp in list(self.entries.items()):
            if stamp + self.ttl <= now:
                del self.entries[key]

    def record(self, worker: int, hashes: list[int], now: float) -> None:
        self.expire(now)
        for end in range(len(hashes), 0, -1):
            key = (worker, tuple(hashes[:end]))
            self.entries[key] = now
            self.entries.move_to_end(key)
        if len(self.entries) > self.max_blocks:
            while len(self.entries) > self.target:
                self.entries.popitem(last=False)

    def scores(self, hashes: list[int], now: float) -> dict[int, int]:
        self.expire(now)
        out = {}
        for worker in {w for w, _ in self.entries}:
            depth = 0
            while depth < len(hashes) and (worker, tuple(hashes[: depth + 1])) in self.entries:
                depth += 1
            if depth:
                out[worker] = depth
        return out


operations = st.lists(
    st.tuples(
        st.sampled_from(["record", "match"]),
        st.integers(min_value=1, max_value=3),  # worker
        st.lists(st.integers(min_value=1, max_value=3), max_size=6),  # block hashes
        st.floats(min_value=0.001, max_value=6.0),  # time step
    ),
    max_size=40,
)


@given(operations)
def test_equals_a_plain_lru_model(ops: list[tuple[str, int, list[int], float]]) -> None:
    index = ApproxKvIndexer(ttl=10.0, max_blocks=12, prune_target_ratio=0.5)
    model = Model(10.0, 12, 6)
    now = 0.0
    for op, worker, hashes, step in ops:
        now += step  # strictly increasing, so "least recently used" has one meaning
        if op == "record":
            index.record_routed(worker, hashes, now)
            model.record(worker, hashes, now)
            assert len(index) == len(model.entries) <= 12
        else:
            assert scores(index, hashes, now) == model.scores(hashes, now)
    found = index.find_matches([], now)
    sizes = {w: sum(1 for v, _ in model.entries if v == w) for w in found.tree_sizes}
    assert found.tree_sizes == sizes
