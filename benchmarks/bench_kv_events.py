"""What the router's CPU pays to ingest a vLLM engine's KV events, next to msgpack's floor.

Run from the repository root::

    python benchmarks/bench_kv_events.py [--tokens 100000] [--block-size 16] [--rounds 15]
                                         [--steps 2000] [--cpu 1]

Builds the batches a vLLM publishes, encoded as interlock's own `encode_kv_batch` does (which
re-encodes captured vLLM 0.32 payloads byte for byte) in both event layouts (maps keyed
``"type"``, vLLM 0.26+; tag-first arrays, older vLLM):

* **store**: one ``BlockStored`` of ``--tokens`` prompt tokens (6,250 blocks of 16 at 100k),
  as the prefill of a long prompt publishes it;
* **remove**: the same blocks evicted, one ``BlockRemoved`` of one hash per block in one batch,
  as vLLM's lazy eviction sends them (and, in the map layout, once more with the hashes as
  digest bytes, ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``, which takes the careful decoder);
* **decode steps**: ``--steps`` (2,000) small batches, each a ``BlockStored`` of 1-4 blocks
  extending one of a few conversations (a decode-heavy engine fills a block every
  ``block_size`` tokens) and, one step in three, 1-4 ``BlockRemoved``.

For each, the ingest path of ``interlock route --router-mode kv`` in front of vLLMs, in one
process: `parse_kv_message` and the `KvEventFeed`'s decoding (its `KvBatchDecoder` per engine,
or `decode_kv_batch` in code before it), the engine's `KvMirror` (contract hashes of the
blocks' tokens, duplicate and parent checks), and `KvIndexer.apply` of what it publishes.
Against it, in the same rounds, interleaved: plain ``msgpack.unpackb`` of the same payloads, the
floor of any decoder that builds Python objects.
Times are CPU seconds of this process (``time.process_time``), the median over ``--rounds``;
the ratio is ingest / floor. The process pins itself to ``--cpu`` (default 1) when it can.
No assertions; tests/test_kv_events_benchmark.py runs it at a tiny size.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from interlock import wire
from interlock.engines.openai import KvMirror
from interlock.kv import KvEvent, KvIndexer, compute_block_hashes, compute_sequence_hashes
from interlock.wire import (
    KvBatchLayout,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmKvBatch,
    VllmKvEvent,
    decode_kv_batch,
    encode_kv_batch,
    kv_message_frames,
    kv_topic,
    parse_kv_message,
)

VOCAB = 151_936  # Qwen's: ids above 65,535 take 5 bytes in msgpack, the rest 1-3
WORKER = 1
TOPIC = kv_topic(WORKER)
CONVERSATIONS = 8
# As the feed decodes (the keyword is absent from code before it, which this script also runs
# against for before/after figures).
DECODE = (
    functools.partial(decode_kv_batch, merge_removals=True)
    if "merge_removals" in inspect.signature(decode_kv_batch).parameters
    else decode_kv_batch
)


def stored_event(
    rng: random.Random, parent: int | None, blocks: int, block_size: int
) -> VllmBlockStored:
    """A BlockStored as vLLM 0.32 writes it: its blocks' tokens, one extra key per block.

    The block ids are sequence hashes (vLLM's are sha256-based; any unique u64 does)."""
    tokens = [rng.randrange(VOCAB) for _ in range(blocks * block_size)]
    local = compute_block_hashes(tokens, block_size)
    ids = compute_sequence_hashes(local if parent is None else [parent, *local])
    return VllmBlockStored(
        block_hashes=ids if parent is None else ids[1:],
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=block_size,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        extra_keys=[None] * blocks,
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )


def payload_of(events: list[VllmKvEvent], layout: KvBatchLayout) -> bytes:
    return encode_kv_batch(
        VllmKvBatch(ts=time.time(), events=events, data_parallel_rank=0), layout=layout
    )


def bytes_hash_removals(removals: list[VllmKvEvent]) -> bytes:
    """``removals`` in the map layout with each hash as 32 bytes (a digest ending in it)."""
    events = [
        {
            "type": "BlockRemoved",
            "block_hashes": [block_hash.to_bytes(32, "big") for block_hash in event.block_hashes],
            "medium": event.medium,
            "group_idx": event.group_idx,
        }
        for event in removals
        if isinstance(event, VllmBlockRemoved)
    ]
    packed: bytes = msgpack.packb([time.time(), events, 0], use_bin_type=True)
    return packed


def decode_steps(
    rng: random.Random, block_size: int, layout: KvBatchLayout, count: int
) -> tuple[list[bytes], int]:
    """The payloads of a decode-heavy engine's steps, and how many blocks they store or remove."""
    chains: list[list[int]] = [[] for _ in range(CONVERSATIONS)]
    payloads = []
    blocks = 0
    for _ in range(count):
        events: list[VllmKvEvent] = []
        chain = chains[rng.randrange(CONVERSATIONS)]
        if len(chain) > 8 and rng.random() < 1 / 3:
            # Lazy eviction of an old conversation's tail, one hash per event, before the store.
            take = rng.randint(1, 4)
            victim = chains[rng.randrange(CONVERSATIONS)]
            take = min(take, len(victim))
            for block_hash in reversed(victim[-take:]):
                events.append(
                    VllmBlockRemoved(block_hashes=(block_hash,), medium="GPU", group_idx=0)
                )
            del victim[len(victim) - take :]
            blocks += take
        count = rng.randint(1, 4)
        event = stored_event(rng, chain[-1] if chain else None, count, block_size)
        chain.extend(event.block_hashes)
        events.append(event)
        blocks += count
        payloads.append(payload_of(events, layout))
    return payloads, blocks


class Ingest:
    """The router's side of one engine's feed: decode, mirror, index (as KvEventFeed runs it)."""

    def __init__(self, block_size: int) -> None:
        self.index = KvIndexer()
        self.mirror = KvMirror(WORKER, block_size, self._publish)
        self.seq = 0
        # The feed's decoder of this engine's topic, where the code has one.
        decoder = getattr(wire, "KvBatchDecoder", None)
        self.decode = (
            DECODE if decoder is None else functools.partial(decoder().decode, merge_removals=True)
        )

    def _publish(self, event: KvEvent) -> None:
        self.index.apply(event)

    def __call__(self, payload: bytes) -> None:
        message = parse_kv_message(kv_message_frames(TOPIC, self.seq, payload))
        self.seq += 1
        self.mirror.on_batch(message.seq, self.decode(message.payload))


def floor(payloads: list[bytes]) -> None:
    for payload in payloads:
        msgpack.unpackb(payload, strict_map_key=False)


def cpu_seconds(fn: Callable[[], object]) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def measure(
    rounds: int,
    setup: Callable[[], Ingest],
    payloads: list[bytes],
) -> tuple[float, float]:
    """Median CPU seconds of ingesting ``payloads`` into a fresh ``setup()`` and of the floor,
    alternating round by round so that load on the box weighs on both alike."""
    ingest_s: list[float] = []
    floor_s: list[float] = []
    for _ in range(rounds + 1):  # the first round warms allocators and caches
        ingest = setup()
        ingest_s.append(cpu_seconds(lambda i=ingest: [i(p) for p in payloads]))
        floor_s.append(cpu_seconds(lambda: floor(payloads)))
    return statistics.median(ingest_s[1:]), statistics.median(floor_s[1:])


def report(name: str, blocks: int, size: int, ingest_s: float, floor_s: float) -> None:
    ratio = ingest_s / floor_s if floor_s else float("nan")
    print(
        f"{name:<26} {blocks:>6} {size / 1e3:>8.0f} {floor_s * 1e3:>8.2f} {ingest_s * 1e3:>8.2f} "
        f"{ingest_s / max(blocks, 1) * 1e9:>9.0f} {ratio:>6.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=2_000, help="decode steps")
    parser.add_argument("--cpu", type=int, default=1, help="pin to this CPU (-1: do not pin)")
    args = parser.parse_args()
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity") and args.cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {args.cpu})
    block_size = args.block_size
    rng = random.Random(0)
    big = stored_event(rng, None, args.tokens // block_size, block_size)
    blocks = len(big.block_hashes)
    removals: list[VllmKvEvent] = [
        VllmBlockRemoved(block_hashes=(h,), medium="GPU", group_idx=0)
        for h in reversed(big.block_hashes)
    ]
    print(f"python {sys.version.split()[0]}, block size {block_size}, median of {args.rounds}")
    header = (
        f"{'batch':<26} {'blocks':>6} {'kB':>8} {'floor ms':>8} {'ingest':>8} "
        f"{'ns/block':>9} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    layouts: tuple[KvBatchLayout, ...] = ("map", "array")
    for layout in layouts:
        store = payload_of([big], layout)
        ingest_s, floor_s = measure(args.rounds, lambda: Ingest(block_size), [store])
        report(f"store, {layout}", blocks, len(store), ingest_s, floor_s)

        remove = payload_of(removals, layout)

        def holding(store: bytes = store) -> Ingest:
            ingest = Ingest(block_size)
            ingest(store)
            return ingest

        ingest_s, floor_s = measure(args.rounds, holding, [remove])
        report(f"remove, {layout}", blocks, len(remove), ingest_s, floor_s)
        if layout == "map":
            # vLLM with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0: the same eviction with the ids
            # as digest bytes (read as their last 8 bytes), which only the careful decoder takes.
            remove = bytes_hash_removals(removals)
            ingest_s, floor_s = measure(args.rounds, holding, [remove])
            report("remove, map, bytes hashes", blocks, len(remove), ingest_s, floor_s)

        steps, step_blocks = decode_steps(random.Random(1), block_size, layout, args.steps)
        ingest_s, floor_s = measure(args.rounds, lambda: Ingest(block_size), steps)
        size = sum(map(len, steps))
        report(f"{len(steps)} decode steps, {layout}", step_blocks, size, ingest_s, floor_s)


if __name__ == "__main__":
    main()
