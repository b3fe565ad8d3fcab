"""`summarize`: what happened to the requests of a log, counted."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from .._config import PipelineConfig
from ..statemachines import State, Trigger
from ._history import RequestHistory

#: ``kv_block_size``'s default: the block size assumed when a decision does not record one.
DEFAULT_BLOCK_SIZE: int = PipelineConfig().kv_block_size
#: Policies that look up prefix overlap; other policies record 0 for every candidate.
OVERLAP_POLICIES = frozenset({"kv"})
_PREFILL_LEGS = frozenset({"agg", "prefill"})


@attrs.frozen
class DurationStats:
    """Seconds spent in one state, over every stay that ended (trio time)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float


@attrs.frozen
class WorkerCounts:
    """One worker's part in the log.

    ``requests``: requests a record of which names the worker. ``done``, ``failed``,
    ``cancelled``: requests that ended there (the worker named last). ``migrations``: streams
    that broke on it and moved. ``fallbacks``: prefill legs that failed on it.
    """

    requests: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    migrations: int = 0
    fallbacks: int = 0


@attrs.frozen
class Summary:
    """Counts over the requests of a log.

    ``final_states`` counts each request's last state: done, failed, cancelled, or the state
    a request still in flight is in. ``prefix_hit_rate`` is the share of prompt blocks the
    chosen worker already cached, over the decisions whose policy looks up overlap (``kv``):
    None ("n/a") when no decision does. ``incomplete`` counts requests whose first records are
    not in the log (rotated away or lost); ``problems`` the lines that could not be read.
    """

    requests: int
    final_states: dict[str, int]
    modes: dict[str, int]
    workers: dict[int, WorkerCounts]
    migrations: int
    migrated_requests: int
    fallbacks: int
    failures: dict[str, int]
    cancellations: dict[str, int]
    durations: dict[str, DurationStats]
    prefix_hit_rate: float | None
    prefix_blocks_hit: int
    prefix_blocks: int
    incomplete: int = 0
    problems: int = 0
    first_wall: float | None = None
    last_wall: float | None = None

    def to_json_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = attrs.asdict(self)
        data["workers"] = {str(w): c for w, c in data["workers"].items()}
        return data


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted values, interpolating linearly between the
    closest ranks (numpy's default).

    Raises:
        ValueError: no values.
    """
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _reason(detail: str | None, decision: Any) -> str:
    if isinstance(decision, Mapping) and isinstance(decision.get("error"), str):
        return str(decision["error"])
    if detail:
        head = detail.split(":", 1)[0].strip()
        if head and " " not in head:
            return head
    return "unknown"


def _prefix_hits(history: RequestHistory, block_size: int) -> tuple[int, int]:
    hit = total = 0
    for entry in history.routing_entries:
        decision = entry.decision
        prompt = decision.get("prompt_tokens")
        if prompt is None and isinstance(decision.get("token_ids"), list):
            prompt = len(decision["token_ids"])
        if not isinstance(prompt, int):
            continue
        for selection in decision.get("selections") or ():
            if not isinstance(selection, Mapping) or selection.get("leg") not in _PREFILL_LEGS:
                continue
            candidates = [c for c in selection.get("candidates") or () if isinstance(c, Mapping)]
            overlaps = {c.get("worker_id"): c.get("overlap_blocks") or 0 for c in candidates}
            if selection.get("policy") not in OVERLAP_POLICIES and not any(overlaps.values()):
                continue
            inputs = selection.get("inputs")
            size = inputs.get("block_size") if isinstance(inputs, Mapping) else None
            blocks = prompt // (size if isinstance(size, int) and size > 0 else block_size)
            total += blocks
            hit += min(int(overlaps.get(selection.get("chosen"), 0)), blocks)
    return hit, total


def summarize(
    requests: Mapping[str, RequestHistory] | Iterable[RequestHistory],
    *,
    problems: int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Summary:
    """Count what happened to ``requests`` (a `LoadedLog.requests` result, or histories).

    ``block_size`` is the KV block size for the prefix hit rate when a decision does not
    record its own. ``problems`` is carried into the summary (the unreadable lines).
    """
    histories = list(requests.values() if isinstance(requests, Mapping) else requests)
    final_states: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    cancellations: Counter[str] = Counter()
    workers: dict[int, Counter[str]] = {}
    stays: dict[str, list[float]] = {}
    migrations = migrated = fallbacks = incomplete = hit = blocks = 0
    walls: list[float] = []
    for history in histories:
        final_states[history.final_state] += 1
        modes[history.mode] += 1
        incomplete += not history.complete
        walls += (history.entries[0].wall, history.entries[-1].wall)
        moved = history.count(Trigger.MIGRATE)
        migrations += moved
        migrated += moved > 0
        fallbacks += history.count(Trigger.FALL_BACK)
        for worker in history.workers:
            workers.setdefault(worker, Counter())["requests"] += 1
        last = history.last_worker
        if history.terminal and last is not None:
            workers.setdefault(last, Counter())[history.final_state] += 1
        previous = None
        for span in history.spans:
            if span.duration is not None:
                stays.setdefault(span.state, []).append(span.duration)
            if span.trigger == Trigger.MIGRATE and span.worker_id is not None:
                workers.setdefault(span.worker_id, Counter())["migrations"] += 1
            if (
                span.trigger == Trigger.FALL_BACK
                and previous is not None
                and previous.worker_id is not None
            ):
                workers.setdefault(previous.worker_id, Counter())["fallbacks"] += 1
            previous = span
        last_entry = history.entries[-1]
        if last_entry.dst == State.FAILED:
            failures[_reason(last_entry.detail, last_entry.decision)] += 1
        elif last_entry.dst == State.CANCELLED:
            cancellations[_reason(last_entry.detail, last_entry.decision)] += 1
        request_hit, request_blocks = _prefix_hits(history, block_size)
        hit += request_hit
        blocks += request_blocks
    order = {s.value: i for i, s in enumerate(State)}
    durations = {}
    for state in sorted(stays, key=lambda s: order.get(s, len(order))):
        values = sorted(stays[state])
        durations[state] = DurationStats(
            count=len(values),
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            max=values[-1],
        )
    return Summary(
        requests=len(histories),
        final_states=dict(sorted(final_states.items(), key=lambda kv: order.get(kv[0], 99))),
        modes=dict(modes.most_common()),
        workers={w: WorkerCounts(**workers[w]) for w in sorted(workers)},
        migrations=migrations,
        migrated_requests=migrated,
        fallbacks=fallbacks,
        failures=dict(failures.most_common()),
        cancellations=dict(cancellations.most_common()),
        durations=durations,
        prefix_hit_rate=hit / blocks if blocks else None,
        prefix_blocks_hit=hit,
        prefix_blocks=blocks,
        incomplete=incomplete,
        problems=problems,
        first_wall=min(walls) if walls else None,
        last_wall=max(walls) if walls else None,
    )
