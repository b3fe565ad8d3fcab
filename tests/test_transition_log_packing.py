"""The in-memory transition log keeps all but its newest records pickled, out of the garbage
collector's sight, and reading gives back what was offered: records equal to the originals,
of the same types (enums stay enums, token ids keep their class, and a prompt's `U32TokenIds`
are the very object offered), whatever kind of decision each carries, in order, through every
way of reading (`records`, `records(request_id)`, `by_request`, `path`, iteration), across
evictions by count and by bytes."""

from __future__ import annotations

import enum
import gc
import threading
from typing import Any
from unittest import mock

import attrs
import trio
from hypothesis import given
from hypothesis import strategies as st

from interlock import Components, PipelineConfig, build_pipeline
from interlock.actors._messages import MigrationPlan, MigrationRefused
from interlock.engines.mock import MockEngine
from interlock.kv._cost import SelectionReason
from interlock.kv._hashing import PackedTokenIds, U32TokenIds
from interlock.statemachines import MemoryLog, State, TransitionRecord, Trigger, _log
from interlock.statemachines._log import estimate_record_bytes
from interlock.wire import (
    CandidateRecord,
    ModelRewriteDecision,
    PreprocessedRequest,
    RoutingDecision,
    SelectionRecord,
    Usage,
)

_ids = st.lists(st.integers(0, 2**32 - 1), max_size=20)
_token_ids = st.one_of(
    _ids.map(tuple),
    _ids.map(U32TokenIds),
    _ids.map(lambda ids: PackedTokenIds(b"".join(i.to_bytes(4, "little") for i in ids))),
)
_atoms = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
_inputs = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        _atoms | st.sampled_from(SelectionReason),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=8,
    ),
    max_size=4,
)
_candidates = st.builds(
    CandidateRecord,
    worker_id=st.integers(0, 10),
    overlap_blocks=st.integers(0, 100),
    cost=st.none() | st.floats(),
)
_selections = st.builds(
    SelectionRecord,
    leg=st.sampled_from(["agg", "prefill", "decode"]),
    policy=st.sampled_from(["kv", "round_robin", "preselected"]),
    chosen=st.integers(0, 10),
    candidates=st.lists(_candidates, max_size=3).map(tuple),
    excluded=st.lists(st.integers(0, 10), max_size=2).map(tuple),
    reason=st.text(max_size=10),
    inputs=_inputs,
)
_routing = st.builds(
    RoutingDecision,
    request_id=st.text(max_size=5),
    token_ids=_token_ids,
    decode_worker_id=st.integers(0, 10),
    prefill_worker_id=st.none() | st.integers(0, 10),
    selections=st.lists(_selections, max_size=2).map(tuple),
)
_migration = st.builds(
    MigrationPlan,
    request=st.builds(
        PreprocessedRequest, token_ids=_ids.filter(bool), max_tokens=st.integers(1, 9)
    ),
    attempt=st.integers(1, 3),
    exclude=st.frozensets(st.integers(0, 10), max_size=3),
    folded_tokens=st.integers(0, 9),
)


