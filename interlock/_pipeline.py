"""`build_pipeline` and `Pipeline`: requests in, routed and executed under their mode's graph."""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any, cast

import attrs
import trio
from opentelemetry.trace import TracerProvider

from ._admission import DEFAULT_FLOW, AdmissionQueue, default_queue_limit
from ._config import KV_ROUTER_MODES, PipelineConfig
from ._errors import (
    ActorCrashed,
    ConfigError,
    EngineError,
    InterlockError,
    PipelineClosed,
    RequestError,
    WorkerGone,
    WorkerRefused,
    WorkerStalled,
)
from ._stalls import StallWatch, WatchedLeg
from ._tracing import RequestTracing
from .actors import (
    FALL_BACK,
    DirectPolicy,
    DisaggOrchestrator,
    DiscoveryActor,
    Free,
    GetKvBlocks,
    GetLoad,
    GetWorkers,
    GetWorkerStates,
    KvPolicy,
    MigrationActor,
    MigrationPlan,
    PrefillComplete,
    PrefillLegFailed,
    RandomPolicy,
    RestartPolicy,
    RoundRobinPolicy,
    Route,
    RouterActor,
    RouterLimits,
    Select,
    Selection,
    SelectionPolicy,
    StreamBroke,
    StreamFailed,
    Supervisor,
    WorkerLoad,
    WorkersFull,
)
from .actors._adapters import served_by
from .actors._runtime import ActorRef
from .discovery import EmbeddedRegistry
from .engines import Engine
from .processing import Tokenizer
from .processing._postprocessor import Postprocessor, engine_leg_request
from .statemachines import (
    JsonlSink,
    MemoryLog,
    Mode,
    RequestFsm,
    State,
    TransitionLog,
    TransitionRecord,
    TransitionSink,
    Trigger,
    mode_for,
)
from .wire import (
    EngineOutput,
    PrefillResult,
    PreprocessedRequest,
    RoutingDecision,
    RoutingHints,
    Usage,
)

#: Seconds an engine may keep the outputs of a stream whose caller needs only the whole
#: answer (``generate(..., progress=False)``) before it sends them, joined: a non-streamed
#: answer then costs the frontend a few outputs, not one per token.
HOLD_OUTPUTS = 0.5

#: The records of a request `Pipeline.query` answered (preprocess, route, answer): a note
#: after its end (`Pipeline.record_usage`) takes the next sequence number.
_QUERY_RECORDS = 3


def _engines(engines: Iterable[Engine]) -> tuple[Engine, ...]:
    return tuple(engines)


def _sinks(sinks: Iterable[TransitionSink]) -> tuple[TransitionSink, ...]:
    return tuple(sinks)


#: Makes the Router's selection policy from the pipeline's configuration (see
#: `Components.selection_policy`).
SelectionPolicyFactory = Callable[[PipelineConfig], SelectionPolicy]


@attrs.frozen(kw_only=True)
class Components:
    """The parts a pipeline is built from. The pipeline takes ownership: it runs each engine
    in its own nursery and stops it when it closes.

    ``workers`` serve aggregated requests and decode legs (role ``agg`` or ``decode``);
    ``prefill_workers`` serve prefill legs (role ``prefill``). ``tokenizer`` turns generated
    tokens into text under frontend postprocessing (requests with ``detokenize=True``).
    ``transition_sinks`` receive every transition record besides the in-memory log.

    ``selection_policy`` is your own way of choosing workers: a factory called with the
    pipeline's configuration each time the Router actor starts (a router restarted by its
    supervisor gets a fresh policy, as the built-in ones are rebuilt; so a policy keeps no
    state it cannot lose, or rebuilds it). Its policy chooses every leg the router selects, in
    place of the one ``router_mode`` names; legs the request names a worker for stay
    preselected. A policy that raises or chooses a worker outside its candidates fails only
    that request (`SelectionPolicyError`). A `KvPolicy` (or subclass) is fed the workers' KV
    events like the built-in ``kv`` policy. The factory's own exceptions, or a return value
    that is not a `SelectionPolicy`, stop the pipeline as it starts (its ``async with`` raises
    them); on a restart they count as one more crash of the router.
    """

    workers: Sequence[Engine] = attrs.field(default=(), converter=_engines)
    prefill_workers: Sequence[Engine] = attrs.field(default=(), converter=_engines)
    tokenizer: Tokenizer | None = None
    transition_sinks: Sequence[TransitionSink] = attrs.field(default=(), converter=_sinks)
    selection_policy: SelectionPolicyFactory | None = None
    #: Where the pipeline's spans go (`RequestTracing`): None uses OpenTelemetry's global
    #: tracer provider, a no-op until an SDK is configured.
    tracer_provider: TracerProvider | None = None


@attrs.define
class PipelineStats:
    """Counters since the pipeline opened."""

    requests: int = 0
    queries: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    disaggregated: int = 0
    migrations: int = 0
    fallbacks: int = 0
    #: Streams that made no progress within first_token_timeout / engine_idle_timeout.
    stalls: int = 0


def build_pipeline(
    config: PipelineConfig, components: Components | None = None
) -> AbstractAsyncContextManager[Pipeline]:
    """Check ``config`` and ``components`` now; return the context that runs the pipeline.

    Entering starts the engines and the supervised actors (Discovery, Router,
    DisaggOrchestrator, Migration when enabled); leaving cancels them, breaking any stream
    still open.

    Raises:
        ConfigError: an invalid combination of knobs, or components that do not fit them
            (raised by this call, before anything starts).
    """
    config.validate()
    parts = components if components is not None else Components()
    _check_components(config, parts)
    return _open_pipeline(config, parts)


