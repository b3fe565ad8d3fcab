"""`open_simulated_cluster`: the real pipeline and a cluster of mock workers, in virtual time.

interlock takes every timestamp from trio's clock, so under a virtual clock (`SimulationClock`,
or `trio.testing.MockClock` with ``autojump_threshold=0``) the real routing, disaggregation
and migration code runs against
simulated workers whose prefill and decode steps cost simulated seconds: an hour of traffic
replays in a minute, and the same inputs give the same run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

import attrs
import trio
import trio.testing

from .._config import PipelineConfig
from .._pipeline import Components, Pipeline, SelectionPolicyFactory, build_pipeline
from .._simclock import SimulationClock
from ..engines import Engine
from ..engines.mock import MockEngine, MockTiming
from ..processing import Tokenizer
from ..statemachines import MemoryLog, TransitionSink
from ._faults import Fault, run_fault_schedule
from ._invariants import check_invariants
from ._workload import RequestResult, TimedRequest, WorkloadReport, run_workload

T = TypeVar("T")
_DEFAULT_LOG_BYTES = PipelineConfig().transition_log_memory_bytes


class NotInVirtualTime(RuntimeError):
    """`open_simulated_cluster` was entered under trio's real clock."""


@attrs.frozen(kw_only=True)
class MockWorkerSpec:
    """How `open_simulated_cluster` builds each mock worker (`MockEngine` arguments).

    ``block_size=None`` takes the pipeline's ``kv_block_size``, so KV-aware routing matches.
    The other defaults are the reference mocker's; ``max_model_len`` bounds prompt plus output.
    """

    block_size: int | None = None
    num_gpu_blocks: int = 16_384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    max_model_len: int = 32_768
    watermark: float = 0.01
    timing: MockTiming = attrs.field(factory=MockTiming)
    seed: int = 0

    def build(
        self,
        instance_id: int,
        role: Literal["agg", "prefill", "decode"] = "agg",
        *,
        block_size: int = 16,
    ) -> MockEngine:
        """A new `MockEngine` with this shape (``block_size`` unless the spec sets one)."""
        return MockEngine(
            instance_id,
            role,
            seed=self.seed,
            timing=self.timing,
            block_size=self.block_size if self.block_size is not None else block_size,
            num_gpu_blocks=self.num_gpu_blocks,
            watermark=self.watermark,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_chunked_prefill=self.enable_chunked_prefill,
            max_model_len=self.max_model_len,
        )


