"""The Router actor: picks workers for each leg and books their load."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from .._errors import (
    EngineError,
    InterlockError,
    NoWorkersAvailable,
    PrefillFailed,
    RequestError,
    SelectionPolicyError,
)
from ..engines import Engine, WorkerSnapshot
from ..kv import KV_EVENT_TYPES, WorkerOutOfSync
from ..wire import Leg, PreprocessedRequest, RoutingDecision, SelectionRecord
from ..wire._frames import SALT_VERSION
from ._adapters import (
    AdapterCandidates,
    Members,
    adapter_candidates,
    carries_salt,
    served_adapters,
    with_adapter,
)
from ._kv_policy import KvPolicy
from ._load import LoadLedger, WorkerLoad
from ._messages import (
    Free,
    GetKvBlocks,
    GetLoad,
    GetWorkers,
    GetWorkerStates,
    PrefillComplete,
    Select,
    Selection,
    StreamFailed,
    WorkersChanged,
    WorkersFull,
)
from ._outliers import OutlierEjector
from ._policies import SelectionPolicy, WorkerView
from ._runtime import Actor, ActorRef

_logger = logging.getLogger("interlock.router")

#: Which routing-hint fields name the worker of each leg, in order of precedence.
PRESELECTION_FIELDS: Mapping[Leg, tuple[str, ...]] = {
    "prefill": ("prefill_worker_id",),
    "decode": ("decode_worker_id", "backend_instance_id"),
    "agg": ("backend_instance_id", "decode_worker_id"),
}


#: An engine that reports its own queue (an OpenAI-compatible server's /metrics) counts as
#: full from this many waiting requests (llm-d's saturation detector uses 5 too) ...
SATURATED_WAITING = 5
#: ... or from this KV cache usage (llm-d: 0.8; vLLM counts cached blocks nobody uses as free,
#: so usage this high means running sequences are about to be preempted).
SATURATED_KV_USAGE = 0.95


@attrs.frozen(kw_only=True)
class RouterLimits:
    """The Router's admission and ejection settings (from `PipelineConfig`)."""

    #: Requests in flight per worker at most; None: the worker's reported ``max_num_seqs``;
    #: 0: no limit.
    max_inflight_per_worker: int | None = None
    outlier_ejection_time: float = 30.0
    outlier_failures: int = 5


@attrs.frozen
class _KvEventArrived:
    event: Any


