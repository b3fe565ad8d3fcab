"""The event-driven KV index: which worker caches which prefix (reference/dynamo.md 2.4, 2.8)."""

from __future__ import annotations

import itertools
import operator
from collections import deque
from collections.abc import Iterable, Sequence

from interlock.kv._events import KvCleared, KvEvent, KvRemoved, KvStored, StoredBlocks
from interlock.kv._tree import ROOT, OverlapScores, _RadixTree

__all__ = [
    "EventGap",
    "KvIndexError",
    "KvIndexer",
    "ParentBlockNotFound",
    "WorkerOutOfSync",
]


# Below this many blocks (a decode step's 1-4), one by one costs less than the bulk path's
# fixed passes.
_BULK_BLOCKS = 16
_BLOCK_PAIR = operator.attrgetter("block_hash", "tokens_hash")


class KvIndexError(Exception):
    """Base class of the errors the KV index raises."""


class WorkerOutOfSync(KvIndexError):
    """The index no longer mirrors one worker's cache; ask that worker for a dump.

    The worker's blocks stay in the index (stale but mostly right, so routing keeps working) and
    its later events are held back until :meth:`KvIndexer.load_dump` brings it back in sync.
    """

    def __init__(self, worker_id: int, message: str) -> None:
        super().__init__(message)
        self.worker_id = worker_id


class EventGap(WorkerOutOfSync):
    """A worker's event ids skipped: events ``expected`` .. ``got - 1`` never arrived."""

    def __init__(self, worker_id: int, expected: int, got: int) -> None:
        super().__init__(
            worker_id,
            f"worker {worker_id}: expected KV event id {expected}, got {got}; events "
            f"{expected}..{got - 1} are missing, so the index may hold blocks the worker evicted "
            "or miss blocks it stored; request a dump of the worker's cache and pass it to "
            "KvIndexer.load_dump",
        )
        self.expected = expected
        self.got = got


class ParentBlockNotFound(WorkerOutOfSync):
    """A stored event names a parent block the index does not hold for that worker."""

    def __init__(self, worker_id: int, event_id: int, parent_hash: int) -> None:
        super().__init__(
            worker_id,
            f"worker {worker_id}: stored event {event_id} extends parent block {parent_hash}, "
            "which the index does not hold for that worker, so the new blocks cannot be placed "
            "in the prefix tree; request a dump of the worker's cache and pass it to "
            "KvIndexer.load_dump",
        )
        self.event_id = event_id
        self.parent_hash = parent_hash


class _Worker:
    __slots__ = ("bit", "blocks", "extra_refs", "in_sync", "last_event_id", "pending")

    def __init__(self, bit: int, max_pending: int) -> None:
        self.bit = bit
        # The engine's truth: every block it holds, by its own block id. Kept even for a block
        # whose ancestors were evicted, because the engine may still extend it.
        self.blocks: dict[int, int] = {}
        # Nodes held under more than one block id (engines that give identical content random
        # ids); the count is the number of ids beyond the first.
        self.extra_refs: dict[int, int] = {}
        self.last_event_id = -1
        self.in_sync = True
        self.pending: deque[KvEvent] = deque(maxlen=max_pending)