def _check_components(config: PipelineConfig, components: Components) -> None:
    if components.selection_policy is not None:
        check_selection_policy(config, components.selection_policy)
    seen: dict[int, str] = {}
    for group, engines, allowed in (
        ("workers", components.workers, ("agg", "decode")),
        ("prefill_workers", components.prefill_workers, ("prefill",)),
    ):
        for index, engine in enumerate(engines):
            where = f"Components.{group}[{index}]"
            if not isinstance(engine, Engine):
                raise ConfigError(
                    f"{where} is a {type(engine).__name__}, not an Engine (it needs "
                    "instance_id, role, run, open_stream, add_listener and snapshot)",
                    knobs=(group,),
                )
            if engine.role not in allowed:
                raise ConfigError(
                    f"{where} has role {engine.role!r}; {group} take role "
                    + " or ".join(map(repr, allowed)),
                    knobs=(group,),
                )
            if engine.instance_id in seen:
                raise ConfigError(
                    f"{where} has instance_id {engine.instance_id}, already used by "
                    f"{seen[engine.instance_id]}; every worker needs its own id",
                    knobs=(group,),
                )
            seen[engine.instance_id] = where
            _check_engine(config, engine, where, group)


def _check_engine(config: PipelineConfig, engine: Engine, where: str, group: str) -> None:
    block_size = getattr(engine, "block_size", config.kv_block_size)
    if config.router_mode in KV_ROUTER_MODES and block_size != config.kv_block_size:
        raise ConfigError(
            f"{where} pages its KV cache in blocks of {block_size} tokens but "
            f"kv_block_size={config.kv_block_size}: no prefix would ever match; set "
            f"kv_block_size={block_size} (or give the engines blocks of "
            f"{config.kv_block_size})",
            knobs=("kv_block_size", group),
        )


def check_selection_policy(config: PipelineConfig, factory: object) -> None:
    """Check that ``factory`` can be ``Components.selection_policy`` under ``config``.

    Raises:
        ConfigError: it is not callable (a policy instead of a factory, say), or ``config``
            leaves it nothing to choose (``routing='direct_to_known'``, ``router_mode='direct'``).
    """
    if not callable(factory):
        raise ConfigError(
            f"Components.selection_policy is a {type(factory).__name__}, not a factory: pass "
            "a callable that takes the PipelineConfig and returns a new policy (e.g. "
            "selection_policy=lambda config: MyPolicy()), so that a restarted router gets a "
            "fresh one",
            knobs=("selection_policy",),
        )
    if config.routing == "direct_to_known":
        raise ConfigError(
            "Components.selection_policy with routing='direct_to_known': every request names "
            "its workers, so every leg is preselected and the policy would never be consulted; "
            "remove selection_policy, or set routing='discover' (or 'query_only') to let it "
            "choose",
            knobs=("routing", "selection_policy"),
        )
    if config.router_mode == "direct":
        raise ConfigError(
            f"Components.selection_policy with router_mode='direct': direct sends every "
            f"request to direct_worker_id={config.direct_worker_id}, a fixed worker the policy "
            "would silently override; remove router_mode='direct' and direct_worker_id to let "
            "the policy choose, or remove selection_policy",
            knobs=("router_mode", "selection_policy"),
        )


def _make_policy(
    config: PipelineConfig, factory: SelectionPolicyFactory | None = None
) -> SelectionPolicy:
    if factory is not None:
        policy = factory(config)
        if not isinstance(getattr(policy, "name", None), str) or not callable(
            getattr(policy, "choose", None)
        ):
            # Raised as the router starts: the pipeline stops with it, as with any factory
            # error, since no request could be routed.
            raise TypeError(
                f"Components.selection_policy returned {policy!r}, which is not a "
                "SelectionPolicy: it needs a str attribute name and a method "
                "choose(leg, candidates, request) returning a SelectionRecord"
            )
        return policy
    mode = config.effective_router_mode
    if mode == "random":
        return RandomPolicy(config.router_seed)
    if mode == "direct":
        assert config.direct_worker_id is not None
        return DirectPolicy(config.direct_worker_id)
    if mode in KV_ROUTER_MODES:
        return KvPolicy(config)
    # round_robin; direct_from_request never consults its policy (every leg is preselected).
    return RoundRobinPolicy()


@asynccontextmanager
async def _open_pipeline(config: PipelineConfig, components: Components) -> AsyncIterator[Pipeline]:
    mode = mode_for(config.routing, config.migration_limit, config.enforce_disagg)
    memory = MemoryLog(config.transition_log_capacity, config.transition_log_memory_bytes)
    sinks: list[TransitionSink] = list(components.transition_sinks)
    jsonl = (
        JsonlSink(
            config.transition_log_path,
            max_bytes=config.transition_log_max_bytes,
            backups=config.transition_log_backups,
        )
        if config.transition_log_path
        else None
    )
    if jsonl is not None:
        sinks.append(jsonl)
    registry = EmbeddedRegistry()
    tracing = RequestTracing(components.tracer_provider, engine_of=registry.get)
    sinks.append(tracing)
    log = TransitionLog(memory, sinks)
    policy = RestartPolicy(
        max_restarts=config.actor_max_restarts,
        window=config.actor_restart_window,
        backoff=config.actor_restart_backoff,
    )
    try:
        async with trio.open_nursery() as nursery:
            if jsonl is not None:
                await nursery.start(jsonl.serve)
            engine_scopes: dict[int, trio.CancelScope] = {}
            for engine in (*components.workers, *components.prefill_workers):
                await nursery.start(_run_engine, engine, engine_scopes)
                registry.register(engine)
            supervisor = Supervisor(nursery, policy)
            subscribers: list[ActorRef[Any]] = []
            discovery = supervisor.start_actor(
                lambda: DiscoveryActor(registry, subscribers), "discovery"
            )
            custom = components.selection_policy
            # The factory runs on every (re)start of the router: fresh policy, fresh state.
            router = supervisor.start_actor(
                lambda: RouterActor(
                    _make_policy(config, custom),
                    discovery,
                    block_size=config.kv_block_size,
                    custom=custom is not None,
                    limits=RouterLimits(
                        max_inflight_per_worker=config.max_inflight_per_worker,
                        outlier_ejection_time=config.outlier_ejection_time,
                        outlier_failures=config.outlier_failures,
                    ),
                ),
                "router",
            )
            disagg = supervisor.start_actor(
                lambda: DisaggOrchestrator(
                    mode, enforce_disagg=config.enforce_disagg, discovery=discovery, router=router
                ),
                "disagg",
            )
            subscribers += [router, disagg]
            migration = None
            if mode.migration:
                migration = supervisor.start_actor(
                    lambda: MigrationActor(config.migration_limit, config.migration_max_seq_len),
                    "migration",
                )
            pipeline = Pipeline(
                config=config,
                tokenizer=components.tokenizer,
                mode=mode,
                log=log,
                memory=memory,
                registry=registry,
                supervisor=supervisor,
                nursery=nursery,
                engine_scopes=engine_scopes,
                actors={"discovery": discovery, "router": router, "disagg": disagg}
                | ({"migration": migration} if migration is not None else {}),
                tracing=tracing,
            )
            try:
                yield pipeline
            finally:
                pipeline._closed = True
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's own exception (or the one error that brought the pipeline down, such
        # as an actor's after its supervisor gave up) arrives as itself, not wrapped.
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from None
        raise


