"""The Router actor: picks workers for each leg and books their load."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._errors import NoWorkersAvailable, PrefillFailed, RequestError
from ..engines import Engine
from ..wire import Leg, PreprocessedRequest, RoutingDecision, SelectionRecord
from ._load import LoadLedger
from ._messages import (
    Free,
    GetLoad,
    GetWorkers,
    PrefillComplete,
    Select,
    Selection,
    WorkersChanged,
)
from ._policies import SelectionPolicy, WorkerView
from ._runtime import Actor, ActorRef

#: Which routing-hint fields name the worker of each leg, in order of precedence.
PRESELECTION_FIELDS: Mapping[Leg, tuple[str, ...]] = {
    "prefill": ("prefill_worker_id",),
    "decode": ("decode_worker_id", "backend_instance_id"),
    "agg": ("backend_instance_id", "decode_worker_id"),
}


class RouterActor(Actor):
    """Owns worker selection and load bookkeeping.

    State (the load ledger, the policy's cursor or generator) is rebuilt on restart: workers
    from Discovery, bookings from each worker's snapshot of what it is serving.
    """

    name = "router"

    def __init__(
        self, policy: SelectionPolicy, discovery: ActorRef[Any], *, block_size: int
    ) -> None:
        self._policy = policy
        self._discovery = discovery
        self._ledger = LoadLedger(block_size)
        self._engines: Mapping[int, Engine] = {}
        self._prefill_pool: list[int] = []
        self._decode_pool: list[int] = []

    async def on_start(self) -> None:
        self._set_workers(await self._discovery.ask(GetWorkers()))
        snapshots = [await engine.snapshot() for engine in self._engines.values()]
        self._ledger.rebuild(snapshots)

    async def handle(self, message: Any) -> Any:
        kind = type(message)
        if kind is Select:
            return self._select(message)
        if kind is Free:
            self._ledger.free(message.request_id)
        elif kind is PrefillComplete:
            self._ledger.prefill_complete(message.request_id)
        elif kind is WorkersChanged:
            self._set_workers(message.workers)
        elif kind is GetLoad:
            return self._ledger.loads()
        else:
            raise TypeError(f"the router actor does not handle {message!r}")
        return None

    def _set_workers(self, engines: Mapping[int, Engine]) -> None:
        self._engines = engines
        self._prefill_pool = sorted(w for w, e in engines.items() if e.role == "prefill")
        self._decode_pool = sorted(w for w, e in engines.items() if e.role != "prefill")

    def _select(self, message: Select) -> Selection:
        request = message.request
        exclude = message.exclude
        selections: list[SelectionRecord] = []
        prefill: SelectionRecord | None = None
        disaggregated = message.disaggregated
        if disaggregated:
            pool = [w for w in self._prefill_pool if w not in exclude]
            prefill = self._choose("prefill", pool, request, exclude, required=False)
            if prefill is None:
                if message.enforce_disagg:
                    raise PrefillFailed(
                        "enforce_disagg=True, but no prefill worker is available"
                        + (f" (excluded: {sorted(exclude)})" if exclude else "")
                        + "; register a prefill worker or set enforce_disagg=False"
                    )
                disaggregated = False
            else:
                selections.append(prefill)
        leg: Leg = "decode" if disaggregated else "agg"
        pool = [w for w in self._decode_pool if w not in exclude]
        decode = self._choose(leg, pool, request, exclude, required=True)
        assert decode is not None
        selections.append(decode)
        hints = request.routing
        dp_rank = hints.dp_rank if hints is not None and hints.dp_rank is not None else 0
        decision = RoutingDecision(
            request_id=message.request_id,
            token_ids=request.token_ids,
            decode_worker_id=decode.chosen,
            prefill_worker_id=prefill.chosen if prefill is not None else decode.chosen,
            disaggregated=disaggregated,
            split_reason=message.split_reason
            if disaggregated == message.disaggregated
            else ("no prefill worker available; served aggregated"),
            decode_dp_rank=dp_rank,
            prefill_dp_rank=dp_rank,
            selections=tuple(selections),
        )
        if message.track:
            ledger = self._ledger
            ledger.free(message.request_id)
            prompt = len(request.token_ids)
            if prefill is not None:
                ledger.add(message.request_id, prefill.chosen, "prefill", prompt)
            ledger.add(message.request_id, decode.chosen, leg, prompt)
        return Selection(
            decision=decision,
            decode_engine=self._engines[decode.chosen],
            prefill_engine=self._engines[prefill.chosen] if prefill is not None else None,
        )

    def _choose(
        self,
        leg: Leg,
        pool: list[int],
        request: PreprocessedRequest,
        exclude: frozenset[int],
        *,
        required: bool,
    ) -> SelectionRecord | None:
        hints = request.routing
        if hints is not None:
            for field in PRESELECTION_FIELDS[leg]:
                worker_id = getattr(hints, field)
                if worker_id is not None:
                    return self._preselected(leg, field, worker_id, pool, exclude)
        if not pool:
            if not required:
                return None
            role = "prefill" if leg == "prefill" else "agg or decode"
            if exclude:
                raise NoWorkersAvailable(
                    f"every {role} worker is excluded for this request (their streams broke: "
                    f"{sorted(exclude)}) and no other is registered"
                )
            raise NoWorkersAvailable(f"no {role} worker is registered")
        ledger = self._ledger
        views = [WorkerView(w, ledger.load(w)) for w in pool]
        record = self._policy.choose(leg, views, request)
        if exclude:
            return _with_excluded(record, exclude)
        return record

    def _preselected(
        self, leg: Leg, field: str, worker_id: int, pool: list[int], exclude: frozenset[int]
    ) -> SelectionRecord:
        if worker_id not in pool:
            role = "prefill" if leg == "prefill" else "agg or decode"
            if worker_id in exclude:
                raise NoWorkersAvailable(
                    f"routing.{field}={worker_id} broke this request's stream before"
                )
            raise RequestError(
                f"routing.{field}={worker_id} is not a registered {role} worker; "
                f"registered: {pool}",
                field=field,
            )
        return SelectionRecord(
            leg=leg,
            policy="preselected",
            chosen=worker_id,
            reason=f"named by the request ({field})",
            inputs={"worker_id": worker_id, "field": field},
        )


def _with_excluded(record: SelectionRecord, exclude: frozenset[int]) -> SelectionRecord:
    import attrs

    return attrs.evolve(record, excluded=tuple(sorted(exclude)))
