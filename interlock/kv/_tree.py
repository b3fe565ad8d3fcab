"""The prefix tree shared by the event-driven and the approximate indexers.

Each node stands for one block at one position of a prompt: it is reached from the root by the
``tokens_hash`` of every block before it. Two layout choices carry the performance:

* A node's workers are a bitmask over small integer *slots*, one per worker. Matching intersects
  the worker set at every block, and an ``int`` AND costs the same whether 8 or 512 workers share a
  prefix; a ``set`` intersection costs one probe per member, which made a 16 k-token prefix shared
  by 512 workers take ~8 ms.
* Nodes are integer ids into parallel lists, not objects, and every dict maps ints to ints. CPython
  does not track such dicts for cyclic garbage collection, so a tree of a million blocks adds
  almost nothing to a full collection; with one object per node, a full collection over a
  ~1 M-object heap took ~0.3 s, a pause the Router actor would take in the middle of routing.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections.abc import Iterable, Iterator, Sequence

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


ROOT = 0
_NO_PARENT = -1
_FREED: dict[int, int] = {}
_SPARSE_BITS = 12
_BINARY_DIGITS = bytes.maketrans(b"01", b"\x00\x01")


def _slots_of(mask: int) -> Iterator[int]:
    """Yield the slot numbers of the set bits of ``mask`` (a non-negative int), lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class _RadixTree:
    """Nodes, worker slots and the matching walk. The indexers own the bookkeeping of who holds
    what: they set a worker's bit in :attr:`masks` and call :meth:`unset` when it lets go.

    Node ids are reused once freed, so an id is only meaningful while some worker holds the node
    or one of its descendants.
    """

    def __init__(self) -> None:
        # Parallel per-node columns. A freed node's children are the shared, never-filled _FREED.
        self.children: list[dict[int, int]] = [{}]
        self.masks: list[int] = [0]
        # A node without a parent is the root or a detached stand-in for a parent block a dump
        # did not contain; both stop pruning.
        self.parents = array("q", [_NO_PARENT])
        self.keys = array("Q", [0])
        # Blocks from the root to the node, inclusive, so the matching walk need not count.
        self.depths = array("q", [0])
        self.node_count = 0
        self._free_nodes: list[int] = []
        self._slot_of: dict[int, int] = {}
        self._worker_at: list[int] = []
        # Freed slots are reused lowest first so masks stay as short as the live worker count.
        self._free_slots: list[int] = []

    # -- workers ------------------------------------------------------------------------------

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

    # -- nodes --------------------------------------------------------------------------------

    def child(self, node: int, tokens_hash: int) -> int:
        """Return ``node``'s child for ``tokens_hash``, creating it if needed."""
        kids = self.children[node]
        assert kids is not _FREED, f"node {node} was freed"
        found = kids.get(tokens_hash)
        if found is None:
            found = kids[tokens_hash] = self._new(node, tokens_hash, self.depths[node] + 1)
        return found

    def extend(self, node: int, tokens_hashes: Sequence[int], mask: int) -> tuple[list[int], int]:
        """The batch form of :meth:`child`: the nodes of the chain ``tokens_hashes`` below
        ``node``, creating the missing ones with ``mask`` as their mask.

        Returns ``(nodes, existing)``: one node per hash, of which the first ``existing`` were
        already in the tree (their masks are the caller's to update). The new ones are made in
        bulk: a long prompt's blocks past what any worker holds cost a few C-level passes, not a
        Python call each.
        """
        children = self.children
        nodes: list[int] = []
        for tokens_hash in tokens_hashes:
            found = children[node].get(tokens_hash)
            if found is None:
                break
            node = found
            nodes.append(node)
        existing = len(nodes)
        missing = len(tokens_hashes) - existing
        if not missing:
            return nodes, existing
        keys = tokens_hashes[existing:]
        depth = self.depths[node] + 1
        # Freed ids first (one at a time: their columns are written in place), then new ids
        # at the end of every column at once.
        free = self._free_nodes
        reused = free[len(free) - min(len(free), missing) :]
        del free[len(free) - len(reused) :]
        base = len(children)
        ids = reused + list(range(base, base + missing - len(reused)))
        children[node][keys[0]] = ids[0]
        parents, masks, keys_column, depths = self.parents, self.masks, self.keys, self.depths
        parent = node
        for index, new in enumerate(reused):
            children[new] = {keys[index + 1]: ids[index + 1]} if index + 1 < missing else {}
            parents[new] = parent
            keys_column[new] = keys[index]
            depths[new] = depth + index
            masks[new] = mask
            parent = new
        fresh = missing - len(reused)
        if fresh:
            first = len(reused)
            children.extend(
                [
                    {key: child}
                    for key, child in zip(keys[first + 1 :], ids[first + 1 :], strict=True)
                ]
            )
            children.append({})
            masks.extend(itertools.repeat(mask, fresh))
            parents.append(parent)
            parents.extend(range(base, base + fresh - 1))
            keys_column.extend(keys[first:])
            depths.extend(range(depth + first, depth + missing))
        self.node_count += missing
        nodes += ids
        return nodes, existing

    def detached(self) -> int:
        """Return a new node outside the tree (a stand-in for a parent nobody can match)."""
        return self._new(_NO_PARENT, 0, 0)

    def unset(self, node: int, bit: int) -> None:
        """Clear ``bit`` (which must be set) and free the nodes nobody holds or needs."""
        self.unset_many((node,), bit)

    def unset_many(self, nodes: Iterable[int], bit: int) -> None:
        """:meth:`unset` for each of ``nodes`` in turn (a worker letting go of many blocks at
        once, as an eviction does), without a call per node."""
        masks = self.masks
        children = self.children
        parents = self.parents
        keys = self.keys
        free = self._free_nodes
        freed = 0
        for node in nodes:
            masks[node] ^= bit
            while not masks[node] and not children[node]:
                parent = parents[node]
                if parent == _NO_PARENT and node == ROOT:
                    break
                if parent != _NO_PARENT:
                    del children[parent][keys[node]]
                children[node] = _FREED
                free.append(node)
                freed += 1
                if parent == _NO_PARENT:
                    break
                node = parent
        self.node_count -= freed

    def path(self, node: int) -> tuple[int, ...] | None:
        """Return the tokens hashes from the root to ``node``, or ``None`` if it is detached."""
        keys = []
        while node != ROOT:
            parent = self.parents[node]
            if parent == _NO_PARENT:
                return None
            keys.append(self.keys[node])
            node = parent
        return tuple(reversed(keys))

    def _new(self, parent: int, tokens_hash: int, depth: int) -> int:
        self.node_count += 1
        if self._free_nodes:
            node = self._free_nodes.pop()
            self.children[node] = {}
            self.parents[node] = parent
            self.keys[node] = tokens_hash
            self.depths[node] = depth
            return node
        self.children.append({})
        self.masks.append(0)
        self.parents.append(parent)
        self.keys.append(tokens_hash)
        self.depths.append(depth)
        return len(self.children) - 1

    # -- matching -----------------------------------------------------------------------------

    def match(self, local_hashes: Iterable[int]) -> dict[int, int]:
        """Return ``{worker: contiguous prefix blocks}`` for workers holding at least one block."""
        scores: dict[int, int] = {}
        children = self.children
        masks = self.masks
        node = ROOT
        active = -1  # every worker is a candidate before the first block
        # This loop is the router's per-block cost on top of hashing (~30 ns a block): one dict
        # probe and, while the worker set is unchanged, one int compare. A miss ends it once, so
        # try/except is cheaper than .get(); depth comes from the node rather than a counter.
        for tokens_hash in local_hashes:
            try:
                node = children[node][tokens_hash]
            except KeyError:
                break
            if masks[node] != active:
                kept = masks[node] & active
                if kept != active:
                    depth = self.depths[node] - 1
                    if depth:
                        self._score(scores, active ^ kept, depth)
                    active = kept
                    if not kept:
                        break
        if active > 0:
            self._score(scores, active, self.depths[node])
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
