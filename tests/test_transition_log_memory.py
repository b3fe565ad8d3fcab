"""The in-memory transition log is bounded by bytes, not only by a record count: a routing
decision keeps its prompt's token ids, so a count of records hides how much memory they hold.
The estimate of a record's size is near what the record really keeps alive, the bound holds for
any mix of records, the newest records are the ones kept, and a pipeline's log stays within
``transition_log_memory_bytes`` however many requests it serves."""

from __future__ import annotations

import gc
import random
import tracemalloc

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from interlock import Components, PipelineConfig, build_pipeline
from interlock.actors._messages import MigrationPlan
from interlock.engines.mock import MockEngine
from interlock.kv._hashing import U32TokenIds
from interlock.statemachines import MemoryLog, TransitionRecord
from interlock.statemachines._log import estimate_record_bytes
from interlock.wire import (
    CandidateRecord,
    PreprocessedRequest,
    RoutingDecision,
    SelectionRecord,
)


def _fresh_token_ids(count: int, seed: int) -> tuple[int, ...]:
    # Ids above 256 are int objects of their own, as a tokenizer returns them.
    rng = random.Random(seed)
    return tuple(rng.randrange(1_000, 150_000) for _ in range(count))


def _route(request_id: str, tokens: int, seed: int = 0) -> TransitionRecord:
    selection = SelectionRecord(
        leg="agg",
        policy="kv",
        chosen=1,
        candidates=(CandidateRecord(worker_id=1, cost=1.0), CandidateRecord(worker_id=2)),
        reason="lowest cost",
        inputs={"overlap_score_weight": 1.0, "temperature": 0.0},
    )
    decision = RoutingDecision(
        request_id=request_id,
        token_ids=_fresh_token_ids(tokens, seed),
        decode_worker_id=1,
        selections=(selection,),
    )
    return TransitionRecord(
        request_id, 1, "discover", 1.0, 2.0, "preprocessed", "routed", "route", 1, decision
    )


def _plain(request_id: str, seq: int) -> TransitionRecord:
    return TransitionRecord(
        request_id, seq, "discover", float(seq), 0.0, "routed", "decoding", "start_decode", 1
    )


@pytest.mark.parametrize("tokens", [0, 250, 5_000])
def test_the_estimate_is_near_what_a_routing_record_keeps_alive(tokens: int) -> None:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        record = _route("req-1", tokens, seed=tokens)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    estimate = estimate_record_bytes(record)
    assert kept / 2 <= estimate <= kept * 2, (
        f"a route record with {tokens} prompt tokens keeps {kept} bytes alive; the estimate "
        f"says {estimate}"
    )


def test_a_migration_plan_counts_its_prompt() -> None:
    request = PreprocessedRequest(token_ids=list(_fresh_token_ids(1_000, 1)), max_tokens=4)
    plan = MigrationPlan(request=request, attempt=1, exclude=frozenset({1}), folded_tokens=3)
    record = TransitionRecord("r", 5, "discover+migration", 0.0, 0.0, "decoding", "migrated",
                              "migrate", 1, plan)  # fmt: skip
    assert estimate_record_bytes(record) >= 1_000 * 32
    assert estimate_record_bytes(_plain("r", 0)) < 1_000


def test_long_prompts_push_out_old_records_by_bytes_not_count() -> None:
    memory = MemoryLog(capacity=100_000, max_bytes=1_000_000)
    for n in range(200):
        memory.offer(_route(f"req-{n}", 2_000, seed=n))
    # A 2,000-token decision is ~80 kB: about a dozen fit in 1 MB, far below the count bound.
    assert 5 <= len(memory) <= 20, len(memory)
    assert memory.bytes <= 1_000_000
    assert memory.evicted == 200 - len(memory)
    assert [r.request_id for r in memory][-1] == "req-199"


def test_a_record_larger_than_the_bound_is_still_kept_alone() -> None:
    memory = MemoryLog(max_bytes=1_000)
    memory.offer(_plain("a", 0))
    memory.offer(_route("b", 1_000))
    assert [r.request_id for r in memory] == ["b"]
    assert memory.evicted == 1


def test_clear_forgets_the_bytes_too() -> None:
    memory = MemoryLog(max_bytes=10_000)
    memory.offer(_route("a", 10))
    memory.clear()
    assert memory.bytes == 0 and len(memory) == 0


@pytest.mark.parametrize(("capacity", "max_bytes"), [(0, None), (10, 0)])
def test_a_bound_below_one_is_refused(capacity: int, max_bytes: int | None) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MemoryLog(capacity, max_bytes)


@given(
    capacity=st.integers(1, 50),
    max_bytes=st.none() | st.integers(1, 200_000),
    prompts=st.lists(st.none() | st.integers(0, 3_000), max_size=80),
)
def test_any_mix_of_records_stays_within_both_bounds_and_keeps_the_newest(
    capacity: int, max_bytes: int | None, prompts: list[int | None]
) -> None:
    memory = MemoryLog(capacity, max_bytes)
    offered = []
    for n, tokens in enumerate(prompts):
        record = _plain(f"r{n}", n) if tokens is None else _route(f"r{n}", tokens, seed=n)
        offered.append(record)
        memory.offer(record)
        kept = list(memory)
        assert kept == offered[len(offered) - len(kept) :], "not the newest records, in order"
        assert 1 <= len(kept) <= capacity
        assert memory.bytes == sum(estimate_record_bytes(r) for r in kept)
        if max_bytes is not None and len(kept) > 1:
            assert memory.bytes <= max_bytes
        assert memory.evicted + len(kept) == len(offered)


async def test_a_pipeline_log_stays_within_its_byte_bound(autojump_clock: trio.abc.Clock) -> None:
    bound = 400_000
    config = PipelineConfig(transition_log_memory_bytes=bound)
    async with build_pipeline(config, Components(workers=[MockEngine(1)])) as pipeline:
        for n in range(60):
            request = PreprocessedRequest(
                token_ids=list(_fresh_token_ids(1_000, n)), max_tokens=2, request_id=f"req-{n}"
            )
            async for _ in pipeline.generate(request):
                pass
        log = pipeline.transition_log
        assert log.bytes <= bound
        assert log.evicted > 0, "60 requests of 1,000 tokens should not fit in 400 kB"
        # The newest request's whole path is there.
        assert log.path("req-59") == ["received", "preprocessed", "routed", "decoding", "done"]


def test_the_default_bound_is_in_bytes() -> None:
    default = PipelineConfig().transition_log_memory_bytes
    assert default is not None and 16 * 2**20 <= default <= 64 * 2**20


def test_a_logs_memory_stays_near_its_byte_bound_once_old_records_are_evicted() -> None:
    # Routing records whose prompts' ids are a tokenizer's (`U32TokenIds`), 256 of them just
    # within the bound: each newer one pushes an older one out, and the memory the log keeps
    # alive stays near the bound (the estimate is close for these records).
    bound = 4_000_000
    gc.collect()
    tracemalloc.start()
    try:
        memory = MemoryLog(capacity=100_000, max_bytes=bound)
        for n in range(256 + 250):
            record = _route(f"req-{n}", 360, seed=n)
            ids = U32TokenIds(record.decision.token_ids)
            decision = attrs.evolve(record.decision, token_ids=ids)
            memory.offer(attrs.evolve(record, decision=decision))
        del record, ids, decision
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert memory.evicted >= 240 and memory.bytes <= bound
    assert kept <= 1.25 * bound, f"the log keeps {kept} bytes alive under a bound of {bound}"
