"""One vLLM engine's KV cache as its events tell it, re-published as the router's KV events.

vLLM numbers batches (``seq``), not events, and may skip some (a late subscriber, a full ZMQ
queue) or restart from 0; the router's index wants consecutive event ids per worker and blocks
keyed by our contract hash. :class:`KvMirror` sits between the two: it applies each batch to its
own picture of the cache and publishes `KvStored` / `KvRemoved` / `KvCleared` with its *own*
consecutive ids, repairing vLLM's gaps by replay where the engine offers it and clearing where it
cannot (so the index never keeps blocks the engine may have evicted).

What vLLM really sends, and how each is handled:

* a ``BlockStored`` can repeat (a ``prompt_logprobs`` request re-prefills): a block already held
  under the same parent and tokens is not re-published;
* blocks filled during decode are announced like prompt blocks: mirrored as any other;
* ``BlockRemoved`` carries one hash per event, many per batch: consecutive removals of a batch are
  published as one `KvRemoved`; removing an unknown block is ignored;
* ``AllBlocksCleared`` arrives with the next scheduler step, possibly twice: published as one
  `KvCleared` when the mirror holds anything;
* a stored run whose parent the mirror does not hold (lost to a gap or a clear) is dropped and
  counted: the router could not place it;
* **LoRA and salted blocks** (``lora_name`` set; a ``cache_salt`` in block 0's ``extra_keys``)
  are published under their salt (``kv_salt``: block 0's tokens hash is salted, and the rest of
  the chain hangs under it in the router's index): their KV differs from the base model's for
  the same tokens, and the router looks an adapter's or a salted request's prompt up with the
  same salt, so neither finds the other's blocks. vLLM sends block 0's extra keys untagged:
  ``(lora_name, cache_salt)``, the name first, as ``generate_block_hash_extra_keys`` builds them;
* blocks the mirror cannot key are not published and neither are runs extending them: a LoRA
  block with only a ``lora_id`` (vLLM before ``lora_name``), or with other extra keys
  (multimodal identifiers, prompt embeddings: interlock hashes token ids only). They are
  remembered only to stay silent about their children and removals;
* blocks on another **medium** than ``"GPU"`` (vLLM's CPU offloading tiers) and of a KV-cache
  group other than 0 (hybrid models) are skipped, stores and removals alike: the router models one
  cache tier of one group, and vLLM sends the same hash for each tier and group, so a CPU-tier
  removal must not evict the GPU block;
* batches from another data-parallel rank than the mirror's are ignored (give each rank its own
  interlock engine id and topic).

A restart is recognised only by ``seq`` going backwards; a restarted engine whose first batches
are all lost and whose ``seq`` overtakes the old one cannot be told from a gap (vLLM sends no
incarnation id), which replay then fills from the new incarnation.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import attrs
import trio

from ..._errors import InterlockError
from ...kv import (
    KvCleared,
    KvEvent,
    KvRemoved,
    KvStored,
    StoredBlock,
    StoredBlocks,
    compute_block_hashes,
    kv_salt,
)
from ...wire import VllmAllBlocksCleared, VllmBlockRemoved, VllmBlockStored, VllmKvBatch
from ._kv_feed import KvReplayFailed, replay_kv_batches

__all__ = ["KvBlockSizeMismatch", "KvDump", "KvMirror", "KvMirrorStats", "ReplayBatches"]

_logger = logging.getLogger("interlock.engines.openai.kv")

ReplayBatches = Callable[[int], Awaitable[Sequence[tuple[int, VllmKvBatch]]]]
"""``await replay(start_seq)``: the engine's buffered ``(seq, batch)`` pairs from ``start_seq`` on,
in order; raises :class:`KvReplayFailed` when it cannot (see ``replay_kv_batches``)."""


class KvBlockSizeMismatch(InterlockError):
    """An engine announced blocks of another size than the router hashes: no prefix could match."""

    def __init__(self, worker_id: int, engine_block_size: int, router_block_size: int) -> None:
        super().__init__(
            f"vLLM engine {worker_id} announced KV blocks of {engine_block_size} tokens, but "
            f"interlock's router hashes blocks of {router_block_size} tokens, so none of its "
            f"cached prefixes could ever match; start vLLM with --block-size {router_block_size}, "
            f"or interlock with --kv-block-size {engine_block_size}"
        )
        self.worker_id = worker_id
        self.engine_block_size = engine_block_size
        self.router_block_size = router_block_size


class KvDump(NamedTuple):
    """A mirror's whole cache, for `WorkerSnapshot` (``kv_blocks``, ``kv_last_event_id``).

    ``blocks`` are stored chains, each parent before its children; ``last_event_id`` is the id
    of the last event published (-1 before any), which the dump reflects.
    """

    blocks: list[KvStored]
    last_event_id: int


@attrs.frozen
class KvMirrorStats:
    """Counters of one mirror, for metrics and tests.

    ``batches``: batches applied; ``duplicate_blocks``: stored blocks already held;
    ``orphan_runs``: stored runs dropped for an unknown parent; ``skipped_blocks``: unkeyed, other
    medium or group, wrong token count; ``gaps``: gaps in vLLM's ``seq`` (late start included);
    ``replays`` / ``failed_replays``: replays asked for / that failed; ``clears``: times the mirror
    dropped its cache because it could no longer trust it (restart, unreplayable gap);
    ``foreign_rank_batches``: batches of another DP rank, ignored.
    """

    batches: int
    duplicate_blocks: int
    orphan_runs: int
    skipped_blocks: int
    gaps: int
    replays: int
    failed_replays: int
    clears: int
    foreign_rank_batches: int


class KvMirror:
    """One engine's KV cache, mirrored from its vLLM event batches.

    ``worker_id`` is the interlock worker id stamped on published events; ``block_size`` the
    router's (``kv_block_size``); ``publish(event)`` is called synchronously with each
    `KvStored` / `KvRemoved` / `KvCleared`, ids 0, 1, 2, ... . Gaps are replayed through
    ``replay`` (an async ``start_seq -> [(seq, batch), ...]``) or, more simply, from
    ``replay_endpoint`` (the engine's vLLM ``replay_endpoint``, asked with ``replay_timeout``);
    pass at most one. Replays need :meth:`run` running; without it, or without a replay source,
    a gap clears the mirror. ``dp_rank`` is the data-parallel rank whose batches are mirrored.
    With ``replay_at_start``, :meth:`run` first replays everything from seq 0 (a mirror joining
    an engine that already holds blocks).

    Wiring, in the engine's nursery::

        mirror = KvMirror(worker_id, block_size, publish, replay_endpoint=endpoint)
        await nursery.start(mirror.run)
        unsubscribe = feed.subscribe(worker_id, mirror.on_batch)
        ...
        blocks, last_event_id = mirror.dump()
    """

    def __init__(
        self,
        worker_id: int,
        block_size: int,
        publish: Callable[[KvEvent], None],
        replay: ReplayBatches | None = None,
        *,
        replay_endpoint: str | None = None,
        replay_timeout: float = 10.0,
        dp_rank: int = 0,
        replay_at_start: bool = False,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if replay is not None and replay_endpoint is not None:
            raise ValueError("pass replay or replay_endpoint, not both")
        if replay_endpoint is not None:
            replay = functools.partial(replay_kv_batches, replay_endpoint, timeout=replay_timeout)
        self.worker_id = worker_id
        self.block_size = block_size
        self._publish = publish
        self._replay = replay
        self._dp_rank = dp_rank
        self._replay_at_start = replay_at_start
        # The cache, by engine block hash: its tokens hash, and its parent's hash (None at the
        # start of a prompt). A parent may be removed while its child stays (vLLM evicts blocks
        # one by one, and may still extend the child). Two dicts of ints with the same keys, in
        # the same order, rather than one of tuples: a long prompt's blocks go in with two
        # C-level updates and no object per block.
        self._tokens: dict[int, int] = {}
        self._parents: dict[int, int | None] = {}
        # LoRA blocks: known only so their children and removals are skipped quietly.
        self._ignored: set[int] = set()
        self._next_event_id = 0
        self._last_seq: int | None = None  # vLLM seq of the last batch applied
        self._last_live: int | None = None  # vLLM seq of the last live batch seen
        # While a replay is wanted or under way: where it starts, and the live batches that
        # arrived meanwhile (applied after it, in order; a replay is bounded by its timeout, so
        # this holds at most that many seconds of scheduler steps).
        self._replay_from: int | None = None
        self._buffer: list[tuple[int, VllmKvBatch]] = []
        # Bumped by a restart, so a replay of the old incarnation is discarded.
        self._generation = 0
        self._wake = trio.Event()
        self._serving = False
        self._failure: KvBlockSizeMismatch | None = None
        self._warned: set[str] = set()
        self._stats = dict.fromkeys(attrs.fields_dict(KvMirrorStats), 0)

    # -- reading ------------------------------------------------------------------------------

    @property
    def stats(self) -> KvMirrorStats:
        """The counters now (a frozen copy)."""
        return KvMirrorStats(**self._stats)

    @property
    def last_event_id(self) -> int:
        """The id of the last event published (-1 before any)."""
        return self._next_event_id - 1

    @property
    def replaying(self) -> bool:
        """True while a replay is wanted or under way (live batches are being held back)."""
        return self._replay_from is not None

    def blocks(self) -> dict[int, tuple[int | None, int]]:
        """``{block_hash: (parent_hash, tokens_hash)}`` of every block held (a copy)."""
        parents = self._parents
        return {
            block_hash: (parents[block_hash], tokens) for block_hash, tokens in self._tokens.items()
        }

    def dump(self) -> KvDump:
        """The cache as stored chains, parents first, and the last event id it reflects.

        Each chain is a run of blocks each extending the one before; a block whose parent was
        removed keeps that parent's hash as ``parent_hash`` (the index parks it, unmatched, as
        the engine may still extend it). Costs O(blocks); does not block.
        """
        children: dict[int | None, list[int]] = {}
        for block_hash, parent in self._parents.items():
            key = parent if parent in self._parents else None
            children.setdefault(key, []).append(block_hash)
        chains: list[KvStored] = []
        event_id = self.last_event_id
        # Depth first from the roots (and from blocks whose parent is gone), so each chain is
        # extended by its first child and every other child starts a chain of its own.
        stack = [(h, True) for h in reversed(children.get(None, []))]
        run: list[StoredBlock] = []
        run_parent: int | None = None
        while stack:
            block_hash, starts = stack.pop()
            parent, tokens = self._parents[block_hash], self._tokens[block_hash]
            if starts and run:
                chains.append(KvStored(self.worker_id, event_id, run_parent, run))
                run = []
            if not run:
                run_parent = parent
            run.append(StoredBlock(block_hash=block_hash, tokens_hash=tokens))
            kids = children.get(block_hash, [])
            stack.extend((kid, index > 0) for index, kid in reversed(list(enumerate(kids))))
            if not kids:
                chains.append(KvStored(self.worker_id, event_id, run_parent, run))
                run = []
        return KvDump(chains, event_id)

    # -- feeding ------------------------------------------------------------------------------

    def on_batch(self, seq: int, batch: VllmKvBatch) -> None:
        """Apply one live batch (a `KvEventFeed` handler): publishes what changed, or holds the
        batch back while a replay is under way. Does not block.

        Raises :class:`KvBlockSizeMismatch` when a stored block's size is not the router's; the
        mirror then clears, ignores every later batch, and :meth:`run` raises the same error.
        """
        if self._failure is not None:
            return
        if not self._our_rank(batch):
            return
        if self._last_live is not None and seq <= self._last_live:
            self._restart(seq)
        self._last_live = seq
        if self._replay_from is not None:
            self._buffer.append((seq, batch))
            return
        self._advance(seq, batch, may_replay=True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the replays :meth:`on_batch` asks for, until cancelled.

        Calls ``task_status.started()`` at once. Each replay waits on the engine (at most the
        replay timeout); meanwhile live batches are held back, then applied after the replayed
        ones. A failed replay clears the mirror (warning logged) and carries on. Raises
        :class:`KvBlockSizeMismatch` once the engine's block size is found wrong.
        """
        self._serving = True
        if (
            self._replay_at_start
            and self._replay is not None
            and self._last_seq is None
            and self._replay_from is None
        ):
            # What the engine cached before this mirror subscribed shows up in no later batch
            # unless the engine touches it again, and a lost first batch is noticed only when
            # the next one comes: ask for everything at once (live batches wait meanwhile).
            self._replay_from = 0
            self._stats["replays"] += 1
        try:
            task_status.started()
            while True:
                if self._failure is not None:
                    raise self._failure
                start = self._replay_from
                if start is None:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                generation = self._generation
                replayed: Sequence[tuple[int, VllmKvBatch]] | None
                assert self._replay is not None
                try:
                    replayed = await self._replay(start)
                except KvReplayFailed as exc:
                    replayed = None
                    self._stats["failed_replays"] += 1
                    _logger.warning(
                        "worker %d: %s; clearing its KV blocks, which may include some it has "
                        "evicted since",
                        self.worker_id,
                        exc,
                    )
                if generation == self._generation:
                    self._finish_replay(replayed)
        finally:
            self._serving = False

    # -- internals ----------------------------------------------------------------------------

    def _our_rank(self, batch: VllmKvBatch) -> bool:
        rank = batch.data_parallel_rank
        if rank is None or rank == self._dp_rank:
            return True
        self._stats["foreign_rank_batches"] += 1
        self._warn_once(
            "rank",
            "worker %d: ignoring KV events of data-parallel rank %d (mirroring rank %d); give "
            "each rank its own interlock engine id and kv@ID topic",
            self.worker_id,
            rank,
            self._dp_rank,
        )
        return False

    def _advance(self, seq: int, batch: VllmKvBatch, *, may_replay: bool) -> None:
        """Apply the batch that follows (skipping one already applied, repairing a gap)."""
        last = self._last_seq
        if last is not None and seq <= last:
            return  # replayed already
        expected = 0 if last is None else last + 1
        if seq != expected:
            self._stats["gaps"] += 1
            if may_replay and self._replay is not None and self._serving:
                self._replay_from = expected
                self._buffer = [(seq, batch)]
                self._stats["replays"] += 1
                self._wake.set()
                return
            if last is not None:
                _logger.warning(
                    "worker %d: vLLM KV event batches %d..%d are lost (no replay%s); clearing its "
                    "KV blocks, which may include some it has evicted since",
                    self.worker_id,
                    expected,
                    seq - 1,
                    "" if self._replay is None else " left",
                )
                self._clear(count=True)
            # else: joining late with nothing to lose; what came before stays unknown.
        self._apply(batch)
        self._last_seq = seq

    def _finish_replay(self, replayed: Sequence[tuple[int, VllmKvBatch]] | None) -> None:
        held, self._buffer = self._buffer, []
        self._replay_from = None
        if replayed is None:
            self._clear(count=True)
            # Start afresh from the held batches, gap or not.
            self._last_seq = None
            replayed = ()
        for seq, batch in [*replayed, *held]:
            if self._failure is not None:
                return
            if self._our_rank(batch):
                # A gap left now cannot be replayed (the engine no longer has it): clear.
                self._advance(seq, batch, may_replay=False)

    def _restart(self, seq: int) -> None:
        _logger.warning(
            "worker %d: vLLM KV event seq went back from %d to %d: the engine restarted; "
            "clearing its KV blocks",
            self.worker_id,
            self._last_live,
            seq,
        )
        self._clear(count=True)
        self._last_seq = None
        self._last_live = None
        self._replay_from = None
        self._buffer = []
        self._generation += 1

    def _apply(self, batch: VllmKvBatch) -> None:
        self._stats["batches"] += 1
        removed: list[int] = []
        for event in batch.events:
            if type(event) is VllmBlockRemoved:
                if self._tracked(event.medium, event.group_idx):
                    for block_hash in event.block_hashes:
                        if self._tokens.pop(block_hash, None) is not None:
                            del self._parents[block_hash]
                            removed.append(block_hash)
                        else:
                            self._ignored.discard(block_hash)
                continue
            if removed:
                self._emit(KvRemoved(self.worker_id, self._next_event_id, removed))
                removed = []
            if type(event) is VllmBlockStored:
                self._store(event)
            elif type(event) is VllmAllBlocksCleared:
                self._clear(count=False)
        if removed:
            self._emit(KvRemoved(self.worker_id, self._next_event_id, removed))

    def _store(self, event: VllmBlockStored) -> None:
        hashes = event.block_hashes
        if event.block_size != self.block_size:
            self._failure = KvBlockSizeMismatch(self.worker_id, event.block_size, self.block_size)
            self._clear(count=False)
            self._wake.set()
            raise self._failure
        if not self._tracked(event.medium, event.group_idx):
            self._stats["skipped_blocks"] += len(hashes)
            return
        parent = event.parent_block_hash
        keyed, salt = _salt_of(event)
        if not keyed or parent in self._ignored:
            self._ignored.update(hashes)
            self._stats["skipped_blocks"] += len(hashes)
            return
        if len(event.token_ids) != len(hashes) * self.block_size:
            # CPU-offload tier updates carry no tokens; anything else is a vLLM we do not know.
            self._stats["skipped_blocks"] += len(hashes)
            self._warn_once(
                "tokens",
                "worker %d: skipping a BlockStored with %d token ids for %d blocks of %d",
                self.worker_id,
                len(event.token_ids),
                len(hashes),
                self.block_size,
            )
            return
        if parent is not None and parent not in self._tokens:
            self._stats["orphan_runs"] += 1
            return
        if not hashes:
            return
        # Only a chain's first block carries the salt; a run extending one inherits it.
        tokens = compute_block_hashes(
            event.token_ids, self.block_size, salt if parent is None else None
        )
        tokens_of, parents = self._tokens, self._parents
        ids = set(hashes)
        if len(ids) == len(hashes) and tokens_of.keys().isdisjoint(ids):
            # A run of distinct new blocks (every prefill): mirrored and published in C-level
            # passes, as columns, with no object per block. An id repeated inside the run
            # replaces its earlier self, block by block below.
            tokens_of.update(zip(hashes, tokens, strict=True))
            parents.update(zip(hashes, (parent, *hashes[:-1]), strict=True))
            self._emit_run(parent, hashes, tokens)
            return
        run_hashes: list[int] = []
        run_tokens: list[int] = []
        run_parent = previous = parent
        for block_hash, tokens_hash in zip(hashes, tokens, strict=True):
            if tokens_of.get(block_hash) == tokens_hash and parents[block_hash] == previous:
                self._stats["duplicate_blocks"] += 1
                if run_hashes:
                    self._emit_run(run_parent, run_hashes, run_tokens)
                    run_hashes, run_tokens = [], []
            else:
                if not run_hashes:
                    run_parent = previous
                # The same hash under another parent or tokens replaces the old block.
                if tokens_of.pop(block_hash, None) is not None:
                    del parents[block_hash]
                tokens_of[block_hash] = tokens_hash
                parents[block_hash] = previous
                run_hashes.append(block_hash)
                run_tokens.append(tokens_hash)
            previous = block_hash
        if run_hashes:
            self._emit_run(run_parent, run_hashes, run_tokens)

    def _emit_run(self, parent: int | None, hashes: Sequence[int], tokens: Sequence[int]) -> None:
        self._emit(
            KvStored(self.worker_id, self._next_event_id, parent, StoredBlocks(hashes, tokens))
        )

    def _tracked(self, medium: str | None, group_idx: int | None) -> bool:
        # medium None: vLLM before PR #19737, GPU only.
        return (medium is None or medium.upper() == "GPU") and not group_idx

    def _clear(self, *, count: bool) -> None:
        if count:
            self._stats["clears"] += 1
        self._ignored.clear()
        if self._tokens:
            self._tokens.clear()
            self._parents.clear()
            self._emit(KvCleared(self.worker_id, self._next_event_id))

    def _emit(self, event: KvEvent) -> None:
        self._next_event_id += 1
        self._publish(event)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _logger.warning(message, *args)


def _salt_of(event: VllmBlockStored) -> tuple[bool, int | None]:
    """Whether the mirror can key ``event``'s blocks, and their salt (`kv_salt`; None for the
    base model's unsalted blocks).

    vLLM's extra keys for a block are, untagged, the LoRA name (every block of an adapter's
    request), multimodal ``(identifier, offset)`` pairs, the ``cache_salt`` (block 0 only) and
    prompt-embedding digests (bytes), in that order. Only the name and the salt are keyed here.
    """
    lora_name = event.lora_name
    if event.lora_id is not None and lora_name is None:
        return False, None
    cache_salt: str | None = None
    for index, keys in enumerate(event.extra_keys or ()):
        if keys is None:
            continue
        if not isinstance(keys, tuple | list):
            return False, None
        rest = list(keys)
        if lora_name is not None and rest and rest[0] == lora_name:
            del rest[0]
        if not rest:
            continue
        if (
            index == 0
            and event.parent_block_hash is None
            and len(rest) == 1
            and isinstance(rest[0], str)
        ):
            cache_salt = rest[0]
            continue
        return False, None
    return True, kv_salt(lora_name, cache_salt)