class _Unpicklable:
    """A custom policy's decision that pickle refuses: its batch stays as objects."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


_decisions = st.one_of(
    st.none(),
    _routing,
    _migration,
    st.builds(MigrationRefused, reason=st.text(max_size=10)),
    st.fixed_dictionaries({"error": st.text(max_size=8), "message": st.text(max_size=8)}),
    st.builds(Usage, prompt_tokens=st.integers(0, 9), completion_tokens=st.integers(0, 9)),
    st.builds(
        ModelRewriteDecision,
        rule=st.text(max_size=4),
        model=st.text(max_size=4),
        target=st.text(max_size=4),
        weight=st.integers(1, 5),
        total_weight=st.integers(5, 9),
    ),
    st.builds(_Unpicklable),
)


@st.composite
def _records(draw: st.DrawFn) -> list[TransitionRecord]:
    records = []
    for n in range(draw(st.integers(0, 20))):
        records.append(
            TransitionRecord(
                f"r{draw(st.integers(0, 5))}",
                n,
                draw(st.sampled_from(["discover", "query_only", "discover+migration"])),
                draw(st.floats(0, 1e6)),
                draw(st.floats(0, 2e9)),
                draw(st.sampled_from(State)),
                draw(st.sampled_from([*State, "custom"])),
                draw(st.sampled_from([*Trigger, "custom"])),
                draw(st.none() | st.integers(0, 10)),
                draw(_decisions),
                draw(st.none() | st.text(max_size=10)),
            )
        )
    return records


def _same(got: list[TransitionRecord], want: list[TransitionRecord]) -> None:
    assert got == want
    for a, b in zip(got, want, strict=True):
        for field in ("trigger", "src", "dst", "decision"):
            assert type(getattr(a, field)) is type(getattr(b, field)), (field, a, b)
        ids = getattr(b.decision, "token_ids", None)
        if ids is not None:
            assert type(a.decision.token_ids) is type(ids), a
            if type(ids) is U32TokenIds:
                assert a.decision.token_ids is ids, "the log keeps the prompt's ids by reference"


@given(
    records=_records(),
    batch=st.integers(1, 6),
    capacity=st.integers(1, 40),
    max_bytes=st.none() | st.integers(1, 20_000),
)
def test_reading_gives_back_every_record_kept_equal_and_of_the_same_types(
    records: list[TransitionRecord], batch: int, capacity: int, max_bytes: int | None
) -> None:
    with mock.patch.object(_log, "_PACK_BATCH", batch):
        memory = MemoryLog(capacity, max_bytes)
    for n, record in enumerate(records):
        memory.offer(record)
        kept = records[n + 1 - len(memory) : n + 1]
        _same(memory.records(), kept)
        _same(list(memory), kept)
        assert memory.bytes == sum(estimate_record_bytes(r) for r in kept)
        assert memory.evicted + len(memory) == n + 1
        grouped = memory.by_request()
        assert list(grouped) == list(dict.fromkeys(r.request_id for r in kept))
        for request_id in grouped:
            mine = [r for r in kept if r.request_id == request_id]
            _same(memory.records(request_id), mine)
            _same(grouped[request_id], mine)
            assert memory.path(request_id) == [mine[0].src, *(r.dst for r in mine)]
    assert memory.records("no such request") == []


def test_kept_records_are_not_the_collectors_work() -> None:
    memory = MemoryLog(capacity=100_000)
    for n in range(2_000):
        selection = SelectionRecord(
            leg="agg",
            policy="kv",
            chosen=1,
            candidates=(CandidateRecord(worker_id=1), CandidateRecord(worker_id=2)),
            inputs={"kv": {"reason": SelectionReason.LOWEST_COST, "worker_ids": [1, 2]}},
        )
        decision = RoutingDecision(
            request_id=f"r{n}",
            token_ids=U32TokenIds(range(1_000, 1_016)),
            decode_worker_id=1,
            selections=(selection,),
        )
        memory.offer(TransitionRecord(f"r{n}", 1, "discover", 0.0, 0.0, "a", "b", "c", 1, decision))
    gc.collect()  # untracks the tuples and dicts that hold no tracked object
    tracked: set[int] = set()

    def walk(obj: Any) -> None:
        for ref in gc.get_referents(obj):
            if gc.is_tracked(ref) and not isinstance(ref, type) and id(ref) not in tracked:
                tracked.add(id(ref))
                walk(ref)

    walk(memory)
    # As objects, a routed request's record is ~10 tracked objects (record, decision, selection,
    # two candidates, their tuples, dicts and lists, its prompt's ids); packed, only its ids
    # (kept by reference) and a few objects per batch of 256 records are left.
    assert len(tracked) < 1.2 * len(memory) + 10 * _log._PACK_BATCH, len(tracked)


def test_a_record_pickle_refuses_is_kept_as_it_is() -> None:
    with mock.patch.object(_log, "_PACK_BATCH", 2):
        memory = MemoryLog()
    odd = _Unpicklable()
    records = [
        TransitionRecord("r", n, "discover", 0.0, 0.0, "a", "b", "fail", None, d)
        for n, d in enumerate([odd, None, None])
    ]
    for record in records:
        memory.offer(record)
    assert memory.records() == records
    assert memory.records()[0].decision is odd


async def test_a_pipelines_oldest_requests_read_back_whole(autojump_clock: trio.abc.Clock) -> None:
    # 100 requests of 4 records each: the first ones are packed (256 records a batch).
    config = PipelineConfig(router_mode="kv")
    async with build_pipeline(config, Components(workers=[MockEngine(1)])) as pipeline:
        for n in range(100):
            request = PreprocessedRequest(
                token_ids=U32TokenIds(range(n, n + 40)), max_tokens=2, request_id=f"req-{n}"
            )
            async for _ in pipeline.generate(request):
                pass
        log = pipeline.transition_log
        assert log._batches, "the test needs packed records"
        assert log.path("req-0") == ["received", "preprocessed", "routed", "decoding", "done"]
        (route,) = [r for r in log.records("req-0") if r.trigger == Trigger.ROUTE]
        assert type(route.trigger) is Trigger
        assert route.decision.token_ids == tuple(range(40))
        assert route.decision.selections[0].policy == "kv"
        assert len(log.by_request()) == 100


class _SkipNote(Exception):
    """What a custom policy may keep in its selection's ``inputs``: an exception with an
    ``__init__`` of its own, which pickles (as its class and ``args``) but does not unpickle
    (``args`` is one message, ``__init__`` wants two)."""

    def __init__(self, worker_id: int, why: str) -> None:
        super().__init__(f"worker {worker_id}: {why}")
        self.worker_id = worker_id


class _Note:
    """A custom policy's inputs value of a plain class: equal only to itself."""

    def __init__(self, text: str) -> None:
        self.text = text


