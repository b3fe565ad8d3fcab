"""Approximate KV index for engines that publish no KV events (reference/dynamo.md 2.7).

It assumes each routed prompt's full blocks stay cached on the chosen worker for ``ttl`` seconds
after the last request that used them, and keeps at most ``max_blocks`` (worker, block) entries.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from interlock.kv._tree import ROOT, OverlapScores, _RadixTree

__all__ = ["ApproxKvIndexer"]


class _Worker:
    __slots__ = ("bit", "touched")

    def __init__(self, bit: int) -> None:
        self.bit = bit
        # node -> time of the last routing decision that used it, oldest first. A decision
        # touches its path leaf first and root last, so a block is never older than its
        # descendants and expiry or pruning always takes leaves first: what stays is a prefix.
        self.touched: OrderedDict[int, float] = OrderedDict()


class ApproxKvIndexer:
    """A prefix tree learned from routing decisions instead of KV events.

    Synchronous and single-owner, like :class:`~interlock.kv.KvIndexer`. Time is passed in
    explicitly (callers use ``trio.current_time()``, so it follows a ``MockClock``); a ``now``
    smaller than one seen before is treated as that earlier time. An entry touched at ``t``
    expires once ``now >= t + ttl``. When more than ``max_blocks`` entries are held after a
    decision, the least recently used are dropped until ``prune_target_ratio * max_blocks``
    remain (Dynamo's defaults: 120 s, 2**20 blocks, 0.8).

    Raises ``ValueError`` for a non-positive ``ttl`` or ``max_blocks``, or a ratio outside (0, 1].
    """

    def __init__(
        self,
        *,
        ttl: float = 120.0,
        max_blocks: int = 2**20,
        prune_target_ratio: float = 0.8,
    ) -> None:
        if not (ttl > 0 and math.isfinite(ttl)):
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        if max_blocks <= 0:
            raise ValueError(f"max_blocks must be positive, got {max_blocks!r}")
        if not 0 < prune_target_ratio <= 1:
            raise ValueError(f"prune_target_ratio must be in (0, 1], got {prune_target_ratio!r}")
        self.ttl = ttl
        self.max_blocks = max_blocks
        self.prune_target = int(max_blocks * prune_target_ratio)
        self._tree = _RadixTree()
        self._workers: dict[int, _Worker] = {}
        self._sizes: dict[int, int] = {}
        self._total = 0
        self._now = -math.inf
        # No entry can expire before this time, so most calls skip the per-worker sweep.
        self._next_expiry = math.inf

    def record_routed(self, worker_id: int, local_hashes: Sequence[int], now: float) -> None:
        """Remember that the prompt with these block hashes was just sent to ``worker_id``.

        Returns nothing. Expires old entries first, then adds or refreshes one entry per block
        and prunes if the size bound is exceeded.
        """
        now = self._advance(now)
        if not local_hashes:
            return
        state = self._workers.get(worker_id)
        if state is None:
            state = self._workers[worker_id] = _Worker(self._tree.bit_for(worker_id))
            self._sizes[worker_id] = 0
        child = self._tree.child
        masks = self._tree.masks
        path: list[int] = []
        node = ROOT
        for tokens_hash in local_hashes:
            node = child(node, tokens_hash)
            path.append(node)
        bit = state.bit
        touched = state.touched
        added = 0
        for node in reversed(path):
            if masks[node] & bit:
                touched.move_to_end(node)
            else:
                masks[node] |= bit
                added += 1
            touched[node] = now
        self._total += added
        self._sizes[worker_id] += added
        self._next_expiry = min(self._next_expiry, now + self.ttl)
        if self._total > self.max_blocks:
            self._prune(self._total - self.prune_target)

    def find_matches(self, local_hashes: Sequence[int], now: float) -> OverlapScores:
        """Match a prompt's block hashes against what recent decisions left cached.

        Returns :class:`~interlock.kv.OverlapScores`, as :meth:`KvIndexer.find_matches` does.
        Expires old entries first.
        """
        self._advance(now)
        return OverlapScores(self._tree.match(local_hashes), dict(self._sizes))

    def expire(self, now: float) -> int:
        """Drop every entry last touched at or before ``now - ttl``; return how many."""
        if now > self._now:
            self._now = now
        return self._dropped_since(self._now)

    def remove_worker(self, worker_id: int) -> None:
        """Forget a worker's entries. Returns nothing; an unknown worker is ignored."""
        state = self._workers.pop(worker_id, None)
        if state is None:
            return
        unset = self._tree.unset
        for node in state.touched:
            unset(node, state.bit)
        self._total -= len(state.touched)
        del self._sizes[worker_id]
        self._tree.release(worker_id)

    def __len__(self) -> int:
        """The number of (worker, block) entries held."""
        return self._total

    @property
    def node_count(self) -> int:
        """The number of tree nodes, excluding the root (for memory checks)."""
        return self._tree.node_count

    def tree_size(self, worker_id: int) -> int:
        """Return how many blocks the index assumes the worker has cached."""
        return self._sizes.get(worker_id, 0)

    # -- internals ----------------------------------------------------------------------------

    def _advance(self, now: float) -> float:
        if now > self._now:
            self._now = now
        if self._now >= self._next_expiry:
            self._dropped_since(self._now)
        return self._now

    def _dropped_since(self, now: float) -> int:
        ttl = self.ttl
        unset = self._tree.unset
        dropped = 0
        next_expiry = math.inf
        for worker_id, state in self._workers.items():
            touched = state.touched
            count = 0
            while touched:
                node = next(iter(touched))
                stamp = touched[node]
                if stamp + ttl > now:
                    next_expiry = min(next_expiry, stamp + ttl)
                    break
                del touched[node]
                unset(node, state.bit)
                count += 1
            if count:
                self._sizes[worker_id] -= count
                dropped += count
        self._total -= dropped
        self._next_expiry = next_expiry
        return dropped

    def _prune(self, count: int) -> None:
        # Oldest first across workers; within a worker the order of `touched` (leaves first)
        # is kept, because heapq.merge is stable per input.
        streams = [_entries(worker_id, state) for worker_id, state in self._workers.items()]
        victims = list(itertools.islice(heapq.merge(*streams, key=lambda entry: entry[0]), count))
        unset = self._tree.unset
        for _stamp, worker_id, node in victims:
            state = self._workers[worker_id]
            del state.touched[node]
            unset(node, state.bit)
            self._sizes[worker_id] -= 1
        self._total -= len(victims)


def _entries(worker_id: int, state: _Worker) -> Iterator[tuple[float, int, int]]:
    for node, stamp in state.touched.items():
        yield stamp, worker_id, node
