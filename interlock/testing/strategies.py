"""Hypothesis strategies for configurations, requests and fault schedules."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from .._config import COMBINATION_RULES, PipelineConfig
from ..wire import PreprocessedRequest
from ._faults import FAULT_KINDS, Fault

_ROUTINGS = ("discover", "direct_to_known", "query_only")
_SELECTING = ("round_robin", "random", "direct")


@st.composite
def valid_configs(draw: st.DrawFn, *, router_modes: tuple[str, ...] = _SELECTING) -> Any:
    """Configurations that pass `PipelineConfig.validate`, over every routing mode and the
    given selection policies (``kv`` needs its own components; add it explicitly)."""
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
        mode = draw(st.sampled_from(router_modes))
        changes["router_mode"] = mode
        if mode == "direct":
            changes["direct_worker_id"] = draw(st.integers(0, 3))
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
    return st.lists(st.integers(0, 50_000), min_size=min_size, max_size=max_size)


@st.composite
def requests(
    draw: st.DrawFn,
    *,
    max_prompt: int = 64,
    max_tokens: int = 24,
    prefixes: tuple[tuple[int, ...], ...] = (),
) -> PreprocessedRequest:
    """Requests with random prompts (optionally starting with one of ``prefixes``, so
    families share a prefix), lengths and stop conditions."""
    prompt = draw(token_ids(max_size=max_prompt))
    if prefixes:
        prompt = list(draw(st.sampled_from(prefixes))) + prompt
    limit = draw(st.integers(1, max_tokens))
    return PreprocessedRequest(
        token_ids=prompt,
        max_tokens=limit,
        min_tokens=draw(st.integers(0, limit)),
        stop_token_ids=draw(st.lists(st.integers(0, 31_999), max_size=3)),
        ignore_eos=draw(st.booleans()),
    )


def fault_schedules(
    worker_ids: list[int], *, horizon: float = 2.0, max_faults: int = 6
) -> st.SearchStrategy[list[Fault]]:
    """Lists of faults on ``worker_ids`` within ``horizon`` seconds."""
    fault = st.builds(
        Fault,
        at=st.floats(0.0, horizon, allow_nan=False),
        worker_id=st.sampled_from(worker_ids),
        kind=st.sampled_from(FAULT_KINDS),
        amount=st.floats(0.05, 2.0, allow_nan=False),
    )
    return st.lists(fault, max_size=max_faults)