def _custom_route(n: int, inputs: dict[str, Any]) -> TransitionRecord:
    selection = SelectionRecord(leg="agg", policy="mine", chosen=1, inputs=inputs)
    decision = RoutingDecision(
        request_id=f"r{n}", token_ids=(1, 2, 3), decode_worker_id=1, selections=(selection,)
    )
    return TransitionRecord(
        f"r{n}", 1, "discover", 1.0, 2.0, "preprocessed", "routed", "route", 1, decision
    )


def test_a_decision_that_pickles_but_does_not_unpickle_leaves_the_log_readable() -> None:
    # One custom policy's record among 300 (the first 256 are packed together): reading the
    # log, or any request packed with it, must not raise (reading never did).
    memory = MemoryLog()
    records = [_custom_route(0, {"skipped": [_SkipNote(3, "timed out")]})]
    records += [_custom_route(n, {}) for n in range(1, 300)]
    for record in records:
        memory.offer(record)
    assert memory._batches, "the test needs packed records"
    assert memory.records("r5") == [records[5]]
    assert memory.records() == records
    assert len(memory.by_request()) == 300


def test_a_custom_policys_inputs_read_back_equal_to_those_offered() -> None:
    # docs/transition-logs.md: reading gives "records equal to those recorded" (only `is`
    # tells them apart); a plain object in a custom policy's inputs is equal only to itself.
    memory = MemoryLog()
    records = [_custom_route(n, {"note": _Note(f"turn {n}")}) for n in range(300)]
    for record in records:
        memory.offer(record)
    assert memory._batches, "the test needs packed records"
    assert memory.records() == records


class _Mood(enum.StrEnum):
    """A custom policy's enum: not interlock's, so kept by reference."""

    CALM = "calm"


def test_values_pickle_cannot_give_back_equal_are_the_very_objects_offered() -> None:
    # NaN is not equal to itself (only the same object keeps a record equal); a plain tuple
    # prompt of 8,000 ids would cost ~40 us to pickle; a custom enum's member and an exception
    # would run the application's code on unpickling.
    nan = float("nan")
    prompt = tuple(range(1_000, 9_000))
    error = _SkipNote(2, "full")
    memory = MemoryLog()
    records = [
        _custom_route(n, {"nan": nan, "mood": _Mood.CALM, "error": error}) for n in range(300)
    ]
    records[0] = attrs.evolve(
        records[0], decision=attrs.evolve(records[0].decision, token_ids=prompt)
    )
    for record in records:
        memory.offer(record)
    assert memory._batches, "the test needs packed records"
    read = memory.records()
    assert read == records
    assert read[0].decision.token_ids is prompt
    inputs = read[1].decision.selections[0].inputs
    assert inputs["nan"] is nan and inputs["mood"] is _Mood.CALM and inputs["error"] is error
    # Interlock's own enums and records are pickled (no longer the objects offered), and equal.
    assert read[1].decision is not records[1].decision


def test_an_evicted_records_references_go_at_once() -> None:
    with mock.patch.object(_log, "_PACK_BATCH", 4):
        memory = MemoryLog(capacity=6)
    prompts = [U32TokenIds(range(n, n + 20)) for n in range(8)]
    for n, prompt in enumerate(prompts):
        decision = RoutingDecision(request_id=f"r{n}", token_ids=prompt, decode_worker_id=1)
        memory.offer(TransitionRecord(f"r{n}", 1, "discover", 0.0, 0.0, "a", "b", "route", 1,
                                      decision))  # fmt: skip
    # Records 0 and 1 are evicted from the first batch of four; 2 and 3 are still in it.
    refs = memory._batches[0].refs
    assert not any(ref is prompts[0] or ref is prompts[1] for ref in refs)
    assert [r.decision.token_ids for r in memory.records()] == prompts[2:]
