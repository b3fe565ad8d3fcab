"""The ``kv`` routing mode's cost policy (reference/dynamo.md 2.5, ``DefaultWorkerSelector``).

Per candidate worker, with ``isl`` prompt tokens and ``overlap`` cached leading blocks::

    prefill_tokens = isl - overlap * block_size + active_prefill_tokens
    decode_blocks  = active_decode_blocks + new_decode_blocks
    logit          = overlap_score_weight * (prefill_tokens / block_size) + decode_blocks

Lower is better. ``new_decode_blocks`` is the caller's figure for the request's blocks not already
active on the worker; without one it is ``ceil(isl / block_size) - overlap``, i.e. cached blocks
are assumed to be shared with running requests. A weight of 0 means the index is not consulted at
all (pure load balancing, Dynamo's "no indexer"): overlap counts as 0 in both terms.

Temperature 0 picks the lowest logit; ties go to the worker caching the fewest blocks, then to the
lowest worker id. Temperature ``T > 0`` samples from ``softmax(-logit / (max - min) / T)``
(uniform when every logit is equal) using one ``rng.random()`` draw, which the result records.

**Replay.** A :class:`KvSelection` holds every input of the choice (each candidate's overlap,
tree size, prefill tokens and decode blocks, the knobs, and the draw), so
:func:`replay_selection` recomputes the logits and the choice from the record alone, with no rng.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Sequence

import attrs

from interlock.kv._tree import OverlapScores

__all__ = [
    "CandidateScore",
    "KvSelection",
    "SelectionReason",
    "WorkerLoadView",
    "replay_selection",
    "select_worker",
]

_non_negative = attrs.validators.ge(0)


class SelectionReason(enum.StrEnum):
    """Why :func:`select_worker` chose its worker (a plain string in logs)."""

    ONLY_CANDIDATE = "only_candidate"
    """One candidate: nothing to compare, no draw."""
    LOWEST_COST = "lowest_cost"
    """Temperature 0 and a single lowest logit."""
    TIE_SMALLEST_TREE = "tie_smallest_tree"
    """Temperature 0, tied logits, one tied worker caching fewer blocks than the others."""
    TIE_LOWEST_WORKER_ID = "tie_lowest_worker_id"
    """Temperature 0, tied logits and tree sizes: the lowest worker id."""
    SAMPLED = "sampled"
    """Temperature > 0: drawn from the softmax of the scaled logits."""
    SAMPLED_UNIFORM = "sampled_uniform"
    """Temperature > 0 and every logit equal: drawn uniformly."""


@attrs.frozen
class WorkerLoadView:
    """One candidate worker's load, as the Router's bookkeeping sees it.

    ``active_prefill_tokens``: prompt tokens of requests on the worker that have not finished
    prefill. ``active_decode_blocks``: KV blocks in use by its running requests.
    ``new_decode_blocks``: how many of this request's blocks would be new on the worker, if the
    caller tracks active blocks precisely; ``None`` uses ``ceil(isl / block_size) - overlap``.
    """

    worker_id: int
    active_prefill_tokens: int = attrs.field(default=0, validator=_non_negative)
    active_decode_blocks: int = attrs.field(default=0, validator=_non_negative)
    new_decode_blocks: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_non_negative)
    )


@attrs.frozen
class CandidateScore:
    """One candidate's terms in a decision; everything replay needs about it.

    ``overlap_blocks`` is the overlap the cost used (0 when the weight is 0, never more than the
    prompt's full blocks); ``tree_size`` the worker's cached-block count (the tie-break).
    """

    worker_id: int
    overlap_blocks: int
    tree_size: int
    prefill_tokens: int
    decode_blocks: int
    logit: float


@attrs.frozen
class KvSelection:
    """A routing decision and every input it depended on (goes verbatim into transition logs).

    ``candidates`` keeps the caller's order, which sampling depends on. ``draw`` is the
    ``rng.random()`` value a sampled choice used, ``None`` when no draw was made.
    """

    chosen: int
    reason: SelectionReason
    candidates: tuple[CandidateScore, ...]
    isl: int
    block_size: int
    overlap_score_weight: float
    temperature: float
    draw: float | None = None


def select_worker(
    candidates: Sequence[WorkerLoadView],
    overlaps: OverlapScores,
    isl: int,
    block_size: int,
    overlap_score_weight: float = 1.0,
    temperature: float = 0.0,
    rng: random.Random | None = None,
) -> KvSelection:
    """Choose the worker with the lowest expected cost for a prompt of ``isl`` tokens.

    ``overlaps`` comes from ``find_matches`` on the prompt's block hashes; a candidate missing
    from it has overlap 0 and tree size 0. Returns a :class:`KvSelection` listing every candidate
    in the given order. Draws once from ``rng`` when ``temperature > 0`` and there are at least
    two candidates, never otherwise. Raises ``ValueError`` for no candidates, a repeated worker
    id, a negative ``isl``, a non-positive ``block_size``, a negative or non-finite weight or
    temperature, or ``temperature > 0`` without an ``rng``.
    """
    _check_knobs(isl, block_size, overlap_score_weight, temperature)
    if not candidates:
        raise ValueError(
            "select_worker needs at least one candidate worker; the Router should fail the "
            "request (no workers available) before scoring"
        )
    full_blocks = isl // block_size
    request_blocks = -(-isl // block_size)
    use_overlap = overlap_score_weight != 0
    scores = overlaps.scores
    tree_sizes = overlaps.tree_sizes
    scored: list[CandidateScore] = []
    seen: set[int] = set()
    for view in candidates:
        worker_id = view.worker_id
        if worker_id in seen:
            raise ValueError(f"worker {worker_id} appears twice among the candidates")
        seen.add(worker_id)
        overlap = min(scores.get(worker_id, 0), full_blocks) if use_overlap else 0
        prefill = isl - overlap * block_size + view.active_prefill_tokens
        new_blocks = view.new_decode_blocks
        if new_blocks is None:
            new_blocks = request_blocks - overlap
        decode = view.active_decode_blocks + new_blocks
        scored.append(
            CandidateScore(
                worker_id,
                overlap,
                tree_sizes.get(worker_id, 0),
                prefill,
                decode,
                _logit(overlap_score_weight, prefill, block_size, decode),
            )
        )
    draw: float | None = None
    if temperature > 0 and len(scored) > 1:
        if rng is None:
            raise ValueError(
                f"temperature={temperature} samples a worker and needs an rng; pass a "
                "random.Random (seeded, for reproducible runs) or use temperature=0"
            )
        draw = rng.random()
    chosen, reason = _choose(scored, temperature, draw)
    return KvSelection(
        chosen,
        reason,
        tuple(scored),
        isl,
        block_size,
        overlap_score_weight,
        temperature,
        draw,
    )


def replay_selection(record: KvSelection) -> int:
    """Recompute a decision from its record alone; return the worker it chooses.

    The logits are recomputed from each candidate's recorded terms and must equal the recorded
    ones. Raises ``ValueError`` if they do not, if the record is otherwise malformed (no
    candidates, bad knobs, a sampled decision without its draw), i.e. the record was not produced
    by :func:`select_worker` or was altered.
    """
    _check_knobs(record.isl, record.block_size, record.overlap_score_weight, record.temperature)
    if not record.candidates:
        raise ValueError("the record lists no candidates")
    for candidate in record.candidates:
        logit = _logit(
            record.overlap_score_weight,
            candidate.prefill_tokens,
            record.block_size,
            candidate.decode_blocks,
        )
        if logit != candidate.logit:
            raise ValueError(
                f"worker {candidate.worker_id}: recorded logit {candidate.logit!r} but its terms "
                f"give {logit!r}; the record does not come from select_worker or was altered"
            )
    needs_draw = record.temperature > 0 and len(record.candidates) > 1
    if needs_draw and record.draw is None:
        raise ValueError("a sampled decision (temperature > 0) must record its draw")
    chosen, _reason = _choose(list(record.candidates), record.temperature, record.draw)
    return chosen


def _check_knobs(isl: int, block_size: int, weight: float, temperature: float) -> None:
    if isl < 0:
        raise ValueError(f"isl must be >= 0 tokens, got {isl}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not (weight >= 0 and math.isfinite(weight)):
        raise ValueError(f"overlap_score_weight must be a finite number >= 0, got {weight!r}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")


def _logit(weight: float, prefill_tokens: int, block_size: int, decode_blocks: int) -> float:
    # One expression shared by select and replay, so both round identically.
    return weight * (prefill_tokens / block_size) + decode_blocks


def _choose(
    scored: list[CandidateScore], temperature: float, draw: float | None
) -> tuple[int, SelectionReason]:
    if len(scored) == 1:
        return scored[0].worker_id, SelectionReason.ONLY_CANDIDATE
    if temperature > 0:
        assert draw is not None
        return _sample(scored, temperature, draw)
    best = min(candidate.logit for candidate in scored)
    tied = [candidate for candidate in scored if candidate.logit == best]
    if len(tied) == 1:
        return tied[0].worker_id, SelectionReason.LOWEST_COST
    smallest = min(candidate.tree_size for candidate in tied)
    tied = [candidate for candidate in tied if candidate.tree_size == smallest]
    if len(tied) == 1:
        return tied[0].worker_id, SelectionReason.TIE_SMALLEST_TREE
    return min(c.worker_id for c in tied), SelectionReason.TIE_LOWEST_WORKER_ID


def _sample(
    scored: list[CandidateScore], temperature: float, draw: float
) -> tuple[int, SelectionReason]:
    logits = [candidate.logit for candidate in scored]
    low = min(logits)
    span = max(logits) - low
    if span == 0:
        index = min(int(draw * len(scored)), len(scored) - 1)
        return scored[index].worker_id, SelectionReason.SAMPLED_UNIFORM
    # softmax(-logit / span / T), shifted by the best logit so the largest weight is exp(0).
    weights = [math.exp(-(logit - low) / span / temperature) for logit in logits]
    target = draw * math.fsum(weights)
    running = 0.0
    for candidate, weight in zip(scored, weights, strict=True):
        running += weight
        if target < running:
            return candidate.worker_id, SelectionReason.SAMPLED
    return scored[-1].worker_id, SelectionReason.SAMPLED
