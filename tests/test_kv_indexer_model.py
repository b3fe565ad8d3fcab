"""The KV index equals a plain reference model under random event streams, lost events and dumps.

The model is what each engine holds, ``block_hash -> (parent, tokens_hash)``, plus the chain of
tokens hashes the index should file each block under (``None`` once a dump could not say where:
its parent was missing). Matching is then brute force: a worker's score is the longest prefix of
the prompt whose every leading slice is one of its chains.
"""

from __future__ import annotations

import copy

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from interlock.kv import (
    EventGap,
    KvCleared,
    KvEvent,
    KvIndexer,
    KvRemoved,
    KvStored,
    ParentBlockNotFound,
    StoredBlock,
    StoredBlocks,
)

WORKERS = (1, 2, 3)
TOKENS = st.integers(min_value=1, max_value=4)  # few values, so prefixes are shared and branch
NEVER_STORED = 10**12


class Engine:
    """One worker's cache as the engine knows it, and the chains the index should hold."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[int | None, int]] = {}
        self.chains: dict[int, tuple[int, ...] | None] = {}
        self.next_event = 0
        self.next_block = 1

    def apply(self, event: KvEvent) -> None:
        if isinstance(event, KvStored):
            parent = event.parent_hash
            prefix = () if parent is None else self.chains[parent]
            for block in event.blocks:
                prefix = None if prefix is None else (*prefix, block.tokens_hash)
                self.blocks[block.block_hash] = (parent, block.tokens_hash)
                self.chains[block.block_hash] = prefix
                parent = block.block_hash
        elif isinstance(event, KvRemoved):
            for block_hash in event.block_hashes:
                self.blocks.pop(block_hash, None)
                self.chains.pop(block_hash, None)
        else:
            self.blocks.clear()
            self.chains.clear()

    def dump(self, worker: int) -> list[KvStored]:
        return [
            KvStored(worker, 0, parent, (StoredBlock(block_hash, tokens_hash),))
            for block_hash, (parent, tokens_hash) in self.blocks.items()
        ]

    def reload(self) -> None:
        """The chains after a dump: each block under its parent, if the dump has the parent."""
        chains: dict[int, tuple[int, ...] | None] = {}

        def chain_of(block_hash: int) -> tuple[int, ...] | None:
            if block_hash not in chains:
                parent, tokens_hash = self.blocks[block_hash]
                if parent is None:
                    chains[block_hash] = (tokens_hash,)
                elif parent in self.blocks:
                    above = chain_of(parent)
                    chains[block_hash] = None if above is None else (*above, tokens_hash)
                else:
                    chains[block_hash] = None
            return chains[block_hash]

        for block_hash in self.blocks:
            chain_of(block_hash)
        self.chains = chains


def stored(
    worker: int, event_id: int, parent: int | None, blocks: list[StoredBlock], data: st.DataObject
) -> KvStored:
    """A stored event with its blocks as StoredBlock objects or as columns (`StoredBlocks`, what
    the vLLM mirror publishes): the index must file both alike."""
    if data.draw(st.booleans(), label="as columns"):
        columns = StoredBlocks([b.block_hash for b in blocks], [b.tokens_hash for b in blocks])
        return KvStored(worker, event_id, parent, columns)
    return KvStored(worker, event_id, parent, tuple(blocks))


def event_for(engine: Engine, worker: int, data: st.DataObject) -> KvEvent:
    """A random event the engine could emit next (its id is the engine's next one)."""
    event_id = engine.next_event
    engine.next_event += 1
    held = sorted(engine.blocks)
    kinds = ["store"] * 6 + (["remove"] * 3 + ["restore", "twin", "clear"] if held else [])
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "remove":
        gone = data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=3, unique=True))
        if data.draw(st.booleans(), label="also an unknown block"):
            gone.append(NEVER_STORED)
        return KvRemoved(worker, event_id, tuple(gone))
    if kind == "clear":
        return KvCleared(worker, event_id)
    if kind in ("restore", "twin"):
        # The same content again, under its own id (idempotent) or a fresh one (a twin).
        extendable = [b for b in held if engine.blocks[b][0] in (None, *engine.blocks)]
        if extendable:
            block_hash = data.draw(st.sampled_from(extendable), label="again")
            parent, tokens_hash = engine.blocks[block_hash]
            if kind == "twin":
                block_hash = engine.next_block
                engine.next_block += 1
            return stored(worker, event_id, parent, [StoredBlock(block_hash, tokens_hash)], data)
    parent = data.draw(st.one_of(st.none(), st.sampled_from(held)) if held else st.none())
    tokens = data.draw(st.lists(TOKENS, min_size=1, max_size=3), label="tokens")
    blocks = []
    for tokens_hash in tokens:
        blocks.append(StoredBlock(engine.next_block, tokens_hash))
        engine.next_block += 1
    return stored(worker, event_id, parent, blocks, data)


def brute_force_scores(engines: dict[int, Engine], prompt: tuple[int, ...]) -> dict[int, int]:
    scores = {}
    for worker, engine in engines.items():
        chains = {c for c in engine.chains.values() if c is not None}
        depth = 0
        while depth < len(prompt) and prompt[: depth + 1] in chains:
            depth += 1
        if depth:
            scores[worker] = depth
    return scores


