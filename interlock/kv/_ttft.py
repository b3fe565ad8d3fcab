"""The ``predicted_ttft`` cost: choose the worker expected to produce the first token soonest.

The ``kv`` cost adds prefill blocks and decode blocks linearly, so a worker holding a popular
prefix stays cheapest while its prefill queue grows: every request of a hot prefix family lands
there until the queue, not the computation, dominates time to first token. This cost predicts
that time instead. A worker's queued prefill tokens (booked, not yet prefilled) run before or
with the new request's uncached tokens, batched ``max_batched_tokens`` at a time; each batch
costs the engine's prefill polynomial, and while the worker decodes other requests every batch
also pays a decode step. Prefill time grows faster than linearly with the tokens in a batch,
so the prediction moves a request to a colder worker exactly when recomputing its prefix there
is quicker than waiting behind the hot worker's queue, and keeps it on the cached worker
otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from interlock.kv._tree import OverlapScores

__all__ = ["TtftModel", "TtftSelection", "replay_ttft_selection", "select_by_ttft"]


@attrs.frozen
class TtftModel:
    """The engine's timing, in milliseconds: prefill of ``n`` tokens in one batch costs
    ``a·n² + b·n + c``; a decode step costs ``decode_step_ms``. Defaults: the reference
    mocker's polynomial and its decode step at low occupancy."""

    prefill_coefficients: tuple[float, float, float] = (4.209989e-7, 1.518344e-2, 16.50142)
    decode_step_ms: float = 6.0
    max_batched_tokens: int = 8192

    def prefill_ms(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        a, b, c = self.prefill_coefficients
        return a * tokens * tokens + b * tokens + c

    def predict_ms(self, queued_tokens: int, new_tokens: int, busy: bool) -> float:
        """Time until a request with ``new_tokens`` uncached tokens has its first token, behind
        ``queued_tokens`` of prefill; ``busy``: the worker is decoding other requests."""
        total = queued_tokens + new_tokens
        budget = self.max_batched_tokens
        full, rest = divmod(total, budget)
        steps = full + (1 if rest else 0)
        ms = full * self.prefill_ms(budget) + self.prefill_ms(rest)
        if busy:
            ms += max(steps, 1) * self.decode_step_ms
        return ms


@attrs.frozen
class TtftSelection:
    """A ``predicted_ttft`` decision with every input, in columns (as `KvSelection`)."""

    chosen: int
    isl: int
    block_size: int
    model: TtftModel
    worker_ids: tuple[int, ...]
    overlap_blocks: tuple[int, ...]
    tree_sizes: tuple[int, ...]
    queued_tokens: tuple[int, ...]
    active_requests: tuple[int, ...]
    predicted_ms: tuple[float, ...]

    def new_tokens(self, index: int) -> int:
        return max(0, self.isl - self.overlap_blocks[index] * self.block_size)


def select_by_ttft(
    worker_ids: Sequence[int],
    queued_tokens: Sequence[int],
    active_requests: Sequence[int],
    overlaps: OverlapScores,
    isl: int,
    block_size: int,
    model: TtftModel,
) -> TtftSelection:
    """Choose the candidate with the smallest predicted time to first token.

    Ties go to the worker caching fewer blocks, then to the lowest id. Raises ``ValueError``
    without candidates.
    """
    if not worker_ids:
        raise ValueError("select_by_ttft needs at least one candidate worker")
    full_blocks = isl // block_size
    overlap = [min(overlaps.scores.get(w, 0), full_blocks) for w in worker_ids]
    sizes = [overlaps.tree_sizes.get(w, 0) for w in worker_ids]
    predicted = [
        model.predict_ms(q, isl - o * block_size, a > 0)
        for q, o, a in zip(queued_tokens, overlap, active_requests, strict=True)
    ]
    chosen = _choose(worker_ids, sizes, predicted)
    return TtftSelection(
        chosen,
        isl,
        block_size,
        model,
        tuple(worker_ids),
        tuple(overlap),
        tuple(sizes),
        tuple(queued_tokens),
        tuple(active_requests),
        tuple(predicted),
    )


def replay_ttft_selection(record: TtftSelection) -> int:
    """Recompute a decision from its record; raises ``ValueError`` if the recorded
    predictions do not follow from the recorded terms (an altered record)."""
    predicted = [
        record.model.predict_ms(q, record.new_tokens(i), a > 0)
        for i, (q, a) in enumerate(zip(record.queued_tokens, record.active_requests, strict=True))
    ]
    if list(record.predicted_ms) != predicted:
        raise ValueError("the recorded predictions do not follow from the recorded terms")
    return _choose(list(record.worker_ids), list(record.tree_sizes), predicted)


def _choose(worker_ids: Sequence[int], sizes: Sequence[int], predicted: Sequence[float]) -> int:
    best = min(predicted)
    tied = [i for i, p in enumerate(predicted) if p == best]
    if len(tied) == 1:
        return worker_ids[tied[0]]
    smallest = min(sizes[i] for i in tied)
    return min(worker_ids[i] for i in tied if sizes[i] == smallest)
