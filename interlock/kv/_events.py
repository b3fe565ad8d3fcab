"""KV-cache events as the router consumes them (reference/dynamo.md section 2.3).

These are router-internal values, not wire shapes: the wire layer decodes an engine's feed (vLLM's
``KVEventBatch``, an interlock worker's frames) and builds them, computing ``tokens_hash`` with
:func:`~interlock.kv.compute_block_hashes` from the block's token ids.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

__all__ = ["KV_EVENT_TYPES", "KvCleared", "KvEvent", "KvRemoved", "KvStored", "StoredBlock"]


def _blocks(blocks: Iterable[StoredBlock]) -> tuple[StoredBlock, ...]:
    return tuple(blocks)


def _hashes(hashes: Iterable[int]) -> tuple[int, ...]:
    return tuple(hashes)


@attrs.frozen
class StoredBlock:
    """One full block an engine has cached.

    ``block_hash`` is the engine's own opaque block id (vLLM's hash reinterpreted as ``u64``), used
    only to link a child to its parent and to name the block in later removals. ``tokens_hash`` is
    our contract hash of the block's tokens; it keys the prefix tree, so engines need not share
    our hash function for their ids.
    """

    block_hash: int
    tokens_hash: int


@attrs.frozen
class KvStored:
    """An engine cached ``blocks``, a chain: each block's parent is the one before it, and the
    first block's parent is ``parent_hash`` (an earlier ``block_hash``; ``None`` for a prefix that
    starts at the beginning of a prompt)."""

    worker_id: int
    event_id: int
    parent_hash: int | None
    blocks: tuple[StoredBlock, ...] = attrs.field(converter=_blocks)
    dp_rank: int = 0


@attrs.frozen
class KvRemoved:
    """An engine evicted the blocks named by their engine ``block_hash`` values."""

    worker_id: int
    event_id: int
    block_hashes: tuple[int, ...] = attrs.field(converter=_hashes)
    dp_rank: int = 0


@attrs.frozen
class KvCleared:
    """An engine dropped its whole cache."""

    worker_id: int
    event_id: int
    dp_rank: int = 0


KvEvent = KvStored | KvRemoved | KvCleared
"""Any event :meth:`~interlock.kv.KvIndexer.apply` accepts."""

#: The event classes, for ``isinstance`` checks that pick KV events out of a worker's events.
KV_EVENT_TYPES: tuple[type, ...] = (KvStored, KvRemoved, KvCleared)
