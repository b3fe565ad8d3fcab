"""The mock engine's paged KV cache: prefix caching, reference counts, LRU eviction, and the
stored / removed / cleared events a router indexes.

A full block is identified by its sequence hash (the chain of block hashes up to it), so equal
prefixes share blocks; its ``tokens_hash`` is the contract hash of its own tokens. Blocks still
filling (the tail of a sequence) are anonymous: they take a slot but are never shared or
announced.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

from ...kv import KvCleared, KvEvent, KvRemoved, KvStored, StoredBlock


class MockKvCache:
    """Capacity ``num_blocks`` blocks of ``block_size`` tokens.

    Referenced blocks are *active*; a block whose last reference goes is kept, *inactive*, in
    LRU order until its slot is needed. Each change is announced through ``emit`` (when set)
    with per-cache event ids 0, 1, 2, ...

    With ``keep_tokens`` the cache also keeps each full block's token ids (`block_tokens`), for
    a publisher that must announce them, as vLLM's ``BlockStored`` events do; ``emit`` is called
    while the announced blocks are held, so it can read their tokens then.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        worker_id: int,
        emit: Callable[[KvEvent], None] | None = None,
        keep_tokens: bool = False,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.worker_id = worker_id
        self._emit = emit
        self._refs: dict[int, int] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._meta: dict[int, tuple[int | None, int]] = {}  # seq hash -> (parent, tokens hash)
        #: seq hash -> the block's token ids, with ``keep_tokens`` (else None).
        self._tokens: dict[int, tuple[int, ...]] | None = {} if keep_tokens else None
        #: seq hash -> the cache salt of a prompt's first block stored with one, with
        #: ``keep_tokens`` (vLLM's events carry it in that block's ``extra_keys``).
        self._salts: dict[int, str] = {}
        self._anonymous = 0
        self.next_event_id = 0
        #: Blocks evicted to make room, since creation.
        self.evictions = 0

    # -- reading ---------------------------------------------------------------------------

    @property
    def used_blocks(self) -> int:
        return len(self._refs) + len(self._lru) + self._anonymous

    @property
    def active_blocks(self) -> int:
        """Blocks some sequence references (they cannot be evicted)."""
        return len(self._refs) + self._anonymous

    @property
    def free_blocks(self) -> int:
        """Blocks that can be had now: empty slots plus evictable cached blocks."""
        return self.num_blocks - self.active_blocks

    def cached_prefix(self, seq_hashes: Sequence[int]) -> int:
        """How many leading blocks of a sequence are cached (active or not)."""
        n = 0
        for h in seq_hashes:
            if h not in self._refs and h not in self._lru:
                break
            n += 1
        return n

    def block_tokens(self, seq_hash: int) -> tuple[int, ...]:
        """The token ids of a held full block.

        Raises:
            KeyError: the cache does not keep tokens (``keep_tokens=False``) or does not hold
                the block.
        """
        if self._tokens is None:
            raise KeyError(f"block {seq_hash}: this cache keeps no tokens (keep_tokens=False)")
        return self._tokens[seq_hash]

    def block_salt(self, seq_hash: int) -> str | None:
        """The cache salt a held first block was stored with (None: none, or not kept)."""
        return self._salts.get(seq_hash)

    def cached_blocks(self) -> frozenset[int]:
        """Every full block held, by sequence hash (what a router's index should mirror)."""
        return frozenset(self._refs) | frozenset(self._lru)

    def dump(self) -> list[KvStored]:
        """The whole cache as stored events (parents first), to rebuild an index from."""
        held = self.cached_blocks()
        order: list[int] = []
        seen: set[int] = set()
        for start in sorted(held):
            # Walk up to the first ancestor already placed (or not held), then emit downwards:
            # iterative, since generated text makes chains thousands of blocks long.
            chain = []
            h: int | None = start
            while h is not None and h in held and h not in seen:
                chain.append(h)
                seen.add(h)
                h = self._meta[h][0]
            order.extend(reversed(chain))
        return [
            KvStored(
                worker_id=self.worker_id,
                event_id=self.next_event_id - 1,
                # The real parent even when it was evicted: the index keeps such a block
                # linked for later events but never matches it from the root.
                parent_hash=self._meta[h][0],
                blocks=(StoredBlock(block_hash=h, tokens_hash=self._meta[h][1]),),
            )
            for h in order
        ]

    # -- changing --------------------------------------------------------------------------

    def acquire(
        self,
        seq_hashes: Sequence[int],
        tokens_hashes: Sequence[int],
        *,
        partial: bool,
        parent: int | None = None,
        limit: float | None = None,
        tokens: Sequence[int] | None = None,
        salt: str | None = None,
    ) -> bool:
        """Reference the full blocks of a sequence (sharing cached ones, allocating the rest)
        and, with ``partial``, one anonymous block for its unfinished tail. ``tokens`` are the
        sequence's token ids (from its first block), kept per block with ``keep_tokens``, and
        ``salt`` its cache salt, kept for its first block (the hashes are salted already).

        All or nothing: returns False, changing nothing, when the active blocks would exceed
        ``limit`` (default: the capacity) even after evicting every inactive block.
        """
        refs = self._refs
        lru = self._lru
        revived = [h for h in seq_hashes if h in lru]
        missing = sum(1 for h in seq_hashes if h not in refs and h not in lru)
        ceiling = self.num_blocks if limit is None else min(limit, self.num_blocks)
        if self.active_blocks + len(revived) + missing + (1 if partial else 0) > ceiling:
            return False
        # Pin the cached blocks first, so making room for new ones cannot evict them.
        for h in revived:
            del lru[h]
            refs[h] = 0
        new_run: list[StoredBlock] = []
        run_parent = parent
        previous = parent
        kept = self._tokens if tokens is not None else None
        size = self.block_size
        for index, (h, local) in enumerate(zip(seq_hashes, tokens_hashes, strict=True)):
            if h in refs:
                refs[h] += 1
                self._announce_stored(run_parent, new_run)
                new_run = []
            else:
                self._make_room(1)
                refs[h] = 1
                self._meta[h] = (previous, local)
                if kept is not None:
                    assert tokens is not None
                    kept[h] = tuple(tokens[index * size : (index + 1) * size])
                    if salt is not None and previous is None:
                        self._salts[h] = salt
                if not new_run:
                    run_parent = previous
                new_run.append(StoredBlock(block_hash=h, tokens_hash=local))
            previous = h
        self._announce_stored(run_parent, new_run)
        if partial:
            self._make_room(1)
            self._anonymous += 1
        return True

    def fill_partial(
        self,
        seq_hash: int,
        tokens_hash: int,
        parent: int | None,
        tokens: Sequence[int] | None = None,
        salt: str | None = None,
    ) -> None:
        """The anonymous tail block filled up: it becomes full block ``seq_hash`` (shared with
        an identical cached block if there is one). ``tokens``: its token ids, kept with
        ``keep_tokens``, and ``salt`` the sequence's cache salt (kept for a first block)."""
        self._anonymous -= 1
        if seq_hash in self._refs:
            self._refs[seq_hash] += 1
            return
        if seq_hash in self._lru:
            del self._lru[seq_hash]
            self._refs[seq_hash] = 1
            return
        self._refs[seq_hash] = 1
        self._meta[seq_hash] = (parent, tokens_hash)
        if self._tokens is not None and tokens is not None:
            self._tokens[seq_hash] = tuple(tokens)
            if salt is not None and parent is None:
                self._salts[seq_hash] = salt
        self._announce_stored(parent, [StoredBlock(block_hash=seq_hash, tokens_hash=tokens_hash)])

    def add_partial(self) -> bool:
        """Take one more anonymous block (a sequence's tail crossed a block boundary)."""
        if self.active_blocks + 1 > self.num_blocks:
            return False
        self._make_room(1)
        self._anonymous += 1
        return True

    def release(self, seq_hashes: Sequence[int], *, partials: int) -> None:
        """Drop a sequence's references. Its blocks stay cached, tail first in line for
        eviction, so a block is never evicted before the blocks that extend it."""
        self._anonymous -= partials
        for h in reversed(seq_hashes):
            count = self._refs.get(h)
            if count is None:
                continue
            if count > 1:
                self._refs[h] = count - 1
            else:
                del self._refs[h]
                self._lru[h] = None

    def clear(self, *, announce: bool = True) -> None:
        """Drop everything (a restart); announces `KvCleared` unless told not to."""
        self._refs.clear()
        self._lru.clear()
        self._meta.clear()
        if self._tokens is not None:
            self._tokens.clear()
        self._salts.clear()
        self._anonymous = 0
        if announce and self._emit is not None:
            self._emit(KvCleared(worker_id=self.worker_id, event_id=self._next_id()))

    # -- internals -------------------------------------------------------------------------

    def _make_room(self, slots: int) -> None:
        evicted: list[int] = []
        while self.used_blocks + slots > self.num_blocks and self._lru:
            h, _ = self._lru.popitem(last=False)
            del self._meta[h]
            if self._tokens is not None:
                self._tokens.pop(h, None)
                self._salts.pop(h, None)
            evicted.append(h)
        if evicted:
            self.evictions += len(evicted)
            if self._emit is not None:
                self._emit(
                    KvRemoved(
                        worker_id=self.worker_id, event_id=self._next_id(), block_hashes=evicted
                    )
                )

    def _announce_stored(self, parent: int | None, blocks: list[StoredBlock]) -> None:
        if blocks and self._emit is not None:
            self._emit(
                KvStored(
                    worker_id=self.worker_id,
                    event_id=self._next_id(),
                    parent_hash=parent,
                    blocks=tuple(blocks),
                )
            )

    def _next_id(self) -> int:
        event_id = self.next_event_id
        self.next_event_id += 1
        return event_id
