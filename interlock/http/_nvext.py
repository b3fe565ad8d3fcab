"""``nvext`` (the reference system's OpenAI extension) and the GAIE routing headers.

Request side (reference/dynamo.md 5.1, 3.7): `parse_nvext` validates the body's ``nvext``
object strictly (an unknown field is a 400 naming it); `apply_headers` lets
``x-worker-instance-id``, ``x-prefill-instance-id``, ``x-dp-rank`` and
``x-enable-local-updates`` override it, as the gateway's endpoint picker sets them, and
GAIE's ``x-gateway-inference-objective`` (the priority of the objective it names) and
``x-gateway-inference-fairness-id`` (the request's flow in the admission queue).

Response side (5.3): `worker_id_info` and `query_nvext` build the exact shapes the reference
returns: ``nvext.worker_id`` with prefill/decode ids and dp ranks, and ``nvext.token_ids``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from .._config import DEFAULT_OBJECTIVE_PRIORITY
from ..wire import RoutingDecision, RoutingHints
from ._errors import bad_request

U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

#: ``nvext.extra_fields`` values this frontend can fill in.
EXTRA_FIELDS: Final = frozenset({"worker_id", "timing", "completion_token_ids"})
#: Routing-hint fields that name a worker, in the order errors report them.
WORKER_ID_FIELDS: Final = ("backend_instance_id", "prefill_worker_id", "decode_worker_id")

HEADER_WORKER: Final = b"x-worker-instance-id"
HEADER_PREFILL: Final = b"x-prefill-instance-id"
HEADER_DP_RANK: Final = b"x-dp-rank"
HEADER_LOCAL_UPDATES: Final = b"x-enable-local-updates"
#: GAIE's request headers: the InferenceObjective's name, and the flow (fairness id).
HEADER_OBJECTIVE: Final = b"x-gateway-inference-objective"
HEADER_FAIRNESS: Final = b"x-gateway-inference-fairness-id"
_HEADERS: Final = frozenset(
    {
        HEADER_WORKER,
        HEADER_PREFILL,
        HEADER_DP_RANK,
        HEADER_LOCAL_UPDATES,
        HEADER_OBJECTIVE,
        HEADER_FAIRNESS,
    }
)

_AGENT_HINTS: Final = frozenset({"osl", "priority", "latency_sensitivity", "speculative_prefill"})


@attrs.frozen(kw_only=True, slots=True)
class NvExt:
    """A request's validated ``nvext`` (after header overrides).

    ``sources`` says where each worker-id field came from (``"nvext.backend_instance_id"`` or
    a header name), so an error about it names what the client actually sent.
    """

    greed_sampling: bool = False
    use_raw_prompt: bool = False
    annotations: tuple[str, ...] = ()
    backend_instance_id: int | None = None
    prefill_worker_id: int | None = None
    decode_worker_id: int | None = None
    dp_rank: int | None = None
    enable_local_updates: bool | None = None
    token_data: tuple[int, ...] | None = None
    max_thinking_tokens: int | None = None
    extra_fields: frozenset[str] = frozenset()
    expected_output_tokens: int | None = None
    priority: int | None = None
    #: The flow in the admission queue (``x-gateway-inference-fairness-id``).
    fairness_id: str | None = None
    sources: dict[str, str] = attrs.field(factory=dict)

    @property
    def query_only(self) -> bool:
        """The GAIE Stage 1 annotation: ``query_instance_id`` (E1) or ``query_instance_id:<v>``
        (E2+, any value, empty allowed). ``query_instance_id_extra:...`` does not count."""
        return any(
            a == "query_instance_id" or a.startswith("query_instance_id:") for a in self.annotations
        )

    def named_worker(self) -> tuple[str, str] | None:
        """``(field, source)`` of the first worker id the request names, or None."""
        for name in WORKER_ID_FIELDS:
            if getattr(self, name) is not None:
                return name, self.sources.get(name, f"nvext.{name}")
        return None

    def routing_hints(self) -> RoutingHints | None:
        if (
            self.backend_instance_id is None
            and self.prefill_worker_id is None
            and self.decode_worker_id is None
            and self.dp_rank is None
            and self.enable_local_updates is None
            and self.expected_output_tokens is None
            and self.priority is None
            and self.fairness_id is None
        ):
            return None
        return RoutingHints(
            backend_instance_id=self.backend_instance_id,
            prefill_worker_id=self.prefill_worker_id,
            decode_worker_id=self.decode_worker_id,
            dp_rank=self.dp_rank,
            enable_local_updates=self.enable_local_updates,
            expected_output_tokens=self.expected_output_tokens,
            priority=self.priority,
            fairness_id=self.fairness_id,
        )


def objective_priority(objectives: Mapping[str, int], name: str) -> int:
    """The admission priority of a request whose ``x-gateway-inference-objective`` header
    names ``name``: the objective's configured priority, or 0 (GAIE's default) when
    ``objectives`` has none of that name. Pure."""
    return objectives.get(name.strip(), DEFAULT_OBJECTIVE_PRIORITY)


def gaie_routing_hints(
    objectives: Mapping[str, int], objective: str | None, fairness_id: str | None
) -> RoutingHints | None:
    """The routing hints of GAIE's two request headers (their values, None when absent): the
    priority of the objective named, and the flow. None when neither is given. Pure."""
    flow = fairness_id.strip() if fairness_id is not None else ""
    if objective is None and not flow:
        return None
    return RoutingHints(
        priority=None if objective is None else objective_priority(objectives, objective),
        fairness_id=flow or None,
    )


EMPTY: Final = NvExt()


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _uint(value: Any, where: str, maximum: int) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        bits = 64 if maximum == U64_MAX else 32
        raise bad_request(
            f"{where} must be an unsigned {bits}-bit integer, got {_kind(value)} {value!r}",
            where,
        )
    return value


def _bool(value: Any, where: str) -> bool:
    if type(value) is not bool:
        raise bad_request(f"{where} must be a boolean, got {_kind(value)} {value!r}", where)
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if type(value) is not list or not all(type(v) is str for v in value):
        raise bad_request(f"{where} must be a list of strings", where)
    return tuple(value)


def parse_token_ids(value: Any, where: str) -> tuple[int, ...]:
    """A non-empty list of u32 token ids; raises a 400 naming ``where``."""
    if type(value) is not list:
        raise bad_request(f"{where} must be a list of token ids, got {_kind(value)}", where)
    if not value:
        raise bad_request(f"{where} must not be empty", where)
    for index, token in enumerate(value):
        if type(token) is not int or not 0 <= token <= U32_MAX:
            raise bad_request(
                f"{where}[{index}] must be a token id (an unsigned 32-bit integer), got {token!r}",
                f"{where}[{index}]",
            )
    return tuple(value)


def parse_nvext(value: Any) -> NvExt:
    """Validate a request body's ``nvext`` object.

    Raises:
        HttpError: 400 naming the first unknown or invalid field (``nvext.<field>``).
    """
    if value is None:
        return EMPTY
    if type(value) is not dict:
        raise bad_request(f"nvext must be an object, got {_kind(value)}", "nvext")
    fields: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, item in value.items():
        where = f"nvext.{key}"
        if item is None:
            continue  # serde's Option: null is the same as absent
        if key in ("greed_sampling", "use_raw_prompt"):
            fields[key] = _bool(item, where)
        elif key in WORKER_ID_FIELDS:
            fields[key] = _uint(item, where, U64_MAX)
            sources[key] = where
        elif key == "dp_rank" or key == "max_thinking_tokens":
            fields[key] = _uint(item, where, U32_MAX)
        elif key == "annotations":
            fields[key] = _strings(item, where)
        elif key == "token_data":
            fields[key] = parse_token_ids(item, where)
        elif key == "extra_fields":
            names = _strings(item, where)
            for index, name in enumerate(names):
                if name not in EXTRA_FIELDS:
                    raise bad_request(
                        f"{where}[{index}]={name!r} is not a response field interlock can fill "
                        f"in; use one of {', '.join(sorted(EXTRA_FIELDS))}",
                        f"{where}[{index}]",
                    )
            fields[key] = frozenset(names)
        elif key == "agent_hints":
            fields["expected_output_tokens"], fields["priority"] = _agent_hints(item, where)
        else:
            raise bad_request(
                f"unknown field {where!r}; interlock understands nvext."
                + ", nvext.".join(
                    sorted(
                        {
                            "greed_sampling",
                            "use_raw_prompt",
                            "annotations",
                            "token_data",
                            "max_thinking_tokens",
                            "extra_fields",
                            "dp_rank",
                            "agent_hints",
                            *WORKER_ID_FIELDS,
                        }
                    )
                ),
                where,
            )
    if not fields:
        return EMPTY
    return NvExt(**fields, sources=sources)


def _agent_hints(value: Any, where: str) -> tuple[int | None, int | None]:
    """``(osl, priority)`` of ``nvext.agent_hints``."""
    if type(value) is not dict:
        raise bad_request(f"{where} must be an object, got {_kind(value)}", where)
    osl = priority = None
    for key, item in value.items():
        here = f"{where}.{key}"
        if key not in _AGENT_HINTS:
            raise bad_request(
                f"unknown field {here!r}; agent_hints may have {', '.join(sorted(_AGENT_HINTS))}",
                here,
            )
        if item is None:
            continue
        if key == "osl":
            osl = _uint(item, here, U32_MAX)
        elif key == "speculative_prefill":
            _bool(item, here)
        elif key == "priority":
            if type(item) is not int:
                raise bad_request(f"{here} must be an integer, got {_kind(item)}", here)
            priority = item
        elif not isinstance(item, int | float) or isinstance(item, bool):
            raise bad_request(f"{here} must be a number, got {_kind(item)}", here)
    return osl, priority


def apply_headers(
    nvext: NvExt,
    headers: Iterable[tuple[bytes, bytes]],
    objectives: Mapping[str, int] | None = None,
) -> NvExt:
    """Apply the GAIE headers over ``nvext`` (headers win, as in the reference).

    ``x-worker-instance-id`` sets ``backend_instance_id`` and ``decode_worker_id``;
    ``x-prefill-instance-id`` sets ``prefill_worker_id``; ``x-dp-rank`` sets ``dp_rank``;
    ``x-enable-local-updates: false`` tells the router not to book the request's load;
    ``x-gateway-inference-objective: NAME`` sets ``priority`` to NAME's in ``objectives``
    (0 when it has none of that name); ``x-gateway-inference-fairness-id`` sets
    ``fairness_id`` (empty: the default flow).

    Raises:
        HttpError: 400 naming the header when its value does not parse.
    """
    changes: dict[str, Any] = {}
    sources: dict[str, str] | None = None
    for name, raw in headers:
        if name not in _HEADERS:
            continue
        header = name.decode("latin-1")
        text = raw.decode("latin-1").strip()
        if name == HEADER_OBJECTIVE:
            changes["priority"] = objective_priority(objectives or {}, text)
            continue
        if name == HEADER_FAIRNESS:
            changes["fairness_id"] = text or None
            continue
        if name == HEADER_LOCAL_UPDATES:
            lowered = text.lower()
            if lowered not in ("true", "false"):
                raise bad_request(
                    f"header {header} must be 'true' or 'false', got {text!r}", header
                )
            changes["enable_local_updates"] = lowered == "true"
            continue
        maximum = U32_MAX if name == HEADER_DP_RANK else U64_MAX
        if not text.isdigit() or int(text) > maximum:
            kind = "a data-parallel rank" if name == HEADER_DP_RANK else "a worker instance id"
            raise bad_request(
                f"header {header} must be {kind} (an unsigned integer), got {text!r}", header
            )
        value = int(text)
        if sources is None:
            sources = dict(nvext.sources)
        if name == HEADER_WORKER:
            changes["backend_instance_id"] = changes["decode_worker_id"] = value
            sources["backend_instance_id"] = sources["decode_worker_id"] = header
        elif name == HEADER_PREFILL:
            changes["prefill_worker_id"] = value
            sources["prefill_worker_id"] = header
        else:
            changes["dp_rank"] = value
    if not changes:
        return nvext
    if sources is not None:
        changes["sources"] = sources
    return attrs.evolve(nvext, **changes)


def worker_id_info(decision: RoutingDecision) -> dict[str, int]:
    """``WorkerIdInfo``: aggregated answers repeat the decode worker as the prefill worker."""
    prefill = decision.prefill_worker_id
    return {
        "prefill_worker_id": decision.decode_worker_id if prefill is None else prefill,
        "prefill_dp_rank": decision.prefill_dp_rank,
        "decode_worker_id": decision.decode_worker_id,
        "decode_dp_rank": decision.decode_dp_rank,
    }


def query_nvext(decision: RoutingDecision) -> dict[str, Any]:
    """The response ``nvext`` of a query-only request: the workers and the prompt's tokens."""
    return {"worker_id": worker_id_info(decision), "token_ids": list(decision.token_ids)}
