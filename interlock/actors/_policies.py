"""Selection policies: how the Router picks one worker for one leg.

A policy is synchronous and owned by the Router actor. It returns a `SelectionRecord` listing
every candidate with its load terms, the choice, and the inputs that make the choice
replayable with `replay_selection`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

import attrs

from .._errors import NoWorkersAvailable
from ..wire import CandidateRecord, Leg, PreprocessedRequest, SelectionRecord
from ._load import WorkerLoad


@attrs.frozen(slots=True)
class WorkerView:
    """A candidate as a policy sees it: its id and its booked load."""

    worker_id: int
    load: WorkerLoad


class SelectionPolicy(Protocol):
    """Chooses one of ``candidates`` (never empty, sorted by worker id) for ``leg``.

    ``name`` goes into every `SelectionRecord` it returns (``policy``) and into the errors the
    router raises about it. ``choose`` runs inside the Router actor, one call at a time, so it
    must return quickly and never block. It returns a record whose ``leg`` is ``leg`` and whose
    ``chosen`` is one of the candidates' ``worker_id``; it may raise `NoWorkersAvailable` to
    refuse the request on purpose. The router rebuilds a policy from scratch whenever it
    restarts, so a policy keeps no state it cannot lose (or rebuilds it).
    """

    name: str

    def choose(
        self, leg: Leg, candidates: Sequence[WorkerView], request: PreprocessedRequest
    ) -> SelectionRecord: ...


#: The ``policy`` names `replay_selection` can recompute: the built-in policies. A record made
#: by any other policy (a `Components.selection_policy` of your own) cannot be replayed.
REPLAYABLE_POLICIES: tuple[str, ...] = (
    "round_robin",
    "random",
    "direct",
    "preselected",
    "kv",
    "predicted_ttft",
)


def candidate_records(candidates: Sequence[WorkerView]) -> tuple[CandidateRecord, ...]:
    """The candidates as `SelectionRecord.candidates` lists them: each worker's id and its
    booked load (prefill tokens, decode blocks, active requests), no overlap and no cost."""
    return tuple(
        CandidateRecord(
            worker_id=c.worker_id,
            prefill_tokens=c.load.prefill_tokens,
            decode_blocks=c.load.active_blocks,
            active_requests=c.load.active_requests,
        )
        for c in candidates
    )


class RoundRobinPolicy:
    """Each leg kind (prefill; agg and decode) cycles through its pool in worker-id order."""

    name = "round_robin"

    def __init__(self) -> None:
        self._cursors: dict[str, int] = {}

    def choose(
        self, leg: Leg, candidates: Sequence[WorkerView], request: PreprocessedRequest
    ) -> SelectionRecord:
        pool = "prefill" if leg == "prefill" else "decode"
        cursor = self._cursors.get(pool, 0)
        self._cursors[pool] = cursor + 1
        chosen = candidates[cursor % len(candidates)].worker_id
        return SelectionRecord(
            leg=leg,
            policy=self.name,
            chosen=chosen,
            candidates=candidate_records(candidates),
            reason=f"next in turn (cursor {cursor} over {len(candidates)} workers)",
            inputs={"cursor": cursor},
        )


class RandomPolicy:
    """Uniformly random, from a seeded generator (``router_seed``)."""

    name = "random"

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def choose(
        self, leg: Leg, candidates: Sequence[WorkerView], request: PreprocessedRequest
    ) -> SelectionRecord:
        draw = self._rng.random()
        chosen = candidates[int(draw * len(candidates))].worker_id
        return SelectionRecord(
            leg=leg,
            policy=self.name,
            chosen=chosen,
            candidates=candidate_records(candidates),
            reason=f"uniform draw {draw:.6f} over {len(candidates)} workers",
            inputs={"draw": draw},
        )


class DirectPolicy:
    """Every agg/decode leg goes to ``worker_id``; prefill legs take turns (round robin),
    since one fixed worker cannot serve both roles."""

    name = "direct"

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self._prefill = RoundRobinPolicy()

    def choose(
        self, leg: Leg, candidates: Sequence[WorkerView], request: PreprocessedRequest
    ) -> SelectionRecord:
        if leg == "prefill":
            return self._prefill.choose(leg, candidates, request)
        if not any(c.worker_id == self.worker_id for c in candidates):
            raise NoWorkersAvailable(
                f"router_mode='direct' sends every request to direct_worker_id="
                f"{self.worker_id}, which is not registered (or was excluded); registered: "
                f"{[c.worker_id for c in candidates]}"
            )
        return SelectionRecord(
            leg=leg,
            policy=self.name,
            chosen=self.worker_id,
            candidates=candidate_records(candidates),
            reason=f"direct_worker_id={self.worker_id}",
            inputs={"worker_id": self.worker_id},
        )


def replay_selection(record: SelectionRecord) -> int:
    """Recompute the worker a `SelectionRecord` chose, from its inputs and candidates.

    Raises:
        ValueError: the record's policy is not built in (`REPLAYABLE_POLICIES`: a custom
            policy's choice cannot be recomputed), or its inputs are incomplete.
    """
    if record.policy not in REPLAYABLE_POLICIES:
        raise ValueError(
            f"cannot replay a {record.policy!r} selection: it is not a built-in policy "
            f"({', '.join(REPLAYABLE_POLICIES)}), and interlock cannot recompute the choice of "
            "a custom selection policy; its record shows what it chose and why (reason, inputs)"
        )
    ids = [c.worker_id for c in record.candidates]
    inputs = record.inputs
    if record.policy == "round_robin" and "cursor" in inputs:
        return ids[int(inputs["cursor"]) % len(ids)]
    if record.policy == "random" and "draw" in inputs:
        return ids[int(float(inputs["draw"]) * len(ids))]
    if record.policy in ("direct", "preselected") and "worker_id" in inputs:
        return int(inputs["worker_id"])
    if record.policy == "kv" and "kv" in inputs:
        from ..kv import KvSelection, replay_kv_selection
        from ..wire import from_builtins

        return replay_kv_selection(from_builtins(inputs["kv"], KvSelection))
    if record.policy == "predicted_ttft" and "predicted_ttft" in inputs:
        from ..kv import TtftSelection, replay_ttft_selection
        from ..wire import from_builtins

        return replay_ttft_selection(from_builtins(inputs["predicted_ttft"], TtftSelection))
    raise ValueError(f"cannot replay a {record.policy!r} selection with inputs {inputs!r}")
