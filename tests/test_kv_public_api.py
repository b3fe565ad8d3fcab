"""The public surface of `interlock.kv`: an accidental export or removal fails here."""

from __future__ import annotations

import interlock.kv

EXPECTED = {
    "KV_EVENT_TYPES",
    # hashing (a contract)
    "XXH3_SEED",
    "compute_block_hashes",
    "compute_sequence_hashes",
    "kv_salt",  # a LoRA adapter's / cache salt's blocks
    # events
    "KvCleared",
    "KvEvent",
    "KvRemoved",
    "KvStored",
    "StoredBlock",
    "StoredBlocks",
    "TtftModel",
    "TtftSelection",
    # indexes
    "ApproxKvIndexer",
    "KvIndexer",
    "OverlapScores",
    # index errors
    "EventGap",
    "KvIndexError",
    "ParentBlockNotFound",
    "WorkerOutOfSync",
    # cost policy
    "CandidateScore",
    "KvSelection",
    "SelectionReason",
    "WorkerLoadView",
    "replay_kv_selection",
    "replay_ttft_selection",
    "select_by_ttft",
    "select_worker",
}


def test_all_lists_exactly_the_public_names() -> None:
    assert set(interlock.kv.__all__) == EXPECTED
    assert len(interlock.kv.__all__) == len(EXPECTED)


def test_every_public_name_exists_and_nothing_else_is_public() -> None:
    public = {name for name in vars(interlock.kv) if not name.startswith("_")}
    # Submodules appear as attributes once imported; they are private (underscored) anyway.
    assert public - {"annotations"} == EXPECTED


def test_every_public_name_is_documented() -> None:
    for name in EXPECTED - {"XXH3_SEED", "KvEvent"}:
        assert getattr(interlock.kv, name).__doc__, name
