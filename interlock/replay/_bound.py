"""The combined-capacity bound: the prefix hit rate of one cache as large as all workers
together.

No routing policy can share a prefix across workers, so spreading requests over ``n`` caches
of ``c`` blocks each can at best match one cache of ``n x c`` blocks that sees every request.
The bound replays the prompts in arrival order through one `MockKvCache` (the mock engine's
own cache: same block hashing, same LRU eviction, tail blocks first) and counts cached prompt
tokens over prompt tokens. It ignores what a real cluster also holds (the blocks of requests
still running, generated tokens), so it is an upper bound, not a forecast.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..engines.mock._kv_cache import MockKvCache
from ..kv import compute_block_hashes, compute_sequence_hashes


def combined_capacity_hit_rate(
    prompts: Iterable[Sequence[int]], *, capacity_blocks: int, block_size: int
) -> float:
    """Cached prompt tokens over prompt tokens when ``prompts`` (token ids, in arrival order)
    go through one LRU prefix cache of ``capacity_blocks`` blocks of ``block_size`` tokens.

    A pure function: the same prompts give the same rate. Returns 0.0 for no tokens.

    Raises:
        ValueError: ``capacity_blocks`` or ``block_size`` below 1.
    """
    if capacity_blocks < 1 or block_size < 1:
        raise ValueError(
            f"capacity_blocks and block_size must be >= 1, got {capacity_blocks}, {block_size}"
        )
    cache = MockKvCache(capacity_blocks, block_size, worker_id=0)
    cached = total = 0
    for prompt in prompts:
        local = compute_block_hashes(prompt, block_size)
        hashes = compute_sequence_hashes(local)
        total += len(prompt)
        cached += cache.cached_prefix(hashes) * block_size
        # Use the blocks (a hit refreshes them, a miss stores them), then let them go: they
        # stay cached, evictable, the tail first in line.
        if cache.acquire(hashes, local, partial=False):
            cache.release(hashes, partials=0)
    return cached / total if total else 0.0