class RouterActor(Actor):
    """Owns worker selection and load bookkeeping.

    State (the load ledger, the policy's cursor or generator, the KV index) is rebuilt on
    restart: workers from Discovery, bookings and cached blocks from each worker's snapshot.
    Under the ``kv`` policy (any `KvPolicy`, subclasses included) it listens to every
    worker's KV events; a gap in a worker's events, or a worker that (re)joins, is repaired by
    loading that worker's dump.

    Every record a policy returns is checked (a `SelectionRecord` for the leg asked, choosing
    one of the candidates); one that is not fails its request with `SelectionPolicyError`.
    ``custom`` marks the application's own policy (``Components.selection_policy``): an
    exception from its ``choose`` also fails only that request (as `SelectionPolicyError`;
    an `InterlockError` such as `NoWorkersAvailable` passes as is) instead of crashing the
    router. A built-in policy that raises is a bug in interlock, and crashing lets the
    supervisor restart the router with fresh state.
    """

    name = "router"

    def __init__(
        self,
        policy: SelectionPolicy,
        discovery: ActorRef[Any],
        *,
        block_size: int,
        custom: bool = False,
        limits: RouterLimits | None = None,
    ) -> None:
        limits = limits if limits is not None else RouterLimits()
        self._max_inflight = limits.max_inflight_per_worker
        self._outliers = OutlierEjector(limits.outlier_ejection_time, limits.outlier_failures)
        self._policy = policy
        self._custom = custom
        self._discovery = discovery
        self._ledger = LoadLedger(block_size)
        self._engines: Mapping[int, Engine] = {}
        self._prefill_pool: list[int] = []
        self._decode_pool: list[int] = []
        self._kv = policy if isinstance(policy, KvPolicy) else None
        self._listening: dict[int, tuple[Engine, Callable[[], None]]] = {}
        self._stale: set[int] = set()

    async def on_start(self) -> None:
        self._set_workers(await self._discovery.ask(GetWorkers()))
        snapshots = []
        for engine in self._engines.values():
            snapshot = await _snapshot_or_none(engine)
            if snapshot is not None:
                snapshots.append(snapshot)
        self._ledger.rebuild(snapshots)
        if self._kv is not None:
            self._kv.rebuild(snapshots)
            self._stale.clear()

    def on_stop(self) -> None:
        for _engine, remove in self._listening.values():
            remove()
        self._listening.clear()

    async def handle(self, message: Any) -> Any:
        kind = type(message)
        if kind is Select:
            return self._select(message)
        if kind is Free:
            self._ledger.free(message.request_id)
        elif kind is PrefillComplete:
            self._ledger.prefill_complete(message.request_id)
        elif kind is _KvEventArrived:
            await self._apply_kv_event(message.event)
        elif kind is WorkersChanged:
            self._set_workers(message.workers)
            await self._resync_stale()
        elif kind is StreamFailed:
            self._stream_failed(message)
        elif kind is GetWorkerStates:
            return self._outliers.ejected(trio.current_time())
        elif kind is GetLoad:
            return self._ledger.loads()
        elif kind is GetKvBlocks:
            index = self._kv.index if self._kv is not None else None
            if index is None:
                return {}
            return {w: index.blocks_of(w) for w in sorted(index.workers)}
        else:
            raise TypeError(f"the router actor does not handle {message!r}")
        return None

    def _stream_failed(self, message: StreamFailed) -> None:
        if message.worker_id not in self._engines:
            return
        duration = self._outliers.failed(
            message.worker_id, trio.current_time(), stalled=message.stalled
        )
        if duration is not None:
            why = "stalled a stream" if message.stalled else "broke streams"
            _logger.warning(
                "worker %d %s: left out of routing for %.0f s", message.worker_id, why, duration
            )

    def _set_workers(self, engines: Mapping[int, Engine]) -> None:
        if self._outliers.has_records:
            now = trio.current_time()
            for worker_id in self._outliers.known():
                if worker_id not in engines:
                    # Gone: if it comes back after its ejection, it starts with a clean slate.
                    self._outliers.forget(worker_id, now)
        self._engines = engines
        self._prefill_pool = sorted(w for w, e in engines.items() if e.role == "prefill")
        self._decode_pool = sorted(w for w, e in engines.items() if e.role != "prefill")
        kv = self._kv
        if kv is None:
            return
        for worker_id in list(self._listening):
            engine, remove = self._listening[worker_id]
            if engines.get(worker_id) is not engine:
                # Gone (crashed, drained, removed): its cache is no longer routable.
                remove()
                del self._listening[worker_id]
                kv.forget_worker(worker_id)
        ref = self.ref
        for worker_id, engine in engines.items():
            if worker_id in self._listening:
                continue

            def deliver(event: Any, _ref: Any = ref) -> None:
                if isinstance(event, KV_EVENT_TYPES):
                    _ref.send_nowait(_KvEventArrived(event))

            self._listening[worker_id] = (engine, engine.add_listener(deliver))
            # New to this router (or back after a crash): start from its dump.
            self._stale.add(worker_id)

    async def _resync_stale(self) -> None:
        while self._stale:
            worker_id = self._stale.pop()
            engine = self._engines.get(worker_id)
            if engine is None or self._kv is None:
                continue
            snapshot = await _snapshot_or_none(engine)
            if snapshot is not None:
                self._kv.load_snapshot(snapshot)

    async def _apply_kv_event(self, event: Any) -> None:
        kv = self._kv
        if kv is None or event.worker_id not in self._listening:
            return
        try:
            kv.apply(event)
        except WorkerOutOfSync as exc:
            self._stale.add(exc.worker_id)
            await self._resync_stale()

    def _select(self, message: Select) -> Selection:
        request = message.request
        exclude = message.exclude
        selections: list[SelectionRecord] = []
        prefill: SelectionRecord | None = None
        disaggregated = message.disaggregated
        # The request's model is a LoRA adapter, or None for the base model: decided where
        # the request entered, never here from who serves what now (an adapter whose engines
        # all left must not become a base-model request).
        adapter = request.model
        if disaggregated:
            pool, served = self._leg_pool("prefill", message)
            prefill = self._choose(
                "prefill",
                pool,
                request,
                exclude,
                required=False,
                admit=message.admit,
                adapter=served,
                reserved=message.reserved,
                members=message.members,
            )
            if prefill is None:
                if message.enforce_disagg:
                    raise PrefillFailed(
                        "enforce_disagg=True, but no prefill worker is available"
                        + (f" that serves the LoRA adapter {adapter!r}" if adapter else "")
                        + (f" (excluded: {sorted(exclude)})" if exclude else "")
                        + "; register a prefill worker or set enforce_disagg=False"
                    )
                disaggregated = False
            else:
                selections.append(prefill)
        leg: Leg = "decode" if disaggregated else "agg"
        pool, served = self._leg_pool(leg, message)
        decode = self._choose(
            leg,
            pool,
            request,
            exclude,
            required=True,
            admit=message.admit,
            adapter=served,
            reserved=message.reserved,
            members=message.members,
        )
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
            block_size = ledger.block_size
            if prefill is not None:
                ledger.add(
                    message.request_id,
                    prefill.chosen,
                    "prefill",
                    prompt,
                    _cached_blocks(prefill) * block_size,
                )
            ledger.add(
                message.request_id, decode.chosen, leg, prompt, _cached_blocks(decode) * block_size
            )
            if self._kv is not None:
                # Approximate mode learns where prompts went (exact mode ignores this).
                self._kv.routed(prefill.chosen if prefill is not None else decode.chosen, request)
        return Selection(
            decision=decision,
            decode_engine=self._engines[decode.chosen],
            prefill_engine=self._engines[prefill.chosen] if prefill is not None else None,
            # Asked only from the queue: a scan of every worker is cheaper than the ask it
            # spares the next waiter when none has room.
            room_left=not (message.admit and message.queued)
            or not all(self._full(w) for w in self._engines),
        )

    def _leg_pool(self, leg: Leg, message: Select) -> tuple[list[int], AdapterCandidates | None]:
        """The workers ``leg`` of ``message``'s request may go to, and for an adapter's
        request each one's tier: the leg's registered workers outside the request's
        exclusions, within its candidates, that can carry its cache_salt and serve its LoRA
        adapter. For the prefill leg possibly none (the request is then served aggregated).

        Raises:
            NoWorkersAvailable: the agg or decode leg, when a filter leaves none (a salted
                request that names its worker hears from `_preselected` why that one cannot
                take it).
        """
        request = message.request
        exclude = message.exclude
        candidates = message.candidates
        prefill = leg == "prefill"
        pool = [
            w for w in (self._prefill_pool if prefill else self._decode_pool) if w not in exclude
        ]
        if candidates is not None:
            pool = [w for w in pool if w in candidates]
            if not pool and not prefill:
                raise NoWorkersAvailable(
                    f"none of the workers this request may go to ({sorted(candidates)}) is a "
                    "registered agg or decode worker"
                    + (f" outside those excluded ({sorted(exclude)})" if exclude else "")
                )
        if request.cache_salt is not None:
            salted = [w for w in pool if carries_salt(self._engines.get(w))]
            if pool and not salted and not prefill and _named_worker(request, leg) is None:
                raise NoWorkersAvailable(
                    f"this request has a cache_salt, which no agg or decode worker it may go to "
                    f"({pool}) can carry: they speak protocol versions before {SALT_VERSION}; "
                    "upgrade a worker, or send the request without cache_salt"
                )
            pool = salted
        adapter = request.model
        if adapter is None:
            return pool, None
        served = adapter_candidates(adapter, pool, self._engines)
        if not served.serving and not prefill:
            raise NoWorkersAvailable(
                f"no agg or decode worker this request may go to ({pool}) serves the LoRA "
                f"adapter {adapter!r} it names"
            )
        return served.serving, served

    def _choose(
        self,
        leg: Leg,
        pool: list[int],
        request: PreprocessedRequest,
        exclude: frozenset[int],
        *,
        required: bool,
        admit: bool = False,
        adapter: AdapterCandidates | None = None,
        reserved: frozenset[int] = frozenset(),
        members: Members | None = None,
    ) -> SelectionRecord | None:
        named = _named_worker(request, leg)
        if named is not None:
            field, worker_id = named
            return self._preselected(
                leg, field, worker_id, pool, exclude, adapter, request.cache_salt
            )
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
        # Before the ejection filter: the admission queue holds these for a waiter refused
        # here, so a waiter behind must not take an ejected one when its ejection ends (the
        # refusal says when: the queue wakes the waiters of that worker then).
        candidates = pool  # the list itself: a set is made only on the rare paths below
        outliers = self._outliers
        if outliers.has_records:
            now = trio.current_time()
            healthy = [w for w in pool if not outliers.is_ejected(w, now)]
            if healthy:
                pool = healthy
            elif reserved:
                # Every candidate is ejected: better one of them than no answer (Envoy's
                # panic mode, at 0 % healthy). A waiter ahead holds an ejected worker only
                # for when its ejection ends; this request may use it now.
                reserved = reserved.difference(candidates)
        if admit:
            # A reserved worker is held for a request that waits ahead of this one: full. So
            # is one that joined, or changed the adapters it serves, after the reservation
            # was worked out (``members``): the waiters ahead were not asked about it. Read
            # last, so only a worker with room pays for the comparison.
            engines = self._engines
            room = [
                w
                for w in pool
                if w not in reserved
                and not self._full(w)
                and (members is None or members.get(w) == served_adapters(engines.get(w)))
            ]
            if not room:
                raise WorkersFull(
                    f"every {leg} candidate {pool} is at its in-flight limit",
                    blocked_on=frozenset(candidates),
                    returns=(
                        outliers.returns(candidates, trio.current_time())
                        if outliers.has_records
                        else None
                    ),
                )
            pool = room
        if adapter is not None:
            # The LoRA tiers last: a full or ejected engine where the adapter runs yields to
            # one with room to load it, as llm-d's weighted scores would.
            pool = adapter.best(pool)
        views = [WorkerView(w, self._load(w)) for w in pool]
        record = self._consult(leg, views, request, pool, exclude)
        if adapter is not None:
            record = with_adapter(record, adapter, pool)
        if exclude:
            return _with_excluded(record, exclude)
        return record

    def _full(self, worker_id: int) -> bool:
        """Whether ``worker_id`` is at its in-flight limit: the requests booked on it reached
        ``max_inflight_per_worker`` (or the ``slots`` the worker reports), or, for an engine
        that reports only its queue, it reports a queue or a KV cache near full."""
        limit = self._max_inflight
        engine = self._engines.get(worker_id)
        if limit is None:
            limit = getattr(engine, "slots", None)
        if limit:
            return self._ledger.load(worker_id).active_requests >= limit
        if limit == 0:
            return False
        metrics = getattr(engine, "metrics", None)
        if metrics is None:
            return False
        waiting = metrics.requests_waiting
        usage = metrics.kv_usage
        return (waiting is not None and waiting >= SATURATED_WAITING) or (
            usage is not None and usage >= SATURATED_KV_USAGE
        )

    def _load(self, worker_id: int) -> WorkerLoad:
        """The load the ledger booked on ``worker_id``, raised to what the engine itself last
        reported (an `OpenAIEngine`'s ``reported_load``, from its /metrics) when that is more:
        requests another frontend or a direct client sent it count too."""
        booked = self._ledger.load(worker_id)
        reported = getattr(self._engines.get(worker_id), "reported_load", None)
        if reported is None:
            return booked
        requests, blocks = reported
        if requests <= booked.active_requests and blocks <= booked.active_blocks:
            return booked
        return WorkerLoad(
            active_requests=max(requests, booked.active_requests),
            prefill_tokens=booked.prefill_tokens,
            active_blocks=max(blocks, booked.active_blocks),
        )

    def _consult(
        self,
        leg: Leg,
        views: list[WorkerView],
        request: PreprocessedRequest,
        pool: list[int],
        exclude: frozenset[int],
    ) -> SelectionRecord:
        """The policy's record for ``leg``, checked.

        Raises:
            SelectionPolicyError: the record is not a usable choice among ``pool``, or a
                custom policy raised.
        """
        policy = self._policy
        name = policy.name
        if self._custom:
            try:
                record = policy.choose(leg, views, request)
            except InterlockError:
                raise  # a refusal on purpose (NoWorkersAvailable, say) reaches the asker as is
            except Exception as exc:
                # The application's code, not interlock's: fail the request that hit it and
                # keep serving, rather than restart the router (and its KV index) for it.
                raise SelectionPolicyError(
                    f"selection policy {name!r} raised {type(exc).__name__}: {exc} (choosing "
                    f"the {leg} leg among workers {pool}); this request fails, the router "
                    "carries on",
                    policy=name,
                    leg=leg,
                    candidates=tuple(pool),
                ) from exc
        else:
            record = policy.choose(leg, views, request)
        if not isinstance(record, SelectionRecord):
            raise SelectionPolicyError(
                f"selection policy {name!r} returned {type(record).__name__}, not a "
                f"SelectionRecord, for the {leg} leg; choose must return "
                "SelectionRecord(leg=leg, policy=..., chosen=<a candidate's worker_id>, ...)",
                policy=name,
                leg=leg,
                candidates=tuple(pool),
            )
        if record.leg != leg:
            raise SelectionPolicyError(
                f"selection policy {name!r} returned a record for the {record.leg!r} leg when "
                f"asked for the {leg!r} leg; set SelectionRecord.leg to the leg it is given",
                policy=name,
                leg=leg,
                candidates=tuple(pool),
            )
        chosen = record.chosen
        # bool is an int, but True is no worker id.
        if type(chosen) is not int or chosen not in pool:
            why = (
                "excluded for this request (its stream broke there)"
                if type(chosen) is int and chosen in exclude
                else "not among its candidates"
            )
            raise SelectionPolicyError(
                f"selection policy {name!r} chose worker {chosen!r} for the {leg} leg, which "
                f"is {why}; the candidates were {pool}",
                policy=name,
                leg=leg,
                candidates=tuple(pool),
            )
        return record

    def _preselected(
        self,
        leg: Leg,
        field: str,
        worker_id: int,
        pool: list[int],
        exclude: frozenset[int],
        adapter: AdapterCandidates | None = None,
        cache_salt: str | None = None,
    ) -> SelectionRecord:
        if worker_id not in pool:
            role = "prefill" if leg == "prefill" else "agg or decode"
            if worker_id in exclude:
                raise NoWorkersAvailable(
                    f"routing.{field}={worker_id} broke this request's stream before"
                )
            engine = self._engines.get(worker_id)
            if cache_salt is not None and engine is not None and not carries_salt(engine):
                # Registered, but too old for the salt the request carries.
                raise RequestError(
                    f"routing.{field}={worker_id} speaks protocol version "
                    f"{getattr(engine, 'protocol_version', None)}, which cannot carry this "
                    "request's cache_salt "
                    f"(version {SALT_VERSION} can); name another worker, or send the request "
                    "without cache_salt",
                    field=field,
                )
            if adapter is not None and engine is not None and _serves_leg(engine, leg):
                # Registered for this leg: the adapter narrowed the pool, and is the reason.
                raise RequestError(
                    f"routing.{field}={worker_id} does not serve the LoRA adapter "
                    f"{adapter.adapter!r} this request names; the {role} workers serving it: "
                    f"{adapter.serving}",
                    field=field,
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


def _named_worker(request: PreprocessedRequest, leg: Leg) -> tuple[str, int] | None:
    """The worker ``request``'s routing hints name for ``leg`` and the field naming it (the
    first of the leg's `PRESELECTION_FIELDS` set), or None when they name none."""
    hints = request.routing
    if hints is None:
        return None
    for field in PRESELECTION_FIELDS[leg]:
        worker_id = getattr(hints, field)
        if worker_id is not None:
            return field, worker_id
    return None


def _serves_leg(engine: Engine, leg: Leg) -> bool:
    """Whether ``engine``'s role takes ``leg`` (a prefill engine the prefill leg, others the
    rest)."""
    return (engine.role == "prefill") == (leg == "prefill")


async def _snapshot_or_none(engine: Engine) -> WorkerSnapshot | None:
    """A worker's snapshot, or None when it cannot give one now (its connection dropped): it
    is read again when it rejoins, so the router need not crash over it."""
    try:
        return await engine.snapshot()
    except EngineError:
        return None


def _cached_blocks(record: SelectionRecord) -> int:
    """The chosen worker's prefix overlap, as its policy saw it (0 for policies that do not
    look at caches)."""
    for candidate in record.candidates:
        if candidate.worker_id == record.chosen:
            return candidate.overlap_blocks
    return 0


def _with_excluded(record: SelectionRecord, exclude: frozenset[int]) -> SelectionRecord:
    return attrs.evolve(record, excluded=tuple(sorted(exclude)))
