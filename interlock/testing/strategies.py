"""Hypothesis strategies for configurations, requests, workloads and fault schedules.

Every strategy shrinks towards the simplest case: fewer requests, shorter prompts, earlier and
fewer faults, the first fault kind (``crash``), so a failing property reports a small example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from .._config import COMBINATION_RULES, KV_ROUTER_MODES, SELECTING_ROUTER_MODES, PipelineConfig
from ..wire import PreprocessedRequest, SamplingOptions
from ._faults import FAULT_KINDS, Fault, FaultKind
from ._workload import TimedRequest

__all__ = [
    "ALL_ROUTER_MODES",
    "fault_schedules",
    "invalid_configs",
    "prefix_families",
    "requests",
    "sampling_options",
    "token_ids",
    "valid_configs",
    "workloads",
]

_ROUTINGS = ("discover", "direct_to_known", "query_only")
_SELECTING = ("round_robin", "random", "direct")
#: Every selecting router mode, the KV-aware ones included (mock workers publish KV events).
ALL_ROUTER_MODES: tuple[str, ...] = SELECTING_ROUTER_MODES


@st.composite
def valid_configs(draw: st.DrawFn, *, router_modes: Sequence[str] = _SELECTING) -> Any:
    """Configurations that pass `PipelineConfig.validate`, over every routing mode and the
    given selection policies (pass ``router_modes=ALL_ROUTER_MODES`` to include ``kv`` and
    ``predicted_ttft``, which then also vary the KV knobs: events or approximate mode,
    overlap weight, temperature)."""
    routing = draw(st.sampled_from(_ROUTINGS))
    changes: dict[str, Any] = {
        "routing": routing,
        "postprocessing": draw(st.sampled_from(("frontend", "engine"))),
        "enforce_disagg": draw(st.booleans()),
        "router_seed": draw(st.integers(0, 2**16)),
    }
    if routing == "direct_to_known":
        changes["router_mode"] = draw(st.sampled_from(("round_robin", "direct_from_request")))
    else:
        mode = draw(st.sampled_from(tuple(router_modes)))
        changes["router_mode"] = mode
        if mode == "direct":
            changes["direct_worker_id"] = draw(st.integers(0, 3))
        if mode in KV_ROUTER_MODES:
            changes["kv_events"] = draw(st.booleans())
            changes["overlap_score_weight"] = draw(st.sampled_from((1.0, 0.0, 0.5, 2.0)))
            changes["router_temperature"] = draw(st.sampled_from((0.0, 0.5)))
    if routing == "discover" and changes["router_mode"] != "direct":
        changes["migration_limit"] = draw(st.integers(0, 3))
        if changes["migration_limit"] and draw(st.booleans()):
            changes["migration_max_seq_len"] = draw(st.integers(8, 4096))
    if routing == "discover" and draw(st.booleans()):
        changes["allow_request_worker_ids"] = True
    return PipelineConfig(**changes).validate()


@st.composite
def invalid_configs(draw: st.DrawFn) -> Any:
    """Configurations that break at least one combination rule (each rule's example, with
    unrelated knobs varied)."""
    rule = draw(st.sampled_from(COMBINATION_RULES))
    extra: dict[str, Any] = {}
    if "postprocessing" not in rule.example:
        extra["postprocessing"] = draw(st.sampled_from(("frontend", "engine")))
    if "router_seed" not in rule.example:
        extra["router_seed"] = draw(st.integers(0, 100))
    return PipelineConfig(**(extra | dict(rule.example)))


def token_ids(*, min_size: int = 1, max_size: int = 64) -> st.SearchStrategy[list[int]]:
    """Prompts: lists of token ids of ``min_size`` to ``max_size`` tokens."""
    return st.lists(st.integers(0, 50_000), min_size=min_size, max_size=max_size)


def prefix_families(
    *, families: int = 3, min_length: int = 16, max_length: int = 128
) -> st.SearchStrategy[tuple[tuple[int, ...], ...]]:
    """1 to ``families`` shared prefixes (a system prompt, a document): pass them to
    `requests` as ``prefixes`` so requests of one family share a cacheable prefix."""
    prefix = token_ids(min_size=min_length, max_size=max_length).map(tuple)
    return st.lists(prefix, min_size=1, max_size=families).map(tuple)


def sampling_options() -> st.SearchStrategy[SamplingOptions]:
    """Sampling parameters: temperature, top_p and seed, each possibly unset."""
    return st.builds(
        SamplingOptions,
        temperature=st.none() | st.floats(0.0, 2.0, allow_nan=False),
        top_p=st.none() | st.floats(0.0, 1.0, allow_nan=False),
        seed=st.none() | st.integers(0, 2**31 - 1),
    )


@st.composite
def requests(
    draw: st.DrawFn,
    *,
    min_prompt: int = 1,
    max_prompt: int = 64,
    max_tokens: int = 24,
    prefixes: tuple[tuple[int, ...], ...] = (),
    sampling: bool = False,
) -> PreprocessedRequest:
    """Requests with random prompts of ``min_prompt`` to ``max_prompt`` tokens (after one of
    ``prefixes`` when given, so families share a prefix), lengths, stop conditions and, with
    ``sampling=True``, sampling parameters (the mock engine's tokens then depend on the seed:
    compare with ``mock_continuation(..., request_seed=request.sampling.seed or 0)``)."""
    prompt = draw(token_ids(min_size=min_prompt, max_size=max_prompt))
    if prefixes:
        prompt = list(draw(st.sampled_from(prefixes))) + prompt
    limit = draw(st.integers(1, max_tokens))
    options = draw(sampling_options()) if sampling else SamplingOptions()
    return PreprocessedRequest(
        token_ids=prompt,
        max_tokens=limit,
        min_tokens=draw(st.integers(0, limit)),
        stop_token_ids=draw(st.lists(st.integers(0, 31_999), max_size=3)),
        ignore_eos=draw(st.booleans()),
        sampling=options,
    )


@st.composite
def workloads(
    draw: st.DrawFn,
    *,
    min_requests: int = 1,
    max_requests: int = 8,
    horizon: float = 1.0,
    each: st.SearchStrategy[PreprocessedRequest] | None = None,
) -> list[TimedRequest]:
    """Lists of `TimedRequest` arriving within ``horizon`` seconds, in time order, each
    request drawn from ``each`` (default: ``requests()``)."""
    strategy = each if each is not None else requests()
    arrivals = draw(
        st.lists(
            st.tuples(st.floats(0.0, horizon, allow_nan=False), strategy),
            min_size=min_requests,
            max_size=max_requests,
        )
    )
    return [TimedRequest(at, request) for at, request in sorted(arrivals, key=lambda a: a[0])]


def fault_schedules(
    worker_ids: Sequence[int],
    *,
    horizon: float = 2.0,
    max_faults: int = 6,
    kinds: Sequence[FaultKind] = FAULT_KINDS,
    max_amount: float = 2.0,
) -> st.SearchStrategy[list[Fault]]:
    """Lists of up to ``max_faults`` faults: which of ``worker_ids``, when (within
    ``horizon`` seconds), which of ``kinds`` (crash, restart, stall, refuse, accept, slow,
    leave, rejoin by default), and how much (a stall's seconds or a slow-down factor, up to
    ``max_amount``)."""
    fault = st.builds(
        Fault,
        at=st.floats(0.0, horizon, allow_nan=False),
        worker_id=st.sampled_from(list(worker_ids)),
        kind=st.sampled_from(tuple(kinds)),
        amount=st.floats(0.05, max_amount, allow_nan=False),
    )
    return st.lists(fault, max_size=max_faults)