class SimulatedCluster:
    """A running pipeline over mock workers. Get one from `open_simulated_cluster`.

    Workers are numbered from 0: ``workers`` first, then ``prefill_workers``; fault schedules
    name them by these ids.
    """

    def __init__(
        self,
        *,
        config: PipelineConfig,
        pipeline: Pipeline,
        workers: tuple[Engine, ...],
        prefill_workers: tuple[Engine, ...],
        nursery: trio.Nursery,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.workers = workers
        self.prefill_workers = prefill_workers
        #: Every worker by id (aggregated or decode, then prefill).
        self.engines: dict[int, Engine] = {e.instance_id: e for e in (*workers, *prefill_workers)}
        #: trio time when the cluster opened: fault times count from here.
        self.started_at = trio.current_time()
        self._nursery = nursery

    @property
    def transition_log(self) -> MemoryLog:
        """The pipeline's in-memory transition log (see `check_invariants`)."""
        return self.pipeline.transition_log

    @property
    def elapsed(self) -> float:
        """Simulated seconds since the cluster opened."""
        return trio.current_time() - self.started_at

    def schedule_faults(self, faults: Iterable[Fault]) -> None:
        """Apply ``faults`` in the background, their times counted from now. Never waits; the
        schedule stops when the cluster closes."""
        self._nursery.start_soon(run_fault_schedule, list(faults), self.engines)

    async def run(
        self,
        workload: Iterable[TimedRequest],
        *,
        on_result: Callable[[RequestResult], None] | None = None,
    ) -> WorkloadReport:
        """Send the workload (times counted from now), wait until every request has ended and
        report. See `run_workload`."""
        return await run_workload(self.pipeline, workload, on_result=on_result)

    def check_invariants(self, *, require_terminal: bool = True) -> dict[str, list[Any]]:
        """`check_invariants` over the transition log, with the configured migration limit.

        Raises:
            InvariantViolation: naming the request and quoting its transitions.
        """
        return check_invariants(
            self.transition_log.records(),
            migration_limit=self.config.migration_limit,
            require_terminal=require_terminal,
        )


def _engines(
    given: int | Sequence[Engine],
    first_id: int,
    role: Literal["agg", "prefill", "decode"],
    spec: MockWorkerSpec,
    block_size: int,
) -> tuple[Engine, ...]:
    if isinstance(given, int):
        if given < 0:
            raise ValueError(f"a cluster needs 0 or more workers, got {given}")
        return tuple(spec.build(first_id + i, role, block_size=block_size) for i in range(given))
    return tuple(given)


def require_virtual_time(
    what: str = "open_simulated_cluster",
) -> SimulationClock | trio.testing.MockClock:
    """Return trio's running clock if it keeps virtual time (`SimulationClock` or
    `trio.testing.MockClock`).

    Raises:
        NotInVirtualTime: trio runs on another clock.
    """
    clock = trio.lowlevel.current_clock()
    if not isinstance(clock, SimulationClock | trio.testing.MockClock):
        raise NotInVirtualTime(
            f"{what} needs virtual time, but trio runs on {type(clock).__name__}: simulated "
            "seconds would pass as real ones. Call it inside "
            "interlock.testing.run_simulation(main) (or trio.run(main, "
            "clock=interlock.testing.SimulationClock())), or in a pytest-trio test that takes "
            "the autojump_clock fixture; pass virtual_time=False to run on the real clock anyway"
        )
    return clock


@asynccontextmanager
async def open_simulated_cluster(
    config: PipelineConfig | None = None,
    *,
    workers: int | Sequence[Engine] = 4,
    prefill_workers: int | Sequence[Engine] = 0,
    faults: Iterable[Fault] = (),
    worker_spec: MockWorkerSpec | None = None,
    decode_role: Literal["agg", "decode"] = "agg",
    tokenizer: Tokenizer | None = None,
    transition_sinks: Sequence[TransitionSink] = (),
    selection_policy: SelectionPolicyFactory | None = None,
    virtual_time: bool = True,
) -> AsyncIterator[SimulatedCluster]:
    """Run the real pipeline (`build_pipeline` with ``config``) over mock workers.

    ``workers`` and ``prefill_workers`` are counts of `MockEngine` to build from
    ``worker_spec`` (ids 0, 1, ... for workers, then on for prefill workers; the workers take
    role ``decode_role``), or engines you built yourself. ``faults`` start when the cluster
    opens. ``selection_policy`` is passed on as ``Components(selection_policy=...)``: your own
    policy, chosen over ``router_mode``'s. Leaving the context stops the fault schedule and
    closes the pipeline (breaking any stream still open). The transition log keeps up to
    ``transition_log_capacity`` records whatever their size (``transition_log_memory_bytes``
    at its default is lifted), so that `SimulatedCluster.check_invariants` sees whole requests.

    This installs no clock: trio's clock is chosen by ``trio.run``. Enter it inside
    `run_simulation` (``trio.run`` with a `SimulationClock`), or in a pytest-trio test that
    takes the ``autojump_clock`` fixture (a ``MockClock(autojump_threshold=0)``).

    Raises:
        NotInVirtualTime: trio's clock keeps real time (unless ``virtual_time=False``).
        ConfigError: ``config`` is invalid, or does not fit the workers or the selection
            policy (raised on entry).
    """
    if virtual_time:
        require_virtual_time()
    config = config if config is not None else PipelineConfig()
    if config.transition_log_memory_bytes == _DEFAULT_LOG_BYTES:
        # check_invariants needs every record of a request: a simulation's log is bounded by
        # transition_log_capacity alone unless the caller chose a byte bound of its own.
        config = config.evolve(transition_log_memory_bytes=None)
    spec = worker_spec if worker_spec is not None else MockWorkerSpec()
    agg = _engines(workers, 0, decode_role, spec, config.kv_block_size)
    next_id = max((e.instance_id for e in agg), default=-1) + 1
    prefill = _engines(prefill_workers, next_id, "prefill", spec, config.kv_block_size)
    components = Components(
        workers=agg,
        prefill_workers=prefill,
        tokenizer=tokenizer,
        transition_sinks=transition_sinks,
        selection_policy=selection_policy,
    )
    async with build_pipeline(config, components) as pipeline:
        try:
            async with trio.open_nursery() as nursery:
                cluster = SimulatedCluster(
                    config=config,
                    pipeline=pipeline,
                    workers=agg,
                    prefill_workers=prefill,
                    nursery=nursery,
                )
                scheduled = list(faults)
                if scheduled:
                    cluster.schedule_faults(scheduled)
                try:
                    yield cluster
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The body's own exception (an assertion in a test, say) arrives as itself.
            if len(group.exceptions) == 1 and not isinstance(
                group.exceptions[0], BaseExceptionGroup
            ):
                raise group.exceptions[0] from None
            raise


def seed_scheduler(seed: int) -> None:
    """Make trio's scheduling order a function of ``seed``.

    trio deliberately varies the order in which tasks woken at the same moment run (it
    reverses each batch at random, or shuffles it once hypothesis is imported) so that code
    cannot come to depend on one order. In a simulation many tasks wake at the same virtual
    instant, so that order decides which request the router sees first; seeding trio's
    private generator (``trio._core._run._r``) makes a run repeat exactly. hypothesis seeds
    the same generator for each example it runs.
    """
    generator = getattr(getattr(trio._core, "_run", None), "_r", None)
    if generator is not None:
        generator.seed(seed)


def run_simulation(
    async_fn: Callable[..., Awaitable[T]],
    *args: Any,
    seed: int | None = 0,
    clock: SimulationClock | trio.testing.MockClock | None = None,
) -> T:
    """Run ``async_fn(*args)`` with ``trio.run`` in virtual time and return its result.

    The clock is ``clock`` or a new `SimulationClock` (time jumps whenever every task
    waits); pass a ``trio.testing.MockClock(autojump_threshold=0)`` for code that relies on
    ``trio.testing.wait_all_tasks_blocked``. With ``seed`` not None, trio's scheduling order
    is seeded first (`seed_scheduler`), so the same call gives the same run.
    """
    if seed is not None:
        seed_scheduler(seed)
    if clock is None:
        clock = SimulationClock()
    return trio.run(async_fn, *args, clock=clock)