class KvIndexer:
    """A prefix tree of the blocks each worker has cached, built from the workers' KV events.

    Synchronous and single-owner: the Router actor applies events and queries matches; nothing
    here blocks or awaits. The tree is keyed by ``tokens_hash`` (our contract hash) and each node
    records which workers hold that block; the engine's own ``block_hash`` ids are used only to
    find the parent of a stored chain and the target of a removal.

    Event ids must increase by one per worker, starting at 0 for a worker the index has not seen
    (a worker that starts later, or an index that restarts, needs a dump first). ``dp_rank`` must
    be 0: the index keys by ``worker_id`` alone, so give each data-parallel rank its own worker id.

    ``max_pending_events`` bounds the events held back per out-of-sync worker; when it overflows,
    the oldest are dropped and the next :meth:`load_dump` reports the resulting gap.
    """

    def __init__(self, *, max_pending_events: int = 4096) -> None:
        if max_pending_events < 0:
            raise ValueError(f"max_pending_events must be >= 0, got {max_pending_events}")
        self._tree = _RadixTree()
        self._workers: dict[int, _Worker] = {}
        self._sizes: dict[int, int] = {}
        self._max_pending = max_pending_events

    # -- events -------------------------------------------------------------------------------

    def apply(self, event: KvEvent) -> None:
        """Apply one worker's event.

        Returns nothing. An event whose id is at or below the worker's last applied id is a
        duplicate and is ignored; removing a block the worker does not hold is ignored.
        Raises :class:`EventGap` when ids skip, and :class:`ParentBlockNotFound` when a stored
        chain extends an unknown block; either way the event is not applied, the worker is marked
        out of sync (both are :class:`WorkerOutOfSync`), and it and later events for that worker
        are held until :meth:`load_dump`; only the first failure raises. Raises ``ValueError`` for
        ``dp_rank != 0``.
        """
        worker_id = event.worker_id
        if event.dp_rank != 0:
            raise ValueError(
                f"KV event {event.event_id} of worker {worker_id} has dp_rank={event.dp_rank}: "
                "KvIndexer keys its tree by worker_id alone; give each data-parallel rank its own "
                "worker id before applying its events"
            )
        state = self._workers.get(worker_id)
        if state is None:
            state = self._add_worker(worker_id)
        if not state.in_sync:
            state.pending.append(event)
            return
        expected = state.last_event_id + 1
        if event.event_id != expected:
            if event.event_id < expected:
                return
            self._desync(state, event)
            raise EventGap(worker_id, expected, event.event_id)
        if isinstance(event, KvStored):
            parent_hash = event.parent_hash
            if parent_hash is None:
                parent = ROOT
            else:
                found = state.blocks.get(parent_hash)
                if found is None:
                    self._desync(state, event)
                    raise ParentBlockNotFound(worker_id, event.event_id, parent_hash)
                parent = found
            self._place(state, parent, event)
        elif isinstance(event, KvRemoved):
            self._remove(state, event.block_hashes)
        elif isinstance(event, KvCleared):
            self._clear(state)
        else:
            raise TypeError(f"not a KV event: {event!r}")
        state.last_event_id = event.event_id
        self._sizes[worker_id] = len(state.blocks)

    def load_dump(self, worker_id: int, dump: Iterable[KvStored], *, last_event_id: int) -> None:
        """Replace one worker's blocks with a dump of its cache and bring it back in sync.

        ``dump`` lists stored chains in any order (their ``event_id`` is ignored);
        ``last_event_id`` is the id of the last event the dump reflects (-1 if the worker has
        emitted none). Events held back since the worker fell out of sync are then replayed:
        those at or below ``last_event_id`` are dropped, the rest applied in order. A chain whose
        parent is absent from the dump is kept (the engine may extend it) but can never match,
        since its prefix is not cached.

        Returns nothing. Raises the first :class:`WorkerOutOfSync` a replayed event raises (the
        worker is then out of sync again), and ``ValueError`` if an entry names another worker or a
        non-zero ``dp_rank``.
        """
        units = list(dump)
        for unit in units:
            if unit.worker_id != worker_id or unit.dp_rank != 0:
                raise ValueError(
                    f"dump for worker {worker_id} contains an entry for worker {unit.worker_id} "
                    f"dp_rank {unit.dp_rank}; a dump must hold exactly one worker's blocks"
                )
        state = self._workers.get(worker_id)
        if state is None:
            state = self._add_worker(worker_id)
        self._clear(state)
        held = state.pending
        state.pending = deque(maxlen=self._max_pending)
        state.in_sync = True
        state.last_event_id = last_event_id
        self._load(state, units)
        self._sizes[worker_id] = len(state.blocks)
        first_error: WorkerOutOfSync | None = None
        for event in held:
            try:
                self.apply(event)
            except WorkerOutOfSync as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def remove_worker(self, worker_id: int) -> None:
        """Forget a worker: its blocks, its event ids and any held-back events.

        Returns nothing; an unknown worker is ignored. Call it when a worker leaves or restarts
        (a restarted engine counts its event ids from 0 again).
        """
        state = self._workers.pop(worker_id, None)
        if state is None:
            return
        self._clear(state)
        self._tree.release(worker_id)
        del self._sizes[worker_id]

    # -- queries ------------------------------------------------------------------------------

    def find_matches(self, local_hashes: Iterable[int]) -> OverlapScores:
        """Match a prompt's block hashes (from :func:`compute_block_hashes`, or an iterator
        computing them as consumed) against the index.

        Returns :class:`OverlapScores`: for each worker holding at least the first block, the
        number of leading blocks it holds contiguously; and every known worker's cached-block
        count. Costs one dict probe per matched block; stops as soon as no worker is left.
        """
        return OverlapScores(self._tree.match(local_hashes), dict(self._sizes))

    @property
    def workers(self) -> frozenset[int]:
        """The workers the index knows (seen in an event or a dump, not removed)."""
        return frozenset(self._workers)

    @property
    def node_count(self) -> int:
        """The number of tree nodes, excluding the root (for memory checks)."""
        return self._tree.node_count

    def tree_size(self, worker_id: int) -> int:
        """Return how many blocks the worker has cached (0 for an unknown worker)."""
        return self._sizes.get(worker_id, 0)

    def is_in_sync(self, worker_id: int) -> bool:
        """Return ``False`` while the worker awaits a dump after a :class:`WorkerOutOfSync`."""
        state = self._workers.get(worker_id)
        return state is None or state.in_sync

    def last_event_id(self, worker_id: int) -> int | None:
        """Return the id of the worker's last applied event (-1 before any), ``None`` if unknown."""
        state = self._workers.get(worker_id)
        return None if state is None else state.last_event_id

    def blocks_of(self, worker_id: int) -> frozenset[int]:
        """Return the engine ``block_hash`` ids the worker holds (empty for an unknown worker).

        This is what the engine itself would list, so a test can compare the two directly.
        """
        state = self._workers.get(worker_id)
        return frozenset(() if state is None else state.blocks)

    def snapshot(self, worker_id: int) -> dict[int, tuple[int, ...] | None]:
        """Return ``{block_hash: tokens_hash path from the root}`` for the worker's blocks.

        The path ends with the block's own ``tokens_hash``; it is ``None`` for a block loaded from a
        dump without its parent (it can never match). For tests and debugging: O(blocks x depth).
        """
        state = self._workers.get(worker_id)
        if state is None:
            return {}
        return {block_hash: self._tree.path(node) for block_hash, node in state.blocks.items()}

    # -- internals ----------------------------------------------------------------------------

    def _add_worker(self, worker_id: int) -> _Worker:
        state = self._workers[worker_id] = _Worker(self._tree.bit_for(worker_id), self._max_pending)
        self._sizes[worker_id] = 0
        return state

    def _desync(self, state: _Worker, event: KvEvent) -> None:
        state.in_sync = False
        state.pending.append(event)

    def _place(self, state: _Worker, node: int, event: KvStored) -> None:
        stored = event.blocks
        if type(stored) is StoredBlocks:
            self._place_run(state, node, stored.block_hashes, stored.tokens_hashes)
            return
        # Blocks as objects (mock engines, dumps).
        self._place_each(state, node, map(_BLOCK_PAIR, stored))

    def _place_run(
        self,
        state: _Worker,
        node: int,
        block_hashes: Sequence[int],
        tokens_hashes: Sequence[int],
    ) -> None:
        """Store a run of blocks below ``node``: in bulk when every block id is new to the
        worker (a prefill; nothing to let go of), else block by block."""
        blocks = state.blocks
        if len(block_hashes) < _BULK_BLOCKS:
            self._place_each(state, node, zip(block_hashes, tokens_hashes, strict=True))
            return
        ids = set(block_hashes)
        if len(ids) != len(block_hashes) or not blocks.keys().isdisjoint(ids):
            self._place_each(state, node, zip(block_hashes, tokens_hashes, strict=True))
            return
        bit = state.bit
        nodes, existing = self._tree.extend(node, tokens_hashes, bit)
        if existing:
            # A prefix other workers hold (or this one, under other ids).
            masks = self._tree.masks
            extra_refs = state.extra_refs
            for held in nodes[:existing]:
                if masks[held] & bit:
                    extra_refs[held] = extra_refs.get(held, 0) + 1
                else:
                    masks[held] |= bit
        blocks.update(zip(block_hashes, nodes, strict=True))

    def _place_each(self, state: _Worker, node: int, pairs: Iterable[tuple[int, int]]) -> None:
        """Store ``(block_hash, tokens_hash)`` pairs below ``node`` one by one."""
        child = self._tree.child
        masks = self._tree.masks
        blocks = state.blocks
        bit = state.bit
        for block_hash, tokens_hash in pairs:
            node = child(node, tokens_hash)
            previous = blocks.get(block_hash)
            if previous == node:
                continue
            # Hold the new node before letting go of the old one so pruning cannot reach it.
            if masks[node] & bit:
                state.extra_refs[node] = state.extra_refs.get(node, 0) + 1
            else:
                masks[node] |= bit
            blocks[block_hash] = node
            if previous is not None:
                self._release(state, previous)

    def _release(self, state: _Worker, node: int) -> None:
        extra = state.extra_refs.get(node)
        if extra:
            if extra == 1:
                del state.extra_refs[node]
            else:
                state.extra_refs[node] = extra - 1
            return
        self._tree.unset(node, state.bit)

    def _remove(self, state: _Worker, block_hashes: Sequence[int]) -> None:
        if len(block_hashes) < _BULK_BLOCKS:
            blocks = state.blocks
            for block_hash in block_hashes:
                node = blocks.pop(block_hash, None)
                if node is not None:
                    self._release(state, node)
            return
        pop = state.blocks.pop
        nodes = [
            node for node in map(pop, block_hashes, itertools.repeat(None)) if node is not None
        ]
        if state.extra_refs:
            # Some nodes are held under several ids: each removal lets go of one hold.
            for node in nodes:
                self._release(state, node)
            return
        self._tree.unset_many(nodes, state.bit)

    def _clear(self, state: _Worker) -> None:
        unset = self._tree.unset
        bit = state.bit
        # Each node once, however many block ids pointed at it.
        for node in set(state.blocks.values()):
            unset(node, bit)
        state.blocks.clear()
        state.extra_refs.clear()

    def _load(self, state: _Worker, units: list[KvStored]) -> None:
        """Place a dump's chains, parents before children, whatever order the dump lists them."""
        units = [unit for unit in units if unit.blocks]
        dumped = {block.block_hash for unit in units for block in unit.blocks}
        waiting: dict[int, list[KvStored]] = {}
        ready: deque[tuple[int, KvStored]] = deque()
        for unit in units:
            if unit.parent_hash is None:
                ready.append((ROOT, unit))
            else:
                waiting.setdefault(unit.parent_hash, []).append(unit)

        def drain() -> None:
            while ready:
                node, unit = ready.popleft()
                self._place(state, node, unit)
                for block in unit.blocks:
                    children = waiting.pop(block.block_hash, None)
                    if children:
                        placed = state.blocks[block.block_hash]
                        ready.extend((placed, child) for child in children)

        drain()
        # What is left hangs off parents the dump does not contain (evicted while a child stayed)
        # or, in a malformed dump, off each other in a cycle; park each group under a node outside
        # the tree so the blocks are known for linking but never matched.
        while waiting:
            missing = next((p for p in waiting if p not in dumped), next(iter(waiting)))
            stand_in = self._tree.detached()
            ready.extend((stand_in, unit) for unit in waiting.pop(missing))
            drain()
