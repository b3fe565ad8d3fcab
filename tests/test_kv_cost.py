"""The `kv` routing mode's cost policy: the formula, deterministic tie-breaks, seeded sampling,
and replaying a decision from its logged record."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import attrs
import cattrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from interlock.kv import (
    CandidateScore,
    KvSelection,
    OverlapScores,
    SelectionReason,
    WorkerLoadView,
    replay_kv_selection,
    select_worker,
)

BS = 16


def views(*ids: int) -> list[WorkerLoadView]:
    return [WorkerLoadView(worker_id) for worker_id in ids]


def overlaps(scores: dict[int, int], sizes: dict[int, int] | None = None) -> OverlapScores:
    return OverlapScores(scores, sizes or {})


class TestFormula:
    def test_terms_of_each_candidate(self) -> None:
        # isl 100 = 6 full blocks + 4 tokens, 7 blocks in all.
        selection = select_worker(
            [WorkerLoadView(1, 20, 5), WorkerLoadView(2, 0, 50, new_decode_blocks=3)],
            overlaps({1: 4}, {1: 9, 2: 2}),
            isl=100,
            block_size=BS,
            overlap_score_weight=2.0,
        )
        one, two = selection.candidates
        # prefill = 100 - 4*16 + 20; decode = 5 + (7 - 4); logit = 2 * 56/16 + 8
        assert one == CandidateScore(1, 4, 9, 56, 8, 15.0)
        # no overlap; the caller's own count of new blocks
        assert two == CandidateScore(2, 0, 2, 100, 53, 2 * 100 / 16 + 53)
        assert selection.chosen == 1
        assert selection.reason is SelectionReason.LOWEST_COST
        assert selection.candidate(2) == two

    def test_overlap_never_exceeds_the_prompts_full_blocks(self) -> None:
        selection = select_worker(views(1), overlaps({1: 50}), isl=40, block_size=BS)
        assert selection.overlap_blocks == (2,)
        assert selection.prefill_tokens == (8,)

    def test_more_overlap_wins_when_loads_are_equal(self) -> None:
        selection = select_worker(views(1, 2, 3), overlaps({2: 3, 3: 1}), isl=64, block_size=BS)
        assert selection.chosen == 2

    def test_load_can_outweigh_overlap(self) -> None:
        busy = WorkerLoadView(1, active_prefill_tokens=4_000)
        selection = select_worker(
            [busy, WorkerLoadView(2)], overlaps({1: 4}), isl=64, block_size=BS
        )
        assert selection.chosen == 2

    @given(
        st.lists(st.integers(min_value=0, max_value=20), min_size=2, max_size=6),
        st.lists(st.integers(min_value=0, max_value=20), min_size=2, max_size=6),
        st.integers(min_value=0, max_value=400),
    )
    def test_weight_zero_ignores_overlap(
        self, first: list[int], second: list[int], isl: int
    ) -> None:
        candidates = [
            WorkerLoadView(w, active_prefill_tokens=7 * w % 50, active_decode_blocks=w % 3)
            for w in range(len(first))
        ]
        a = select_worker(candidates, overlaps(dict(enumerate(first))), isl, BS, 0.0)
        b = select_worker(candidates, overlaps(dict(enumerate(second))), isl, BS, 0.0)
        assert a.chosen == b.chosen
        assert a.logits == b.logits
        assert set(a.overlap_blocks) == {0}


class TestTemperatureZero:
    def test_ties_go_to_the_smallest_tree_then_the_lowest_id(self) -> None:
        selection = select_worker(views(5, 3, 4), overlaps({}, {5: 1, 3: 7, 4: 1}), 32, BS)
        assert (selection.chosen, selection.reason) == (4, SelectionReason.TIE_LOWEST_WORKER_ID)
        selection = select_worker(views(5, 3, 4), overlaps({}, {5: 1, 3: 7, 4: 2}), 32, BS)
        assert (selection.chosen, selection.reason) == (5, SelectionReason.TIE_SMALLEST_TREE)

    def test_ties_only_among_the_lowest_logit(self) -> None:
        candidates = [WorkerLoadView(1), WorkerLoadView(2), WorkerLoadView(3, 0, 9)]
        selection = select_worker(candidates, overlaps({}, {1: 5, 2: 6, 3: 0}), 32, BS)
        assert (selection.chosen, selection.reason) == (1, SelectionReason.TIE_SMALLEST_TREE)

    def test_a_missing_worker_has_no_overlap_and_an_empty_tree(self) -> None:
        selection = select_worker(views(9, 8), overlaps({}, {9: 3}), 32, BS)
        assert selection.tree_sizes == (3, 0)
        assert selection.chosen == 8

    def test_single_candidate(self) -> None:
        rng = random.Random(0)
        selection = select_worker(views(4), overlaps({}), 32, BS, temperature=1.0, rng=rng)
        assert (selection.chosen, selection.reason, selection.draw) == (
            4,
            SelectionReason.ONLY_CANDIDATE,
            None,
        )

    @given(st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=8))
    def test_picks_a_lowest_logit_and_never_draws(self, prefill: list[int]) -> None:
        candidates = [
            WorkerLoadView(w, active_prefill_tokens=p * BS) for w, p in enumerate(prefill)
        ]
        rng = random.Random(7)
        state = rng.getstate()
        selection = select_worker(candidates, overlaps({}), 32, BS, rng=rng)
        assert rng.getstate() == state
        assert selection.draw is None
        assert selection.logits[selection.worker_ids.index(selection.chosen)] == min(
            selection.logits
        )
        assert selection.chosen == prefill.index(min(prefill))


class TestSampling:
    def test_a_seeded_rng_gives_the_same_choices(self) -> None:
        candidates = [WorkerLoadView(w, active_prefill_tokens=w * 100) for w in range(6)]

        def run(seed: int) -> list[int]:
            rng = random.Random(seed)
            return [
                select_worker(candidates, overlaps({}), 64, BS, 1.0, 0.5, rng).chosen
                for _ in range(200)
            ]

        assert run(3) == run(3)
        assert run(3) != run(4)

    def test_records_the_draw_it_used(self) -> None:
        selection = select_worker(views(1, 2), overlaps({1: 2}), 64, BS, 1.0, 1.0, random.Random(9))
        assert selection.draw == random.Random(9).random()
        assert selection.reason is SelectionReason.SAMPLED

    def test_lower_logits_are_chosen_more_often(self) -> None:
        candidates = [WorkerLoadView(1), WorkerLoadView(2, active_prefill_tokens=10 * BS)]
        rng = random.Random(11)
        picks = [
            select_worker(candidates, overlaps({}), 64, BS, 1.0, 0.5, rng).chosen
            for _ in range(1_000)
        ]
        # p(1) = 1 / (1 + e^-2) ~ 0.88 with x = -logit / (max - min) and T = 0.5
        assert 800 < picks.count(1) < 950

    def test_equal_logits_sample_uniformly(self) -> None:
        rng = random.Random(5)
        picks = [
            select_worker(views(1, 2, 3, 4), overlaps({}), 64, BS, 1.0, 2.0, rng)
            for _ in range(400)
        ]
        assert {p.reason for p in picks} == {SelectionReason.SAMPLED_UNIFORM}
        assert {p.chosen for p in picks} == {1, 2, 3, 4}

    def test_sampling_needs_an_rng(self) -> None:
        with pytest.raises(ValueError, match="rng"):
            select_worker(views(1, 2), overlaps({}), 64, BS, 1.0, 0.5)


candidate_loads = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2_000),  # active prefill tokens
        st.integers(min_value=0, max_value=100),  # active decode blocks
        st.integers(min_value=0, max_value=40),  # overlap
        st.integers(min_value=0, max_value=50),  # tree size
        st.none() | st.integers(min_value=0, max_value=10),  # precise new blocks
    ),
    min_size=1,
    max_size=12,
)


@given(
    candidate_loads,
    st.integers(min_value=0, max_value=600),
    st.sampled_from([16, 64, 3]),
    st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    st.sampled_from([0.0, 0.0, 0.1, 1.0, 7.0]),
    st.integers(min_value=0, max_value=2**32),
)
def test_replay_reproduces_the_choice_from_the_logged_record(
    loads: list[tuple[int, int, int, int, int | None]],
    isl: int,
    block_size: int,
    weight: float,
    temperature: float,
    seed: int,
) -> None:
    candidates = [
        WorkerLoadView(100 + i, prefill, decode, new)
        for i, (prefill, decode, _, _, new) in enumerate(loads)
    ]
    found = OverlapScores(
        {100 + i: load[2] for i, load in enumerate(loads) if load[2]},
        {100 + i: load[3] for i, load in enumerate(loads)},
    )
    selection = select_worker(
        candidates, found, isl, block_size, weight, temperature, random.Random(seed)
    )
    assert replay_kv_selection(selection) == selection.chosen
    # The record survives a JSON log line exactly.
    converter = cattrs.Converter()
    line = json.dumps(converter.unstructure(selection))
    logged = converter.structure(json.loads(line), KvSelection)
    assert logged == selection
    assert replay_kv_selection(logged) == selection.chosen
    assert len(selection.candidates) == len(candidates)


def test_replay_rejects_an_altered_record() -> None:
    selection = select_worker(views(1, 2), overlaps({1: 1}), 64, BS)
    with pytest.raises(ValueError, match="logit"):
        replay_kv_selection(attrs.evolve(selection, prefill_tokens=(0, 64)))
    with pytest.raises(ValueError, match="one entry per candidate"):
        replay_kv_selection(attrs.evolve(selection, logits=(1.0,)))
    sampled = select_worker(views(1, 2), overlaps({}), 64, BS, 1.0, 1.0, random.Random(0))
    with pytest.raises(ValueError, match="draw"):
        replay_kv_selection(attrs.evolve(sampled, draw=None))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: select_worker([], overlaps({}), 10, BS), "at least one candidate"),
        (lambda: select_worker(views(1, 1), overlaps({}), 10, BS), "appears twice"),
        (lambda: select_worker(views(1), overlaps({}), -1, BS), "isl"),
        (lambda: select_worker(views(1), overlaps({}), 10, 0), "block_size"),
        (lambda: select_worker(views(1), overlaps({}), 10, BS, -1.0), "overlap_score_weight"),
        (lambda: select_worker(views(1), overlaps({}), 10, BS, float("nan")), "overlap_score"),
        (lambda: select_worker(views(1), overlaps({}), 10, BS, 1.0, -0.1), "temperature"),
        (lambda: WorkerLoadView(1, active_prefill_tokens=-1), "active_prefill_tokens"),
        (lambda: WorkerLoadView(1, new_decode_blocks=-1), "new_decode_blocks"),
    ],
)
def test_bad_inputs_are_rejected_by_name(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
