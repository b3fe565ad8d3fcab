"""KV-aware routing primitives: block hashing, the prefix-tree indexes, and the cost policy.

Synchronous and dependency-light: no trio, no actors. The Router actor owns one index and calls
it; time is passed in explicitly. Per request::

    hashes = compute_block_hashes(token_ids, block_size)
    overlaps = indexer.find_matches(hashes)
    selection = select_worker(views, overlaps, len(token_ids), block_size, weight, temperature, rng)
"""

from __future__ import annotations

from interlock.kv._approx import ApproxKvIndexer
from interlock.kv._cost import (
    CandidateScore,
    KvSelection,
    SelectionReason,
    WorkerLoadView,
    replay_kv_selection,
    select_worker,
)
from interlock.kv._events import (
    KV_EVENT_TYPES,
    KvCleared,
    KvEvent,
    KvRemoved,
    KvStored,
    StoredBlock,
    StoredBlocks,
)
from interlock.kv._hashing import (
    XXH3_SEED,
    compute_block_hashes,
    compute_sequence_hashes,
    kv_salt,
)
from interlock.kv._indexer import (
    EventGap,
    KvIndexer,
    KvIndexError,
    ParentBlockNotFound,
    WorkerOutOfSync,
)
from interlock.kv._tree import OverlapScores
from interlock.kv._ttft import TtftModel, TtftSelection, replay_ttft_selection, select_by_ttft

__all__ = [
    "KV_EVENT_TYPES",
    "XXH3_SEED",
    "ApproxKvIndexer",
    "CandidateScore",
    "EventGap",
    "KvCleared",
    "KvEvent",
    "KvIndexError",
    "KvIndexer",
    "KvRemoved",
    "KvSelection",
    "KvStored",
    "OverlapScores",
    "ParentBlockNotFound",
    "SelectionReason",
    "StoredBlock",
    "StoredBlocks",
    "TtftModel",
    "TtftSelection",
    "WorkerLoadView",
    "WorkerOutOfSync",
    "compute_block_hashes",
    "compute_sequence_hashes",
    "kv_salt",
    "replay_kv_selection",
    "replay_ttft_selection",
    "select_by_ttft",
    "select_worker",
]