class IndexMatchesEngines(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.index = KvIndexer()
        self.engines: dict[int, Engine] = {}
        self.last_sent: dict[int, KvEvent] = {}

    @initialize()
    def start(self) -> None:
        self.engines = {}

    def engine(self, worker: int) -> Engine:
        return self.engines.setdefault(worker, Engine())

    @rule(worker=st.sampled_from(WORKERS), data=st.data())
    def deliver(self, worker: int, data: st.DataObject) -> None:
        engine = self.engine(worker)
        event = event_for(engine, worker, data)
        engine.apply(event)
        self.index.apply(event)
        self.last_sent[worker] = event

    @rule(worker=st.sampled_from(WORKERS))
    def redeliver(self, worker: int) -> None:
        if worker in self.last_sent:
            self.index.apply(self.last_sent[worker])

    @rule(worker=st.sampled_from(WORKERS), data=st.data())
    def lose_an_event_then_load_a_dump(self, worker: int, data: st.DataObject) -> None:
        engine = self.engine(worker)
        first_lost = engine.next_event
        history = {first_lost - 1: copy.deepcopy(engine)}
        engine.apply(event_for(engine, worker, data))  # never reaches the index
        history[first_lost] = copy.deepcopy(engine)
        held: list[KvEvent] = []
        for _ in range(data.draw(st.integers(min_value=1, max_value=4), label="held events")):
            event = event_for(engine, worker, data)
            engine.apply(event)
            history[event.event_id] = copy.deepcopy(engine)
            held.append(event)
        try:
            self.index.apply(held[0])
        except EventGap as gap:
            assert (gap.expected, gap.got) == (first_lost, first_lost + 1)
        else:
            raise AssertionError(f"worker {worker}: event {first_lost} was lost unnoticed")
        for event in held[1:]:
            self.index.apply(event)
        assert not self.index.is_in_sync(worker)
        # The worker answers with its cache as of some event at or after the lost one.
        dumped_at = data.draw(
            st.integers(min_value=first_lost, max_value=held[-1].event_id), label="dumped at"
        )
        truth = copy.deepcopy(history[dumped_at])
        dump = data.draw(st.permutations(truth.dump(worker)), label="dump order")
        truth.reload()
        for event in held:
            if event.event_id > dumped_at:
                truth.apply(event)
        truth.next_event, truth.next_block = engine.next_event, engine.next_block
        self.index.load_dump(worker, dump, last_event_id=dumped_at)
        self.engines[worker] = truth
        self.last_sent[worker] = held[-1]

    @rule(worker=st.sampled_from(WORKERS), data=st.data())
    def stored_on_an_unknown_parent_then_load_a_dump(
        self, worker: int, data: st.DataObject
    ) -> None:
        engine = self.engine(worker)
        event_id = engine.next_event
        engine.next_event += 1
        bogus = KvStored(worker, event_id, NEVER_STORED, (StoredBlock(NEVER_STORED + 1, 1),))
        try:
            self.index.apply(bogus)
        except ParentBlockNotFound as error:
            assert (error.worker_id, error.parent_hash) == (worker, NEVER_STORED)
        else:
            raise AssertionError("a stored event on an unknown parent was accepted")
        dump = data.draw(st.permutations(engine.dump(worker)), label="dump order")
        engine.reload()
        self.index.load_dump(worker, dump, last_event_id=event_id)
        self.last_sent[worker] = bogus

    @rule(worker=st.sampled_from(WORKERS))
    def remove_worker(self, worker: int) -> None:
        self.index.remove_worker(worker)
        self.engines.pop(worker, None)
        self.last_sent.pop(worker, None)

    @invariant()
    def every_worker_is_in_sync_with_its_engine(self) -> None:
        for worker, engine in self.engines.items():
            assert self.index.is_in_sync(worker), f"worker {worker}"
            assert self.index.last_event_id(worker) == engine.next_event - 1, f"worker {worker}"
            assert self.index.blocks_of(worker) == set(engine.blocks), f"worker {worker}"
            assert self.index.snapshot(worker) == engine.chains, f"worker {worker}"
        assert self.index.workers == set(self.engines)

    @invariant()
    def matches_equal_brute_force(self) -> None:
        chains = {c for e in self.engines.values() for c in e.chains.values() if c is not None}
        probes = {(), (1,), (1, 2, 3, 4)} | chains | {(*c, 1) for c in chains}
        for prompt in probes:
            found = self.index.find_matches(list(prompt))
            assert found.scores == brute_force_scores(self.engines, prompt), f"prompt {prompt}"
            assert found.tree_sizes == {w: len(e.blocks) for w, e in self.engines.items()}

    @invariant()
    def the_tree_holds_no_unused_nodes(self) -> None:
        if any(c is None for e in self.engines.values() for c in e.chains.values()):
            return  # blocks parked outside the tree by a dump; not counted here
        chains = {c for e in self.engines.values() for c in e.chains.values() if c is not None}
        prefixes = {c[:i] for c in chains for i in range(1, len(c) + 1)}
        assert self.index.node_count == len(prefixes)


TestIndexMatchesEngines = IndexMatchesEngines.TestCase
