"""What packing the in-memory transition log costs a request, on the trio thread: `MemoryLog`
pickles every 256 records into one batch inside an ``offer``. This checkout's ``_pack`` against
a base's (``git show <base>:interlock/statemachines/_log.py``, imported beside it in the
same process), over the records of routed requests: four a request, the route one with its prompt's
ids and a kv selection over two workers. The prompts' ids are a tokenizer's (`U32TokenIds`,
kept by reference by both) or a plain tuple (client token ids, replays), of 250 or 8,000
tokens. Reading a batch back (``_unpack``) is timed too, and reading a whole default log.

    python benchmarks/bench_log_packing.py              # against main
    python benchmarks/bench_log_packing.py --base e88ff17
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# A sibling: a module as it is at a git revision, imported beside this checkout's.
from ab_kv_salt import load_base  # noqa: E402

from interlock import PipelineConfig  # noqa: E402
from interlock.kv._cost import SelectionReason  # noqa: E402
from interlock.kv._hashing import U32TokenIds  # noqa: E402
from interlock.statemachines import State, TransitionRecord, Trigger  # noqa: E402
from interlock.statemachines import _log as ours  # noqa: E402
from interlock.wire import CandidateRecord, RoutingDecision, SelectionRecord  # noqa: E402


def request_records(n: int, ids: Any) -> list[TransitionRecord]:
    selection = SelectionRecord(
        leg="agg",
        policy="kv",
        chosen=1,
        candidates=(CandidateRecord(worker_id=1, cost=1.5), CandidateRecord(worker_id=2)),
        reason="lowest cost",
        inputs={"kv": {"reason": SelectionReason.LOWEST_COST, "worker_ids": [1, 2]}},
    )
    decision = RoutingDecision(
        request_id=f"req-{n}", token_ids=ids, decode_worker_id=1, selections=(selection,)
    )
    rid, mode = f"req-{n}", "discover"
    return [
        TransitionRecord(rid, 0, mode, 1.0, 2.0, State.RECEIVED, State.PREPROCESSED,
                         Trigger.PREPROCESS),
        TransitionRecord(rid, 1, mode, 1.0, 2.0, State.PREPROCESSED, State.ROUTED, Trigger.ROUTE,
                         1, decision),
        TransitionRecord(rid, 2, mode, 1.0, 2.0, State.ROUTED, State.DECODING,
                         Trigger.START_DECODE, 1),
        TransitionRecord(rid, 3, mode, 1.0, 2.0, State.DECODING, State.DONE, Trigger.FINISH, 1),
    ]  # fmt: skip


def batches(tokens: int, kind: Callable[[Any], Any], count: int) -> list[list[TransitionRecord]]:
    rng = random.Random(tokens)
    records: list[TransitionRecord] = []
    for n in range(count * 64):  # 64 requests of 4 records: one batch of 256
        ids = kind(rng.randrange(1_000, 150_000) for _ in range(tokens))
        records += request_records(n, ids)
    return [records[i : i + 256] for i in range(0, len(records), 256)]


def per_request_us(fn: Callable[[Any], Any], items: list[Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - began)
    return best / (len(items) * 64) * 1e6


def whole_log_read_ms(module: ModuleType, requests: int, collector: bool) -> tuple[float, float]:
    """Reading a whole default `MemoryLog` (32 MiB) of ``requests`` 250-token requests: the
    fastest and the slowest of 5, with the collector on (at its default thresholds the
    unpickled objects set it off, a full collection now and then) or off."""
    memory = module.MemoryLog(max_bytes=PipelineConfig().transition_log_memory_bytes)
    rng = random.Random(0)
    for n in range(requests):
        for record in request_records(n, U32TokenIds(rng.randrange(1_000, 150_000)
                                                     for _ in range(250))):  # fmt: skip
            memory.offer(record)
    times = []
    for _ in range(5):
        if not collector:
            gc.disable()
        try:
            began = time.perf_counter()
            memory.records()
            times.append((time.perf_counter() - began) * 1e3)
        finally:
            gc.enable()
    return min(times), max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="main", help="git ref of the baseline (main)")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--requests", type=int, default=3_000, help="in the whole log read (3,000)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        base = load_base(
            a.base, Path(folder), "interlock/statemachines/_log.py",
            "interlock.statemachines._log_base",
        )  # fmt: skip
    print(f"us a request (64 requests a batch of 256 records); best of {a.repeat}")
    print(f"{'prompt':<24} {'op':<7} {a.base:>9} {'this':>9} {'ratio':>7}")
    cases = [
        ("U32TokenIds, 250", 250, U32TokenIds),
        ("tuple, 250", 250, tuple),
        ("U32TokenIds, 8000", 8_000, U32TokenIds),
        ("tuple, 8000", 8_000, tuple),
    ]
    for label, tokens, kind in cases:
        items = batches(tokens, kind, a.batches if tokens < 1_000 else max(2, a.batches // 5))
        assert all(base._pack(b).data is not None for b in items), "the base did not pickle"
        then = per_request_us(base._pack, items, a.repeat)
        now = per_request_us(ours._pack, items, a.repeat)
        print(f"{label:<24} {'pack':<7} {then:9.2f} {now:9.2f} {now / then:7.2f}")
        old_packed = [base._pack(b) for b in items]
        new_packed = [ours._pack(b) for b in items]
        then = per_request_us(base._unpack, old_packed, a.repeat)
        now = per_request_us(ours._unpack, new_packed, a.repeat)
        print(f"{label:<24} {'unpack':<7} {then:9.2f} {now:9.2f} {now / then:7.2f}")
        size = sum(len(b.data or b"") for b in new_packed) / len(new_packed) / 256
        print(f"{'':<24} {'bytes':<7} {'':>9} {size:9.0f}   (pickled, a record)")
    print(f"\nreading a whole default log of {a.requests:,} requests' records, ms of 5 reads")
    for collector in (True, False):
        then = whole_log_read_ms(base, a.requests, collector)
        now = whole_log_read_ms(ours, a.requests, collector)
        for n, label in enumerate(("fastest", "slowest")):
            label += ", collector " + ("on" if collector else "off")
            print(f"{label:<24} {'read':<7} {then[n]:9.1f} {now[n]:9.1f} {now[n] / then[n]:7.2f}")


if __name__ == "__main__":
    main()
