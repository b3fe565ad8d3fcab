"""KV routing micro-benchmarks: what one routing decision costs next to hashing the prompt.

Run from the repository root::

    python benchmarks/bench_kv.py [--block-size 16] [--repeats 25]

Prints, per prompt length and worker count, the median time of (a) hashing the prompt alone and
(b) a whole routing decision (hash + find_matches + select_worker), both measured in the same run,
and their ratio; then the indexer's event throughput and the approximate indexer's costs. The
goals: a ~100 k-token prompt decided in <= 2 ms, and decision <= 1.5 x hash. No assertions.

The index is populated so workers share prefixes the way a chat deployment does: every worker
caches a common system prompt, each holds a few unrelated conversations, and the measured prompt's
conversation history (everything but its last turn) is cached on 3 of the workers.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from interlock.kv import (
    ApproxKvIndexer,
    KvIndexer,
    KvRemoved,
    KvStored,
    StoredBlock,
    WorkerLoadView,
    compute_block_hashes,
    compute_sequence_hashes,
    select_worker,
)

PROMPT_TOKENS = (1_024, 8_192, 32_768, 100_000, 131_072)
WORKER_COUNTS = (8, 64, 512)
SYSTEM_PROMPT_TOKENS = 2_048
LAST_TURN_TOKENS = 512
HISTORY_REPLICAS = 3
OTHER_CONVERSATIONS = 2
OTHER_CONVERSATION_TOKENS = 4_096
VOCAB = 150_000


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm caches and allocators
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(count)]


def stored_chain(worker_id: int, event_id: int, token_ids: list[int], block_size: int) -> KvStored:
    # The mock engine's block ids are its sequence hashes; any unique id would do.
    local = compute_block_hashes(token_ids, block_size)
    ids = compute_sequence_hashes(local)
    blocks = tuple(StoredBlock(b, t) for b, t in zip(ids, local, strict=True))
    return KvStored(worker_id, event_id, None, blocks)


def populate(
    rng: random.Random, workers: int, block_size: int, system: list[int], history: list[int]
) -> KvIndexer:
    indexer = KvIndexer()
    replicas = set(rng.sample(range(workers), min(HISTORY_REPLICAS, workers)))
    for worker in range(workers):
        prompts = [
            system + tokens(rng, OTHER_CONVERSATION_TOKENS) for _ in range(OTHER_CONVERSATIONS)
        ]
        if worker in replicas:
            prompts.append(history)
        for event_id, prompt in enumerate(prompts):
            indexer.apply(stored_chain(worker, event_id, prompt, block_size))
    return indexer


def bench_decisions(block_size: int, repeats: int) -> None:
    rng = random.Random(0)
    decision_rng = random.Random(1)
    system = tokens(rng, SYSTEM_PROMPT_TOKENS)
    print(f"\nrouting decision, block_size={block_size} (median of {repeats}, milliseconds)")
    header = (
        f"{'prompt':>8} {'workers':>7} {'blocks':>6} {'hash':>8} {'seq_hash':>8} "
        f"{'match':>8} {'select':>8} {'decision':>8} {'ratio':>6}  best overlap"
    )
    print(header)
    print("-" * len(header))
    for count in PROMPT_TOKENS:
        history = system + tokens(rng, max(0, count - SYSTEM_PROMPT_TOKENS - LAST_TURN_TOKENS))
        prompt = history + tokens(rng, count - len(history))
        for workers in WORKER_COUNTS:
            indexer = populate(rng, workers, block_size, system, history)
            views = [
                WorkerLoadView(w, rng.randrange(4_096), rng.randrange(2_000))
                for w in range(workers)
            ]
            hashes = compute_block_hashes(prompt, block_size)
            overlaps = indexer.find_matches(hashes)

            def decide(
                prompt: list[int] = prompt,
                indexer: KvIndexer = indexer,
                views: list[WorkerLoadView] = views,
            ) -> object:
                local = compute_block_hashes(prompt, block_size)
                found = indexer.find_matches(local)
                return select_worker(views, found, len(prompt), block_size, 1.0, 0.0, decision_rng)

            hash_s = median_seconds(lambda p=prompt: compute_block_hashes(p, block_size), repeats)
            seq_s = median_seconds(lambda h=hashes: compute_sequence_hashes(h), repeats)
            match_s = median_seconds(lambda i=indexer, h=hashes: i.find_matches(h), repeats)
            isl = len(prompt)
            select_s = median_seconds(
                lambda v=views, o=overlaps, n=isl: select_worker(
                    v, o, n, block_size, 1.0, 0.0, decision_rng
                ),
                repeats,
            )
            decision_s = median_seconds(decide, repeats)
            best = max(overlaps.scores.values(), default=0)
            print(
                f"{count:>8} {workers:>7} {len(hashes):>6} {hash_s * 1e3:>8.3f} "
                f"{seq_s * 1e3:>8.3f} {match_s * 1e3:>8.3f} {select_s * 1e3:>8.3f} "
                f"{decision_s * 1e3:>8.3f} {decision_s / hash_s:>6.2f}  {best}/{len(hashes)}"
            )


def bench_events(block_size: int) -> None:
    """Apply a pre-built stream of stored and removed events, as engines under load emit them."""
    rng = random.Random(2)
    workers = 64
    system = tokens(rng, SYSTEM_PROMPT_TOKENS)
    system_local = compute_block_hashes(system, block_size)
    events: list[KvStored | KvRemoved] = []
    next_id = dict.fromkeys(range(workers), 0)
    live: dict[int, list[list[int]]] = {w: [] for w in range(workers)}
    system_ids = compute_sequence_hashes(system_local)
    for worker in range(workers):
        blocks = tuple(StoredBlock(b, t) for b, t in zip(system_ids, system_local, strict=True))
        events.append(KvStored(worker, 0, None, blocks))
        next_id[worker] = 1
    serial = 1 << 40
    for _ in range(200_000):
        worker = rng.randrange(workers)
        chains = live[worker]
        if chains and rng.random() < 0.35:
            # Evict the tail of one conversation, as an LRU cache does.
            chain = chains[rng.randrange(len(chains))]
            take = min(len(chain), rng.randint(1, 4))
            gone = tuple(chain[-take:])
            del chain[-take:]
            if not chain:
                chains.remove(chain)
            events.append(KvRemoved(worker, next_id[worker], gone))
        else:
            # A prefill extends a conversation (or starts one after the system prompt) by 1-4
            # blocks.
            if chains and rng.random() < 0.8:
                chain = chains[rng.randrange(len(chains))]
            else:
                chain = []
                chains.append(chain)
            parent = chain[-1] if chain else system_ids[-1]
            new = []
            for _ in range(rng.randint(1, 4)):
                serial += 1
                new.append(StoredBlock(serial, rng.getrandbits(64)))
            chain.extend(block.block_hash for block in new)
            events.append(KvStored(worker, next_id[worker], parent, tuple(new)))
        next_id[worker] += 1

    def run() -> KvIndexer:
        indexer = KvIndexer()
        for event in events:
            indexer.apply(event)
        return indexer

    seconds = median_seconds(run, 3)
    indexer = run()
    count = len(events)
    events.clear()
    live.clear()
    with_index = gc_pause()
    nodes = indexer.node_count
    del indexer
    print(
        f"\nindexer events: {count} events over {workers} workers in {seconds * 1e3:.0f} ms "
        f"= {count / seconds:,.0f} events/s; final tree {nodes:,} nodes\n"
        f"full gc.collect(): {with_index * 1e3:.1f} ms with that index alive, "
        f"{gc_pause() * 1e3:.1f} ms without"
    )


def gc_pause() -> float:
    gc.collect()
    started = time.perf_counter()
    gc.collect()
    return time.perf_counter() - started


def bench_approx(block_size: int, repeats: int) -> None:
    rng = random.Random(3)
    workers = 64
    system = tokens(rng, SYSTEM_PROMPT_TOKENS)
    approx = ApproxKvIndexer()
    now = 0.0
    for worker in range(workers):
        for _ in range(OTHER_CONVERSATIONS):
            prompt = system + tokens(rng, OTHER_CONVERSATION_TOKENS)
            approx.record_routed(worker, compute_block_hashes(prompt, block_size), now)
    print(f"\napproximate index, {workers} workers (median of {repeats}, milliseconds)")
    print(f"{'prompt':>8} {'record_routed':>13} {'find_matches':>12}")
    for count in PROMPT_TOKENS:
        hashes = compute_block_hashes(system + tokens(rng, count - len(system)), block_size)
        record_s = median_seconds(lambda h=hashes: approx.record_routed(7, h, now), repeats)
        match_s = median_seconds(lambda h=hashes: approx.find_matches(h, now), repeats)
        print(f"{count:>8} {record_s * 1e3:>13.3f} {match_s * 1e3:>12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, action="append", help="default: 16 and 64")
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"python {sys.version.split()[0]}")
    for block_size in args.block_size or [16, 64]:
        bench_decisions(block_size, args.repeats)
    bench_events(16)
    bench_approx(16, args.repeats)
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