async def _run_engine(
    engine: Engine, scopes: dict[int, trio.CancelScope], *, task_status: trio.TaskStatus[None]
) -> None:
    # The scope lets `Pipeline.remove_worker(..., stop=True)` stop this engine alone.
    scope = trio.CancelScope()
    scopes[engine.instance_id] = scope
    try:
        with scope:
            await engine.run(task_status=task_status)
    finally:
        if scopes.get(engine.instance_id) is scope:
            del scopes[engine.instance_id]


class Pipeline:
    """A running pipeline. Get one from `build_pipeline`; use it from any task.

    Requests never share mutable state: each `generate` or `query` call owns its request's
    state machine and talks to the actors.
    """

    def __init__(
        self,
        *,
        config: PipelineConfig,
        tokenizer: Tokenizer | None,
        mode: Mode,
        log: TransitionLog,
        memory: MemoryLog,
        registry: EmbeddedRegistry,
        supervisor: Supervisor,
        nursery: trio.Nursery,
        actors: dict[str, ActorRef[Any]],
        engine_scopes: dict[int, trio.CancelScope] | None = None,
        tracing: RequestTracing | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.mode = mode
        self.stats = PipelineStats()
        self.supervisor = supervisor
        #: Refs of the running actors by name (for fault injection: ``crash_nowait``).
        self.actors = actors
        self._log = log
        self._memory = memory
        self._registry = registry
        self._nursery = nursery
        self._engine_scopes = engine_scopes if engine_scopes is not None else {}
        self._router = actors["router"]
        self._disagg = actors["disagg"]
        self._migration = actors.get("migration")
        self._in_flight: set[str] = set()
        self._ids = itertools.count()
        self._closed = False
        self._frontend_post = config.postprocessing == "frontend"
        self._first_token_timeout = config.first_token_timeout
        self._idle_timeout = config.engine_idle_timeout
        #: How long an engine may keep a ``progress=False`` stream's outputs (`generate`).
        self._hold = (
            HOLD_OUTPUTS
            if config.engine_idle_timeout is None
            else min(HOLD_OUTPUTS, config.engine_idle_timeout / 4)
        )
        #: The deadlines of the legs whose streams can be interrupted (`StallWatch`).
        self._stalls = StallWatch(nursery, self._stall_error)
        self._admission = AdmissionQueue(lambda: served_by(registry.snapshot()))
        #: Per request id a gateway's booked `query` answered and has not freed: its decode
        #: worker and, until `mark_prefill_complete`, its prefill worker (disaggregated), so
        #: its end wakes the waiters of those workers only (kept under admission control
        #: only: nobody waits otherwise).
        self._bookings: dict[str, tuple[int, int | None]] = {}
        #: Request ids whose Route or Select (`_route`) was cancelled on its way: the router
        #: books it where it arrives, so the request's end must free it behind the message
        #: and wake the waiters of any worker. One that gave up before asking booked nothing.
        self._unanswered: set[str] = set()
        self._admit = config.max_inflight_per_worker != 0
        #: The OpenTelemetry sink of this pipeline's transitions (`RequestTracing`).
        self.tracing = tracing if tracing is not None else RequestTracing()
        #: Called with (request_id, seconds) when a request leaves the admission queue with a
        #: worker slot (seconds: from asking for one to getting it; near 0 when there was
        #: room). `build_app` adds its `HttpMetrics`; never block or raise in one.
        self.queue_time_observers: list[Callable[[str, float], None]] = [self.tracing.queued]
        registry.watch(self._membership_changed)
        if self._admit:
            # The queue's RECHECK timer, for the pipeline's life (idle while nobody waits).
            nursery.start_soon(self._admission.recheck)

    # -- public surface ---------------------------------------------------------------------

    @property
    def transition_log(self) -> MemoryLog:
        """Every request's transition records (the newest, within ``transition_log_capacity``
        records and ``transition_log_memory_bytes``)."""
        return self._memory

    @property
    def in_flight(self) -> int:
        """Requests started and not yet ended."""
        return len(self._in_flight)

    @property
    def workers(self) -> dict[int, Engine]:
        """The registered workers now, by id (see `membership_settled` for when the router
        agrees)."""
        return dict(self._registry.snapshot())

    def watch_workers(self, watcher: Callable[[Mapping[int, Engine]], None]) -> Callable[[], None]:
        """Call ``watcher(workers)`` (the routable workers, by id, as `workers` gives them)
        after every membership change, in the task that made it; never block or raise in
        one. A change is a worker joining, leaving routing (away: `engine` still has it),
        coming back, removed for good (`engine` gives None), routable or away when it
        goes, or changing what it serves (its LoRA adapters: `WorkerChanged`; the same
        workers). Returns a function that stops the calls."""
        return self._registry.watch(watcher)

    async def add_worker(self, engine: Engine) -> None:
        """Start ``engine`` in the pipeline's nursery and make it routable.

        Returns once the actors know it: the next request may go there.

        Raises:
            ValueError: its instance id is taken.
        """
        self._ensure_open()
        if engine.instance_id in self._registry.snapshot():
            raise ValueError(f"worker id {engine.instance_id} is already registered")
        group = "prefill_workers" if engine.role == "prefill" else "workers"
        _check_engine(self.config, engine, f"worker {engine.instance_id}", group)
        await self._nursery.start(_run_engine, engine, self._engine_scopes)
        self._registry.register(engine)
        await self.membership_settled()

    async def remove_worker(self, worker_id: int, *, stop: bool = False) -> None:
        """Stop routing to ``worker_id``. By default its engine keeps running and its open
        streams carry on to their end. With ``stop=True`` its engine's ``run`` is cancelled
        too (a `RemoteEngine` closes its connection and stops reconnecting): streams still
        open on it break with `WorkerGone` (and migrate where migration is on). An unknown id
        is no error.

        Returns once the actors know: no later request goes there.
        """
        self._registry.deregister(worker_id)
        if stop:
            scope = self._engine_scopes.pop(worker_id, None)
            if scope is not None:
                scope.cancel()
        await self.membership_settled()

    def engine(self, worker_id: int) -> Engine | None:
        """The engine registered under ``worker_id``, routable or not (a `RemoteEngine`
        reconnecting to its worker is registered but not in `workers`); None when none is."""
        return self._registry.get(worker_id)

    async def membership_settled(self) -> None:
        """Wait until the actors have seen every membership change made so far (a worker that
        crashed, left or rejoined by itself): requests sent after this see it.

        `workers` reads the registry, which changes at once; the router learns through the
        Discovery actor, one message later.
        """
        # Discovery forwards each change to the router's and orchestrator's mailboxes before
        # it answers; mailboxes are FIFO, so every later request sees the new membership.
        await self.actors["discovery"].ask(GetWorkers())

    def mark_prefill_complete(self, request_id: str) -> None:
        """Release the prefill load booked by ``query(..., book=True)`` (the first token
        arrived). Never waits; unknown ids are ignored."""
        self._router.send_nowait(PrefillComplete(request_id))
        booking = self._bookings.get(request_id)
        if booking is not None and booking[1] is not None:
            self._bookings[request_id] = (booking[0], None)
            # The prefill worker's slot is free: a waiter may take it (its Select reaches
            # the router behind this message), as after generate's own prefill leg.
            self._admission.wake((booking[1],))

    def record_usage(self, request_id: str, usage: Usage, *, worker_id: int | None) -> None:
        """Note the ``usage`` a gateway's response reported for ``request_id``, a request
        `query` answered (served by ``worker_id``): a ``usage`` record after its ``done``
        (``done -> done``, the usage as its ``decision``), which ``interlock inspect`` shows
        with the pick. Never waits."""
        t, wall = self._log.now()
        self._log.emit(
            TransitionRecord(
                request_id,
                _QUERY_RECORDS,
                self.mode.name,
                t,
                wall,
                State.DONE,
                State.DONE,
                Trigger.USAGE,
                worker_id,
                usage,
                f"prompt {usage.prompt_tokens}, completion {usage.completion_tokens}, "
                f"cached {usage.cached_tokens} tokens",
            )
        )

    def report_failed_stream(self, worker_id: int) -> None:
        """Count a stream ``worker_id`` failed (a gateway saw it answer 5xx) toward its outlier
        ejection, as a broken stream here counts. Never waits."""
        self._router.send_nowait(StreamFailed(worker_id, stalled=False))

    def free(self, request_id: str) -> None:
        """Release everything booked by ``query(..., book=True)`` for ``request_id`` (the
        request ended). Never waits; unknown ids are ignored."""
        booking = self._bookings.pop(request_id, None)
        # A gateway's booked query held a slot: a waiter may take it. Unknown to the
        # bookings (admission off, or never booked), it wakes nobody.
        self._release(request_id, frozenset(w for w in booking or () if w is not None))

    async def kv_blocks(self) -> dict[int, frozenset[int]]:
        """What the router's KV index holds: each worker's cached block ids (the engines'
        own ids). Empty unless ``router_mode='kv'`` with KV events."""
        result: dict[int, frozenset[int]] = await self._router.ask(GetKvBlocks())
        return result

    async def load(self) -> dict[int, WorkerLoad]:
        """The load the router has booked per worker (workers with none are left out)."""
        result: dict[int, WorkerLoad] = await self._router.ask(GetLoad())
        return result

    async def query(
        self,
        request: PreprocessedRequest,
        *,
        book: bool = False,
        candidates: frozenset[int] | None = None,
        admit: bool = False,
    ) -> RoutingDecision:
        """Select workers for ``request`` without running it.

        Returns the decision: prompt tokens, decode and prefill worker ids (equal when
        aggregated). With ``book=True`` the router books the request's load on the chosen
        workers as if it ran here, until `free` (and `mark_prefill_complete`) release it: the
        bookkeeping for a gateway that sends requests to the workers itself. ``candidates``:
        the only workers either leg may choose (a gateway's subset hint; None: any).
        ``admit``: apply admission control as `generate` does (``max_inflight_per_worker``):
        while every candidate is full, wait in the queue. Waits only for the actors (and,
        with ``admit``, for a slot).

        Raises:
            RequestError: a bad field (e.g. an unknown worker id).
            NoWorkersAvailable: no worker can take it (none among ``candidates``).
            PrefillFailed: ``enforce_disagg`` and no prefill worker.
            Overloaded: with ``admit``, the queue is full or the request is sheddable.
        """
        self._ensure_open()
        request_id = self._claim(request)
        self.stats.queries += 1
        fsm = RequestFsm(request_id, self.mode, self._log)
        selection: Selection | None = None
        try:
            self._check_hints(request)
            _fire_preprocess(fsm, request)
            hints = request.routing
            if admit and self._admit and _routed_by_router(hints):
                route = Route(request, request_id, track=book, admit=True, candidates=candidates)
                selection = await self._route_admitted(route, hints)
            else:
                selection = await self._route(
                    Route(request, request_id, track=book, candidates=candidates)
                )
            decision = selection.decision
            fsm.fire(Trigger.ROUTE, worker_id=decision.decode_worker_id, decision=decision)
            fsm.fire(Trigger.ANSWER, worker_id=decision.decode_worker_id)
            self.stats.done += 1
            if book and self._admit:
                self._remember_booking(decision)
            return decision
        except BaseException as exc:
            unanswered = self._take_unanswered(request_id)
            self._end_abnormally(fsm, exc)
            if book and (selection is not None or unanswered):
                # Booked (or cancelled while its Route was on its way: the router books it on
                # arrival), and the caller, who never got a decision, never frees it. Free it
                # behind the Route (through the disagg actor, so it cannot overtake it).
                self._release(
                    request_id,
                    None if selection is None else _booked_workers(selection.decision),
                    behind_route=True,
                )
            raise
        finally:
            self._in_flight.discard(request_id)

    async def generate(
        self, request: PreprocessedRequest, *, progress: bool = True
    ) -> AsyncGenerator[EngineOutput, None]:
        """Route and run ``request``; yield its outputs as they arrive, the last one with a
        ``finish_reason`` and ``usage``.

        Each generated token is yielded exactly once, in order, across migrations. Leaving
        the iteration early (or cancelling the task) cancels the request on its worker and
        frees its load.

        ``progress=False``: the caller needs only the whole answer (a non-streamed one), so
        an engine that can (an ``interlock worker``) sends the tokens after the first in
        fewer, larger outputs, at most `HOLD_OUTPUTS` seconds apart (a quarter of
        ``engine_idle_timeout`` when that is shorter). The same tokens arrive; a stream that
        breaks loses only the tokens its worker held, which the migration generates again.

        Raises:
            RequestError: a bad field, or any request in a query_only pipeline.
            NoWorkersAvailable: no worker can take it (none registered, or all excluded).
            WorkerGone, WorkerRefused: its worker failed and migration was off or spent.
            PrefillFailed: ``enforce_disagg`` and the prefill leg could not run.
        """
        self._ensure_open()
        if not self.mode.executes:
            raise RequestError(
                "this pipeline has routing='query_only': nothing executes here; call "
                "pipeline.query(request), or build a pipeline with routing='discover'",
                field="routing",
            )
        request_id = self._claim(request)
        self.stats.requests += 1
        fsm = RequestFsm(request_id, self.mode, self._log)
        hints = request.routing
        track = hints is None or hints.enable_local_updates is not False
        post: Postprocessor
        router = self._router
        hold = 0.0 if progress else self._hold
        #: The workers the router booked a slot of this request on, which its end frees for
        #: the queue's waiters.
        booked: frozenset[int] = frozenset()
        try:
            self._check_hints(request)
            post = self._postprocessor(request)
            _fire_preprocess(fsm, request)
            if request.request_id != request_id:
                request = attrs.evolve(request, request_id=request_id)
            attempt = request
            exclude: frozenset[int] = frozenset()
            generated: list[int] = []
            migrations = 0
            cached_tokens = 0
            while True:
                if migrations == 0 and self._admit and _routed_by_router(hints):
                    selection = await self._route_admitted(
                        Route(attempt, request_id, exclude, track, admit=True), hints
                    )
                else:
                    selection = await self._route(Route(attempt, request_id, exclude, track))
                decision = selection.decision
                if track:
                    if booked:
                        # A migration's Select replaced the booking on the broken worker.
                        self._admission.wake(booked)
                    booked = _booked_workers(decision)
                fsm.fire(Trigger.ROUTE, worker_id=decision.decode_worker_id, decision=decision)
                prefill_result: PrefillResult | None = None
                if decision.disaggregated:
                    self.stats.disaggregated += 1
                    prefill_result, selection = await self._run_prefill(
                        fsm, attempt, request_id, selection, exclude, track
                    )
                    if prefill_result is not None:
                        cached_tokens = prefill_result.cached_tokens
                    if track:
                        # The prefill worker's slot was freed (done, or fallen back from).
                        booked = frozenset((selection.decode_engine.instance_id,))
                engine = selection.decode_engine
                worker_id = engine.instance_id
                leg_request = engine_leg_request(
                    attempt
                    if prefill_result is None
                    else attrs.evolve(attempt, prefill_result=prefill_result),
                    frontend_postprocessing=self._frontend_post,
                )
                fsm.fire(Trigger.START_DECODE, worker_id=worker_id)
                # An engine whose worker proved its ids fit the vocabulary at the handshake
                # (RemoteEngine.vocab_checked) needs no range check per token.
                post.set_ids_checked(getattr(engine, "vocab_checked", False) is True)
                began = trio.current_time()
                first_deadline = self._first_token_deadline(began)
                opening = engine.open_stream(leg_request)
                if hold and hasattr(opening, "hold_outputs"):
                    # An optional capability of an engine's stream (`RemoteEngine`'s).
                    cast(Any, opening).hold_outputs = hold
                stalls = self._stalls
                watched: WatchedLeg | None = None
                try:
                    async with opening as stream:
                        nowait = getattr(stream, "receive_nowait", None)
                        first = prefill_result is None
                        # Until the leg's first token, first_token_timeout from its start;
                        # then engine_idle_timeout from each output. ``since``: when the
                        # deadline was set from (the worker's silence a stall reports).
                        since, deadline = began, first_deadline
                        flowing = False
                        watched = stalls.watch(stream, worker_id, since, deadline)
                        while True:
                            output = await self._receive(
                                stream, worker_id, since, deadline, nowait, watched
                            )
                            flowing = flowing or bool(output.token_ids)
                            if flowing:
                                since = trio.current_time()
                                deadline = self._idle_deadline(since)
                                if watched is not None:
                                    stalls.moved(watched, since, deadline)
                            if first and output.token_ids:
                                first = False
                                if track:
                                    router.send_nowait(PrefillComplete(request_id))
                            if output.usage is not None and output.usage.cached_tokens:
                                cached_tokens = output.usage.cached_tokens
                            passed = post.process(output)
                            if passed is None:
                                continue
                            generated.extend(passed.token_ids)
                            if passed.finish_reason is not None:
                                final = attrs.evolve(
                                    passed,
                                    usage=Usage(
                                        prompt_tokens=len(request.token_ids),
                                        completion_tokens=post.count,
                                        cached_tokens=cached_tokens,
                                    ),
                                )
                                # Record the end before handing over the last output: a caller
                                # may stop iterating as soon as it sees a finish_reason.
                                fsm.fire(Trigger.FINISH, worker_id=worker_id)
                                self.stats.done += 1
                                yield final
                                return
                            yield passed
                except (WorkerGone, WorkerRefused) as exc:
                    self._stream_failed(exc)
                    remaining = (
                        None
                        if request.max_tokens is None
                        else (request.max_tokens - len(generated))
                    )
                    if remaining == 0:
                        # Every token arrived; only the final frame was lost.
                        fsm.fire(Trigger.FINISH, worker_id=worker_id, detail=str(exc))
                        self.stats.done += 1
                        last = post.process(EngineOutput(finish_reason="length"))
                        yield attrs.evolve(
                            last or EngineOutput(finish_reason="length"),
                            usage=Usage(
                                prompt_tokens=len(request.token_ids),
                                completion_tokens=post.count,
                                cached_tokens=cached_tokens,
                            ),
                        )
                        return
                    plan_or_refusal = await self._migrate(
                        request, request_id, generated, migrations, worker_id, exclude, exc
                    )
                    if plan_or_refusal is None:
                        raise
                    fsm.fire(
                        Trigger.MIGRATE,
                        worker_id=worker_id,
                        decision=plan_or_refusal,
                        detail=str(exc),
                    )
                    self.stats.migrations += 1
                    migrations = plan_or_refusal.attempt
                    exclude = plan_or_refusal.exclude
                    attempt = plan_or_refusal.request
                finally:
                    if watched is not None:
                        stalls.done(watched)
        except BaseException as exc:
            self._end_abnormally(fsm, exc)
            raise
        finally:
            self._in_flight.discard(request_id)
            unanswered = self._take_unanswered(request_id)
            if track:
                # A Route still in the disagg actor's mailbox books when it reaches the
                # router: the Free follows it the same way, so it cannot overtake it. One
                # cancelled while it asked may have booked any worker; a request that held
                # no slot (refused, shed, gave up in the queue) wakes nobody.
                self._release(request_id, None if unanswered else booked, behind_route=unanswered)

    def _membership_changed(self, workers: Mapping[int, Engine]) -> None:
        """A worker joined, left or came back: the waiters' pools may have changed, and a
        waiter may now find room. Only once the router knows (`membership_settled`): until
        then the queue holds, so no newcomer takes a just-joined worker ahead of them."""
        if self._closed or not self._admit:
            return
        try:
            self._nursery.start_soon(self._release_when_settled)
        except RuntimeError:  # the pipeline's nursery has closed: nobody waits any more
            return
        self._admission.hold()

    async def _release_when_settled(self) -> None:
        try:
            with suppress(InterlockError):  # closing: the waiters are cancelled
                await self.membership_settled()
        finally:
            self._admission.release()

    # -- steps ------------------------------------------------------------------------------

    async def _route(self, message: Route | Select) -> Selection:
        # A router that crashed on this very message is restarted by its supervisor; one
        # retry covers that without looping on a message that crashes it every time.
        target = self._disagg if type(message) is Route else self._router
        unanswered = self._unanswered
        unanswered.add(message.request_id)
        try:
            try:
                selection: Selection = await target.ask(message)
            except ActorCrashed:
                selection = await target.ask(message)
        except Exception:
            unanswered.discard(message.request_id)  # answered with an error: nothing booked
            raise
        unanswered.discard(message.request_id)
        return selection

    def _take_unanswered(self, request_id: str) -> bool:
        """Whether ``request_id``'s last Route or Select was cancelled on its way (it may book
        a slot on any worker when it arrives); forgets it."""
        if request_id in self._unanswered:
            self._unanswered.remove(request_id)
            return True
        return False

    async def _run_prefill(
        self,
        fsm: RequestFsm,
        attempt: PreprocessedRequest,
        request_id: str,
        selection: Selection,
        exclude: frozenset[int],
        track: bool,
    ) -> tuple[PrefillResult | None, Selection]:
        engine = selection.prefill_engine
        assert engine is not None
        worker_id = engine.instance_id
        fsm.fire(Trigger.START_PREFILL, worker_id=worker_id)
        leg = attrs.evolve(
            attempt,
            max_tokens=1,
            min_tokens=0,
            stop_token_ids=(),
            eos_token_ids=(),
            detokenize=False,
        )
        try:
            result: PrefillResult | None = None
            began = trio.current_time()
            deadline = self._first_token_deadline(began)
            async with engine.open_stream(leg) as stream:
                watched = self._stalls.watch(stream, worker_id, began, deadline)
                try:
                    while True:
                        output = await self._receive(
                            stream, worker_id, began, deadline, None, watched
                        )
                        if output.prefill_result is not None:
                            result = output.prefill_result
                        if output.finish_reason is not None:
                            break
                finally:
                    if watched is not None:
                        self._stalls.done(watched)
            if result is None:
                raise WorkerGone(
                    f"prefill worker {worker_id} finished without handing over its KV "
                    "(no prefill_result on its output)",
                    worker_id=worker_id,
                )
        except (WorkerGone, WorkerRefused) as exc:
            self._stream_failed(exc)
            verdict = await self._disagg.ask(PrefillLegFailed(request_id, worker_id, str(exc)))
            assert verdict == FALL_BACK
            fallback = await self._route(
                Select(
                    attempt,
                    request_id,
                    False,
                    exclude | {worker_id},
                    track,
                    split_reason=f"prefill worker {worker_id} failed; falling back to aggregated",
                )
            )
            if track:
                # The fallback's Select replaced the booking on the failed prefill worker and
                # on the decode worker, unless it chose that one again.
                self._admission.wake(
                    _booked_workers(selection.decision) - _booked_workers(fallback.decision)
                )
            fsm.fire(
                Trigger.FALL_BACK,
                worker_id=fallback.decision.decode_worker_id,
                decision=fallback.decision,
                detail=str(exc),
            )
            self.stats.fallbacks += 1
            return None, fallback
        fsm.fire(Trigger.FINISH_PREFILL, worker_id=worker_id)
        if track:
            self._router.send_nowait(PrefillComplete(request_id))
            # The prefill worker's slot is free: a waiter may take it.
            self._admission.wake((worker_id,))
        return result, selection

    def _first_token_deadline(self, began: float) -> float:
        """When a leg that began at ``began`` must have sent its first token (math.inf:
        never)."""
        timeout = self._first_token_timeout
        return math.inf if timeout is None else began + timeout

    def _idle_deadline(self, sent: float) -> float:
        """When a stream that sent an output at ``sent`` must send the next (math.inf:
        never)."""
        timeout = self._idle_timeout
        return math.inf if timeout is None else sent + timeout

    async def _receive(
        self,
        stream: AsyncIterator[EngineOutput],
        worker_id: int,
        since: float,
        deadline: float,
        nowait: Callable[[], EngineOutput] | None = None,
        watched: WatchedLeg | None = None,
    ) -> EngineOutput:
        """The stream's next output: at once, without a checkpoint, when ``nowait`` (the
        stream's ``receive_nowait``) has one waiting; else waits for it. ``watched``: the
        leg's deadline is kept by the pipeline's `StallWatch`, which ends the wait.

        Raises:
            WorkerGone: the stream ended without a final output.
            WorkerStalled: none arrived by ``deadline`` (on trio's clock), set from ``since``
                (the leg's start, or its last output).
        """
        try:
            if nowait is not None:
                # A backlog is handed over in one go, without a cancel scope or a trip through
                # the scheduler per output: the caller gets all that is waiting before it
                # yields, so its client gets them in one write.
                try:
                    return nowait()
                except trio.WouldBlock:
                    pass
            if deadline == math.inf:
                return await stream.__anext__()
            if watched is not None:
                if trio.current_time() < deadline:
                    # No scope: the watch's task fails this wait through the stream if the
                    # deadline passes first.
                    watched.waiting = True
                    try:
                        return await stream.__anext__()
                    except WorkerStalled:
                        # Only the watch puts a WorkerStalled on a stream. Counted here,
                        # where it reaches the leg, not where the watch fails the wait: a
                        # caller cancelled at that same instant ends the wait with its
                        # Cancelled instead, and no stall happened (as with a scope).
                        self._count_stall()
                        raise
                    finally:
                        watched.waiting = False
                # Passed while the consumer had the last output: a stall now, as a scope
                # entered past its deadline would be, unless the next output has arrived
                # meanwhile (a slow consumer, not a stalled worker). `nowait` found none;
                # a stream without it (an HTTP engine's) looks in its connection here.
                stall = self._stall_error(worker_id, since)
                if not watched.fail(stall):
                    return await stream.__anext__()
                self._count_stall()
                raise stall
            else:
                with trio.move_on_at(deadline):
                    return await stream.__anext__()
        except StopAsyncIteration:
            raise WorkerGone(
                f"worker {worker_id} ended the stream without a final output",
                worker_id=worker_id,
            ) from None
        self._count_stall()
        raise self._stall_error(worker_id, since)

    def _stall_error(self, worker_id: int, since: float) -> WorkerStalled:
        """What a leg raises when its worker has sent nothing since ``since`` (the leg's start,
        or its last output), however long the consumer held that output: the worker's whole
        silence, not the part of it the current wait saw."""
        silence = trio.current_time() - since
        return WorkerStalled(
            f"worker {worker_id} made no progress for {silence:.3g}s (first_token_timeout="
            f"{self._first_token_timeout}, engine_idle_timeout={self._idle_timeout}): the "
            "engine is frozen, stopped or unreachable",
            worker_id=worker_id,
        )

    def _count_stall(self) -> None:
        self.stats.stalls += 1

    def _stream_failed(self, exc: EngineError) -> None:
        """Tell the router a worker broke a stream (outlier ejection). A refusal is the
        worker saying no in good order, and counts against nothing."""
        if isinstance(exc, WorkerGone):
            self._router.send_nowait(
                StreamFailed(exc.worker_id, stalled=isinstance(exc, WorkerStalled))
            )

    async def _route_admitted(self, route: Route, hints: RoutingHints | None) -> Selection:
        """`_wait_admitted`, then tell ``queue_time_observers`` how long it took."""
        started = trio.current_time()
        selection = await self._wait_admitted(route, hints)
        waited = trio.current_time() - started
        for observe in self.queue_time_observers:
            observe(route.request_id, waited)
        return selection

    async def _wait_admitted(self, route: Route, hints: RoutingHints | None) -> Selection:
        """`_route` under admission control: while every worker it may go to is at its
        in-flight limit, wait in the queue (highest priority first, then the flows in turn,
        oldest first in each), asking again when `AdmissionQueue.turn` gives it the baton.

        Raises:
            Overloaded: the queue is full, or the request is sheddable (negative priority).
        """
        queue = self._admission
        refusal: WorkersFull | None = None
        since: int | None = None
        if not queue:
            since = queue.wakes
            try:
                return await self._route(route)
            except WorkersFull as full:
                refusal = full
        priority = hints.priority if hints is not None and hints.priority is not None else 0
        flow = hints.fairness_id if hints is not None and hints.fairness_id else DEFAULT_FLOW
        request = route.request
        # Requests equal in these have the same candidate workers (admitted ones exclude
        # none): what one learns of them holds for the others.
        key = (request.model, route.candidates, request.cache_salt is not None)
        ticket = queue.join(
            priority,
            self._queue_limit(),
            flow,
            key=key,
            blocked_on=None if refusal is None else refusal.blocked_on,
            since=since,
        )
        if refusal is not None:
            queue.wake_at(refusal.returns)
        try:
            while True:
                reserved, members = await queue.turn(ticket)
                try:
                    selection = await self._route(
                        attrs.evolve(route, reserved=reserved, queued=True, members=members)
                    )
                except WorkersFull as full:
                    queue.wake_at(full.returns)
                    queue.refused(ticket, full.blocked_on)
                    continue
                try:
                    queue.leave(ticket, served=True, room_left=selection.room_left)
                except BaseException:
                    # The Router booked the selection, which the caller never gets: free
                    # it (the Select was answered, so the Free cannot overtake it).
                    if route.track:
                        self._release(route.request_id, _booked_workers(selection.decision))
                    raise
                return selection
        finally:
            # One that gave up leaves its flow's turn to the next of its flow; the baton goes
            # on either way.
            queue.leave(ticket)

    def _release(
        self, request_id: str, freed: frozenset[int] | None, *, behind_route: bool = False
    ) -> None:
        """Free ``request_id``'s booking at the router, then wake the admission queue's
        waiters of the workers ``freed`` (None: of any worker; empty: nobody). Never waits.

        The wake comes after the Free so the woken waiter's Select reaches the router behind
        it. ``behind_route``: a Route of this request may still be in the disagg actor's
        mailbox (the router books it on arrival), so the Free goes the same way and cannot
        overtake it.
        """
        (self._disagg if behind_route else self._router).send_nowait(Free(request_id))
        self._admission.wake(freed)

    def _remember_booking(self, decision: RoutingDecision) -> None:
        request_id = decision.request_id
        old = self._bookings.get(request_id)
        self._bookings[request_id] = (
            decision.decode_worker_id,
            decision.prefill_worker_id if decision.disaggregated else None,
        )
        if old is not None:
            # Booked again under the same id: the router replaced the old booking.
            self._admission.wake([w for w in old if w is not None])

    def _queue_limit(self) -> int:
        limit = self.config.max_queued_requests
        if limit is not None:
            return limit
        per_worker = self.config.max_inflight_per_worker
        engines = self._registry.snapshot().values()
        return default_queue_limit(
            [per_worker if per_worker else getattr(e, "slots", None) for e in engines]
        )

    async def worker_states(self) -> dict[int, float]:
        """The workers the router leaves out of routing now (they stalled or broke streams:
        ``outlier_ejection_time``), with each one's seconds left."""
        result: dict[int, float] = await self._router.ask(GetWorkerStates())
        return result

    @property
    def queued(self) -> int:
        """Requests waiting in the frontend for a worker slot now."""
        return len(self._admission)

    @property
    def shed(self) -> int:
        """Requests turned away with `Overloaded` since the pipeline opened."""
        return self._admission.shed

    async def _migrate(
        self,
        request: PreprocessedRequest,
        request_id: str,
        generated: list[int],
        migrations: int,
        worker_id: int,
        exclude: frozenset[int],
        error: EngineError,
    ) -> MigrationPlan | None:
        if self._migration is None:
            return None
        answer = await self._migration.ask(
            StreamBroke(
                request_id=request_id,
                original=request,
                generated=tuple(generated),
                migrations_done=migrations,
                worker_id=worker_id,
                exclude=exclude,
                error=str(error),
            )
        )
        if isinstance(answer, MigrationPlan):
            return answer
        error.add_note(f"not migrated: {answer.reason}")
        return None

    # -- bookkeeping ------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise PipelineClosed("the pipeline has been closed")

    def _claim(self, request: PreprocessedRequest) -> str:
        request_id = request.request_id
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif request_id in self._in_flight:
            raise RequestError(
                f"request_id {request_id!r} is already in flight; request ids must be unique "
                "among running requests (or leave request_id unset)",
                field="request_id",
            )
        self._in_flight.add(request_id)
        return request_id

    def _postprocessor(self, request: PreprocessedRequest) -> Postprocessor:
        if self._frontend_post and request.detokenize and self.tokenizer is None:
            raise RequestError(
                "detokenize=True needs a tokenizer in the frontend (postprocessing='frontend'); "
                "build the pipeline with Components(tokenizer=...), or send token ids only",
                field="stop" if request.stop else "detokenize",
            )
        return Postprocessor(request, enforce=self._frontend_post, tokenizer=self.tokenizer)

    def _check_hints(self, request: PreprocessedRequest) -> None:
        hints = request.routing
        named = hints.names_a_worker() if hints is not None else None
        routing = self.config.routing
        if routing == "direct_to_known":
            if hints is None or (
                hints.backend_instance_id is None and hints.decode_worker_id is None
            ):
                raise RequestError(
                    "routing='direct_to_known' needs the request to name its worker: set "
                    "routing.backend_instance_id (or routing.decode_worker_id)",
                    field="backend_instance_id",
                )
        elif named is not None:
            if routing == "query_only":
                raise RequestError(
                    f"routing.{named} is not accepted by a routing='query_only' pipeline: it "
                    "selects the workers itself; drop the field",
                    field=named,
                )
            if not self.config.allow_request_worker_ids:
                raise RequestError(
                    f"routing.{named} is refused under routing='discover' so that clients "
                    "cannot pin load onto a worker; drop the field, or set "
                    "allow_request_worker_ids=True",
                    field=named,
                )

    def _end_abnormally(self, fsm: RequestFsm, exc: BaseException) -> None:
        if fsm.terminal:
            return
        if isinstance(exc, trio.Cancelled | GeneratorExit | KeyboardInterrupt):
            fsm.fire(Trigger.CANCEL, detail=type(exc).__name__)
            self.stats.cancelled += 1
        else:
            detail = f"{type(exc).__name__}: {exc}"
            fsm.fire(
                Trigger.FAIL,
                worker_id=getattr(exc, "worker_id", None),
                decision={"error": type(exc).__name__, "message": str(exc)}
                if isinstance(exc, InterlockError)
                else None,
                detail=detail,
            )
            self.stats.failed += 1


def _booked_workers(decision: RoutingDecision) -> frozenset[int]:
    """The workers the router booked a slot of ``decision``'s request on."""
    return frozenset((decision.decode_worker_id, decision.prefill_worker_id))


def _routed_by_router(hints: RoutingHints | None) -> bool:
    """Whether the router chooses the request's workers (admission control applies), rather
    than the request naming them (the caller's choice, taken as is)."""
    return hints is None or hints.names_a_worker() is None


def _fire_preprocess(fsm: RequestFsm, request: PreprocessedRequest) -> None:
    """``received -> preprocessed``, with the ``[[model_rewrites]]`` rule that chose the
    request's model as its decision (and in words), where one did: `interlock inspect` shows
    it, and the HTTP metrics count it per target."""
    rewrite = request.model_rewrite
    if rewrite is None:
        fsm.fire(Trigger.PREPROCESS)
        return
    fsm.fire(
        Trigger.PREPROCESS,
        decision=rewrite,
        detail=f"model_rewrites rule {rewrite.rule!r}: model {rewrite.model!r} -> "
        f"{rewrite.target!r} (weight {rewrite.weight} of {rewrite.total_weight})",
    )
