"""KV-cache events as the router consumes them (reference/dynamo.md section 2.3).

These are router-internal values, not wire shapes: the wire layer decodes an engine's feed (vLLM's
``KVEventBatch``, an interlock worker's frames) and builds them, computing ``tokens_hash`` with
:func:`~interlock.kv.compute_block_hashes` from the block's token ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import attrs

__all__ = [
    "KV_EVENT_TYPES",
    "KvCleared",
    "KvEvent",
    "KvRemoved",
    "KvStored",
    "StoredBlock",
    "StoredBlocks",
]


def _blocks(blocks: Iterable[StoredBlock]) -> Sequence[StoredBlock]:
    return blocks if type(blocks) is StoredBlocks else tuple(blocks)


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


class StoredBlocks(Sequence[StoredBlock]):
    """A run of stored blocks held as two columns: block ``i`` is
    ``StoredBlock(block_hashes[i], tokens_hashes[i])``.

    What an engine adapter builds when blocks arrive by the thousand (a long prompt's prefill is
    one event of 6,250 blocks at 100k tokens): `KvIndexer` stores the columns in one pass, where
    one `StoredBlock` per block cost more than indexing it. It reads as an immutable sequence of
    `StoredBlock` (made on access) and compares equal to any sequence of the same blocks.

    Raises ``ValueError`` when the columns differ in length.
    """

    __slots__ = ("block_hashes", "tokens_hashes")

    block_hashes: tuple[int, ...]
    tokens_hashes: tuple[int, ...]

    def __init__(self, block_hashes: Iterable[int], tokens_hashes: Iterable[int]) -> None:
        self.block_hashes = tuple(block_hashes)
        self.tokens_hashes = tuple(tokens_hashes)
        if len(self.block_hashes) != len(self.tokens_hashes):
            raise ValueError(
                f"StoredBlocks needs one tokens hash per block hash, got "
                f"{len(self.block_hashes)} block hashes and {len(self.tokens_hashes)} tokens hashes"
            )

    def __len__(self) -> int:
        return len(self.block_hashes)

    @overload
    def __getitem__(self, index: int) -> StoredBlock: ...

    @overload
    def __getitem__(self, index: slice) -> StoredBlocks: ...

    def __getitem__(self, index: int | slice) -> StoredBlock | StoredBlocks:
        if isinstance(index, slice):
            return StoredBlocks(self.block_hashes[index], self.tokens_hashes[index])
        return StoredBlock(self.block_hashes[index], self.tokens_hashes[index])

    def __iter__(self) -> Iterator[StoredBlock]:
        return map(StoredBlock, self.block_hashes, self.tokens_hashes)

    def __eq__(self, other: object) -> bool:
        if type(other) is StoredBlocks:
            return (
                self.block_hashes == other.block_hashes
                and self.tokens_hashes == other.tokens_hashes
            )
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        # Equal to a tuple of the same blocks, so it hashes as one.
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"StoredBlocks({self.block_hashes!r}, {self.tokens_hashes!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return StoredBlocks, (self.block_hashes, self.tokens_hashes)


@attrs.frozen
class KvStored:
    """An engine cached ``blocks``, a chain: each block's parent is the one before it, and the
    first block's parent is ``parent_hash`` (an earlier ``block_hash``; ``None`` for a prefix that
    starts at the beginning of a prompt).

    ``blocks`` is kept as given when it is a `StoredBlocks` (columns, the cheap form for long
    runs) and made a tuple otherwise.
    """

    worker_id: int
    event_id: int
    parent_hash: int | None
    blocks: Sequence[StoredBlock] = attrs.field(converter=_blocks)
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
