"""Routing decisions: what the router chose and everything it weighed, for logs and replay."""

from __future__ import annotations

from typing import Any, Literal

import attrs

Leg = Literal["agg", "prefill", "decode"]


@attrs.frozen(kw_only=True)
class CandidateRecord:
    """One worker the router considered, with the terms of its cost (lower cost is better)."""

    worker_id: int
    overlap_blocks: int = 0
    prefill_tokens: int = 0
    decode_blocks: int = 0
    active_requests: int = 0
    cost: float | None = None


@attrs.frozen(kw_only=True)
class SelectionRecord:
    """How one leg's worker was chosen.

    ``policy`` is the router mode that chose (or ``preselected`` when the request named the
    worker); ``reason`` says why in words; ``inputs`` holds whatever else replaying the choice
    needs (the round-robin cursor, the random draw, the KV weight and temperature).
    """

    leg: Leg
    policy: str
    chosen: int
    candidates: tuple[CandidateRecord, ...] = ()
    excluded: tuple[int, ...] = ()
    reason: str = ""
    inputs: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class RoutingDecision:
    """The workers a request goes to. Aggregated: ``prefill_worker_id == decode_worker_id``
    in query-only answers (the reference shape) and ``disaggregated`` is False.
    """

    request_id: str
    token_ids: tuple[int, ...]
    decode_worker_id: int
    prefill_worker_id: int | None = None
    disaggregated: bool = False
    #: Why the request runs (or would run) disaggregated or not.
    split_reason: str = ""
    decode_dp_rank: int = 0
    prefill_dp_rank: int = 0
    selections: tuple[SelectionRecord, ...] = ()


@attrs.frozen(kw_only=True)
class ModelRewriteDecision:
    """How a ``[[model_rewrites]]`` rule (GAIE's InferenceModelRewrite) changed one request's
    model: the rule's ``name``, the ``model`` the client named, the ``target`` it goes to
    instead (the base model or a LoRA adapter) and that target's ``weight`` of the rule's
    ``total_weight``. Made once where the request enters the frontend; the transition log
    records it on the request's ``preprocess`` transition."""

    rule: str
    model: str
    target: str
    weight: int
    total_weight: int
