"""The prefix tree shared by the event-driven and the approximate indexers.

Each node stands for one block at one position of a prompt: it is reached from the root by the
``tokens_hash`` of every block before it. A node's workers are a bitmask over small integer
*slots*, one per worker, because matching a prompt intersects the worker set at every block and an
``int`` AND costs the same whether 8 or 512 workers share a prefix (a ``set`` intersection costs
one probe per member, which made a 16 k-token shared prefix over 512 workers take ~8 ms).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence

import attrs

__all__ = ["OverlapScores"]


@attrs.frozen
class OverlapScores:
    """What an index knows about one prompt.

    ``scores`` maps each worker that holds at least the prompt's first block to the number of
    leading blocks it holds contiguously (its prefix overlap, in blocks). ``tree_sizes`` maps every
    worker the index knows, matched or not, to the number of blocks it has cached. Both are fresh
    dicts the caller may keep or change.
    """

    scores: dict[int, int] = attrs.field(factory=dict)
    tree_sizes: dict[int, int] = attrs.field(factory=dict)


class _Node:
    __slots__ = ("children", "depth", "key", "mask", "parent")

    def __init__(self, parent: _Node | None, key: int) -> None:
        self.children: dict[int, _Node] = {}
        self.mask = 0
        # Blocks from the root to here, inclusive; stored so the matching walk need not count.
        self.depth = 0 if parent is None else parent.depth + 1
        # A node with no parent is either the root or a detached stand-in for a parent block that
        # a dump did not contain; both stop pruning.
        self.parent = parent
        self.key = key


_SPARSE_BITS = 12
_BINARY_DIGITS = bytes.maketrans(b"01", b"\x00\x01")


def _slots_of(mask: int) -> Iterator[int]:
    """Yield the slot numbers of the set bits of ``mask`` (a non-negative int), lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class _RadixTree:
    """Nodes, worker slots and the matching walk; the indexers own the bookkeeping of who holds
    what and call :meth:`unset` when a worker lets go of a node."""

    def __init__(self) -> None:
        self.root = _Node(None, 0)
        self.node_count = 0
        self._slot_of: dict[int, int] = {}
        self._worker_at: list[int] = []
        # Freed slots are reused lowest first so masks stay as short as the live worker count.
        self._free_slots: list[int] = []

    def bit_for(self, worker_id: int) -> int:
        """Return the worker's bit, allocating a slot for a new worker."""
        slot = self._slot_of.get(worker_id)
        if slot is None:
            if self._free_slots:
                slot = heapq.heappop(self._free_slots)
                self._worker_at[slot] = worker_id
            else:
                slot = len(self._worker_at)
                self._worker_at.append(worker_id)
            self._slot_of[worker_id] = slot
        return 1 << slot

    def release(self, worker_id: int) -> None:
        """Free the worker's slot; the caller has already cleared its bit from every node."""
        slot = self._slot_of.pop(worker_id, None)
        if slot is not None:
            self._worker_at[slot] = -1
            heapq.heappush(self._free_slots, slot)

    def child(self, node: _Node, tokens_hash: int) -> _Node:
        """Return ``node``'s child for ``tokens_hash``, creating it if needed."""
        found = node.children.get(tokens_hash)
        if found is None:
            found = node.children[tokens_hash] = _Node(node, tokens_hash)
            self.node_count += 1
        return found

    def detached(self) -> _Node:
        """Return a new node outside the tree (a stand-in for a parent nobody can match)."""
        self.node_count += 1
        return _Node(None, 0)

    def unset(self, node: _Node, bit: int) -> None:
        """Clear ``bit`` (which must be set) and prune the nodes nobody holds or needs."""
        node.mask ^= bit
        while not node.mask and not node.children:
            parent = node.parent
            if parent is None:
                if node is not self.root:
                    self.node_count -= 1
                return
            del parent.children[node.key]
            self.node_count -= 1
            node = parent

    def match(self, local_hashes: Sequence[int]) -> dict[int, int]:
        """Return ``{worker: contiguous prefix blocks}`` for workers holding at least one block."""
        scores: dict[int, int] = {}
        node = self.root
        active = -1  # every worker is a candidate before the first block
        # This loop is the router's per-block cost on top of hashing (~30 ns a block): one dict
        # probe and, while the worker set is unchanged, one int compare. A miss ends it once, so
        # try/except is cheaper than .get(); depth comes from the node rather than a counter.
        for tokens_hash in local_hashes:
            try:
                node = node.children[tokens_hash]
            except KeyError:
                break
            if node.mask != active:
                kept = node.mask & active
                if kept != active:
                    if node.depth > 1:
                        self._score(scores, active ^ kept, node.depth - 1)
                    active = kept
                    if not kept:
                        break
        if active > 0:
            self._score(scores, active, node.depth)
        return scores

    def _score(self, scores: dict[int, int], mask: int, depth: int) -> None:
        worker_at = self._worker_at
        if mask.bit_count() <= _SPARSE_BITS:
            for slot in _slots_of(mask):
                scores[worker_at[slot]] = depth
        else:
            # Many workers leave at once (a prefix every worker caches): turn the mask into one
            # 0/1 byte per slot and let C pick the worker ids.
            flags = bin(mask)[:1:-1].encode("ascii").translate(_BINARY_DIGITS)
            scores.update(zip(itertools.compress(worker_at, flags), itertools.repeat(depth)))
