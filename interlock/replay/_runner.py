"""Replaying a trace: each policy on the same requests, the real pipeline over mock workers,
in virtual time."""

from __future__ import annotations

import math
import os
import time
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from .._config import SELECTING_ROUTER_MODES, PipelineConfig, parse_knob_text
from .._errors import ConfigError
from .._pipeline import SelectionPolicyFactory, check_selection_policy
from .._plugins import import_policy_factory
from ..engines.mock import MockTiming
from ..statemachines import TransitionRecord
from ..testing import (
    Fault,
    MockWorkerSpec,
    RequestResult,
    TimedRequest,
    WorkloadReport,
    check_invariants,
    open_simulated_cluster,
    run_simulation,
)
from ..wire import PreprocessedRequest
from ._bound import combined_capacity_hit_rate
from ._traces import Trace

#: Transition records the pipeline keeps in memory during a replay: the routing decisions
#: they hold carry whole prompts, so a replay streams records to its own lightweight log
#: instead (see `ReplayPolicy.pipeline_config`).
_MEMORY_LOG_CAPACITY = 256


def _fault_tuple(faults: Iterable[Fault]) -> tuple[Fault, ...]:
    return tuple(faults)


@attrs.frozen(kw_only=True)
class ReplaySettings:
    """The simulated cluster and how hard the trace drives it.

    Workers are `MockEngine` with the reference mocker's timing. The defaults suit the Mooncake
    traces (docs/replay.md explains each): ``block_size`` 64 divides the format's 512 tokens per
    hash id; 65,536 blocks make 4M tokens of KV per worker; ``max_num_batched_tokens`` bounds
    the uncached prompt tokens one scheduler step prefills (the reference's 8,192; a longer
    prompt is prefilled a chunk per step, or, with ``chunked_prefill=False``, admitted only
    into an empty batch). ``max_model_len=None`` fits the longest request of the trace.
    ``rate_scale`` divides every arrival time (2 = twice the request rate); ``speedup`` is the
    engines' speedup ratio (below 1, every step takes longer). ``faults`` count from the
    first request's arrival.

    Raises:
        ValueError: a size below 1, or a scale that is not a positive number.
    """

    workers: int = 8
    block_size: int = 64
    num_gpu_blocks: int = 65_536
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = True
    max_model_len: int | None = None
    speedup: float = 1.0
    rate_scale: float = 1.0
    seed: int = 0
    faults: tuple[Fault, ...] = attrs.field(default=(), converter=_fault_tuple)

    def __attrs_post_init__(self) -> None:
        for name in ("workers", "block_size", "num_gpu_blocks", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1: {self.max_num_batched_tokens}")
        for name in ("speedup", "rate_scale"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    def worker_spec(self, trace: Trace) -> MockWorkerSpec:
        longest = max((r.input_length + r.output_length for r in trace.requests), default=1)
        return MockWorkerSpec(
            block_size=self.block_size,
            num_gpu_blocks=self.num_gpu_blocks,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_chunked_prefill=self.chunked_prefill,
            max_model_len=self.max_model_len or longest + 1,
            timing=MockTiming(speedup_ratio=self.speedup),
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=False)
        data["faults"] = [f.describe() for f in self.faults]
        return data


@attrs.frozen
class ReplayPolicy:
    """One contender: a label and the pipeline configuration it runs with, plus, for a policy
    of your own, the factory that makes it (``Components.selection_policy``) and the
    ``module:attribute`` it was imported from."""

    label: str
    config: PipelineConfig
    selection_policy: SelectionPolicyFactory | None = attrs.field(default=None, kw_only=True)
    import_path: str | None = attrs.field(default=None, kw_only=True)

    @classmethod
    def parse(cls, text: str, base: PipelineConfig | None = None) -> ReplayPolicy:
        """``NAME`` (a router_mode: round_robin, random, kv, predicted_ttft; applied to
        ``base``), ``NAME:KNOB=VALUE[:KNOB=VALUE...]`` (the same with knobs changed, labelled
        with the whole text), ``PATH.toml`` / ``LABEL=PATH.toml`` (a configuration file,
        labelled with its stem unless given a label), or ``LABEL=module:attribute`` (your own
        selection policy: ``attribute`` of the imported ``module`` is its factory, run with
        ``base``).

        An ``=`` before the first ``:`` makes the labelled forms; a ``:`` first, the knob form.

        Raises:
            ConfigError: an unknown policy name or knob, a value the knob does not take, a
                configuration file that does not load, or a module that does not import or
                lacks the attribute.
        """
        base = base if base is not None else PipelineConfig()
        if os.path.isfile(text):
            return cls._from_file(text, "")
        label, equals, rest = text.partition("=")
        colon = text.find(":")
        if equals and (colon < 0 or len(label) < colon):
            if not label:
                raise ConfigError(f"policy {text!r}: give a label before '=' (LABEL=...)")
            if rest.endswith(".toml") or os.path.isfile(rest):
                return cls._from_file(rest, label)
            if ":" in rest:
                factory = import_policy_factory(rest, what=f"policy {text!r}")
                try:
                    check_selection_policy(base, factory)
                except ConfigError as exc:
                    raise ConfigError(f"policy {text!r}: {exc}", knobs=exc.knobs) from None
                return cls(label, base, selection_policy=factory, import_path=rest)
            raise ConfigError(
                f"policy {text!r}: LABEL=... needs a .toml configuration file or a selection "
                "policy factory as module:attribute (e.g. mine=my_policies:make_policy)"
            )
        if colon >= 0:
            name, *items = text.split(":")
            changes: dict[str, Any] = {}
            for item in items:
                knob, equals, value = item.partition("=")
                if not equals or not knob:
                    raise ConfigError(
                        f"policy {text!r}: {item!r} is not KNOB=VALUE "
                        "(e.g. kv:overlap_score_weight=4; a policy of your own is "
                        "LABEL=module:attribute)"
                    )
                if knob in ("router_mode", "kv_block_size"):
                    raise ConfigError(
                        f"policy {text!r} sets {knob}, which the replay chooses itself (the "
                        "policy name sets router_mode, --block-size the block size)",
                        knobs=(knob,),
                    )
                try:
                    changes[knob] = parse_knob_text(knob, value)
                except ConfigError as exc:
                    raise ConfigError(f"policy {text!r}: {exc}", knobs=exc.knobs) from None
            named = cls.parse(name, base)
            try:
                return cls(text, named.config.evolve(**changes).validate())
            except ValueError as exc:  # an out-of-range value, named by its knob
                raise ConfigError(f"policy {text!r}: {exc}") from None
        if text.endswith(".toml"):
            return cls._from_file(text, "")
        if text not in SELECTING_ROUTER_MODES or text == "direct":
            choices = [m for m in SELECTING_ROUTER_MODES if m != "direct"]
            raise ConfigError(
                f"unknown policy {text!r}: use one of {', '.join(choices)}, a TOML "
                "configuration file (PATH.toml or LABEL=PATH.toml), or a policy of your own "
                "(LABEL=module:attribute)",
                knobs=("router_mode",),
            )
        return cls(text, base.evolve(router_mode=text))

    @classmethod
    def _from_file(cls, path: str, label: str) -> ReplayPolicy:
        config = PipelineConfig.from_toml(path)
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        if "kv_block_size" in data.get("interlock", data):
            raise ConfigError(
                f"{path} sets kv_block_size, but a replay sizes its workers' blocks itself; "
                "remove the key and pass --block-size",
                knobs=("kv_block_size",),
            )
        return cls(label or Path(path).stem, config)

    @property
    def router_mode(self) -> str:
        """What chooses the workers: the configured router_mode, or the ``module:attribute``
        of a policy of your own."""
        return self.import_path if self.import_path is not None else self.config.router_mode

    def pipeline_config(self, settings: ReplaySettings) -> PipelineConfig:
        """The policy's configuration for ``settings``' cluster.

        A replay compares routing policies on the engines' own queues, so the frontend's
        admission control and stall deadlines are off unless the policy's configuration sets
        them (an overloaded replay would otherwise shed or migrate requests, and the figures
        would mix admission with routing)."""
        config = self.config
        defaults = PipelineConfig()
        off: dict[str, Any] = {}
        for knob, value in _OFF_IN_REPLAYS.items():
            if getattr(config, knob) == getattr(defaults, knob):
                off[knob] = value
        return config.evolve(
            kv_block_size=settings.block_size,
            router_seed=config.router_seed or settings.seed,
            transition_log_capacity=_MEMORY_LOG_CAPACITY,
            **off,
        ).validate()


#: What a replay turns off when its configuration leaves them at their defaults.
_OFF_IN_REPLAYS: dict[str, Any] = {
    "max_inflight_per_worker": 0,
    "first_token_timeout": None,
    "engine_idle_timeout": None,
}


def parse_policies(text: str, base: PipelineConfig | None = None) -> tuple[ReplayPolicy, ...]:
    """Comma-separated `ReplayPolicy.parse` items.

    Raises:
        ConfigError: a bad item, or two with the same label.
    """
    policies = tuple(ReplayPolicy.parse(item.strip(), base) for item in text.split(",") if item)
    if not policies:
        raise ConfigError("no policy given: pass e.g. round_robin,random,kv,predicted_ttft")
    labels = [p.label for p in policies]
    for label in labels:
        if labels.count(label) > 1:
            raise ConfigError(f"policy {label!r} is given twice; labels must be unique")
    return policies


@attrs.frozen(kw_only=True)
class PolicyReport:
    """What one policy achieved on the trace. Times in milliseconds of simulated time unless
    named ``seconds``; ``wall_seconds`` is the only figure that is not the same on every run."""

    policy: str
    router_mode: str
    requests: int
    completed: int
    failed: int
    hit_rate: float
    hit_rate_bound: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    output_tokens_per_s: float
    requests_per_s: float
    migrations: int
    fallbacks: int
    preemptions: int
    requests_per_worker: tuple[int, ...]
    sim_seconds: float
    wall_seconds: float
    ttft_ms: tuple[float, ...] = attrs.field(repr=False, default=())

    @property
    def share_of_bound(self) -> float:
        """The hit rate as a fraction of the combined-capacity bound."""
        return self.hit_rate / self.hit_rate_bound if self.hit_rate_bound else math.nan

    @property
    def sim_per_wall(self) -> float:
        """Simulated seconds per wall-clock second."""
        return self.sim_seconds / self.wall_seconds if self.wall_seconds else math.inf

    def to_json(self, *, timing: bool = True) -> dict[str, Any]:
        """The report as JSON-ready values (``timing=False`` leaves out the wall-clock
        figures, so the same seed gives byte-identical output)."""
        data: dict[str, Any] = {}
        for field in attrs.fields(PolicyReport):
            if field.name in ("ttft_ms", "wall_seconds"):
                continue
            value = getattr(self, field.name)
            data[field.name] = list(value) if isinstance(value, tuple) else _clean(value)
        data["share_of_bound"] = _clean(self.share_of_bound)
        if timing:
            data["wall_seconds"] = round(self.wall_seconds, 3)
            data["sim_seconds_per_wall_second"] = round(self.sim_per_wall, 2)
        return data


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return value


@attrs.frozen(kw_only=True)
class ReplayReport:
    """Every policy's report on one trace, in the order they ran."""

    trace: str
    trace_format: str
    requests: int
    span_seconds: float
    settings: ReplaySettings
    hit_rate_bound: float
    policies: tuple[PolicyReport, ...]

    def policy(self, label: str) -> PolicyReport:
        for report in self.policies:
            if report.policy == label:
                return report
        raise KeyError(label)


class ReplayProgress(Protocol):
    """Told how a replay advances (the CLI draws a progress bar with it)."""

    def start_policy(self, label: str, total: int) -> None: ...

    def request_done(self, label: str, sim_time: float, failed: bool) -> None: ...

    def finish_policy(self, label: str) -> None: ...


def trace_workload(trace: Trace) -> Iterator[TimedRequest]:
    """The trace's requests, each prompt built only when the replay reaches it (a whole
    Mooncake trace would take gigabytes of token ids at once)."""
    first = trace.requests[0].at if trace.requests else 0.0
    for index, request in enumerate(trace.requests):
        yield TimedRequest(
            request.at - first,
            PreprocessedRequest(
                token_ids=request.token_ids(),
                max_tokens=request.output_length,
                request_id=f"r{index}",
            ),
        )


class _RouteLog:
    """A transition sink keeping each record without its decision (which holds the prompt):
    enough for `check_invariants` and for counting requests per worker."""

    def __init__(self) -> None:
        self.records: list[TransitionRecord] = []

    def offer(self, record: TransitionRecord) -> None:
        if record.decision is not None:
            record = attrs.evolve(record, decision=None)
        self.records.append(record)


def replay_policy(
    trace: Trace,
    policy: ReplayPolicy,
    settings: ReplaySettings,
    *,
    bound: float = math.nan,
    progress: ReplayProgress | None = None,
) -> PolicyReport:
    """Replay ``trace`` (already limited and scaled) with one policy, in virtual time; return
    its report. The run is a function of the trace, the policy and ``settings`` (its seed
    included): trio's scheduler is seeded, and no figure but ``wall_seconds`` depends on the
    machine.

    Raises:
        ConfigError: the policy's configuration does not fit the simulated cluster.
        InvariantViolation: a request's transitions broke an invariant (a bug to report).
    """
    config = policy.pipeline_config(settings)
    spec = settings.worker_spec(trace)
    log = _RouteLog()
    label = policy.label

    def done(result: RequestResult) -> None:
        if progress is not None:
            progress.request_done(label, trio.current_time(), result.error is not None)

    async def run() -> tuple[WorkloadReport, int, int, int]:
        async with open_simulated_cluster(
            config,
            workers=settings.workers,
            worker_spec=spec,
            faults=settings.faults,
            transition_sinks=[log],
            selection_policy=policy.selection_policy,
        ) as cluster:
            report = await cluster.run(trace_workload(trace), on_result=done)
            stats = cluster.pipeline.stats
            preemptions = sum(getattr(e, "preemptions", 0) for e in cluster.workers)
            return report, stats.migrations, stats.fallbacks, preemptions

    if progress is not None:
        progress.start_policy(label, len(trace.requests))
    started = time.perf_counter()
    report, migrations, fallbacks, preemptions = run_simulation(run, seed=settings.seed)
    wall = time.perf_counter() - started
    if progress is not None:
        progress.finish_policy(label)
    check_invariants(log.records, migration_limit=config.migration_limit)
    per_worker = [0] * settings.workers
    for record in log.records:
        worker = record.worker_id
        if record.trigger == "route" and worker is not None and worker < len(per_worker):
            per_worker[worker] += 1
    ms = 1000.0
    return PolicyReport(
        policy=label,
        router_mode=policy.router_mode,
        requests=len(trace.requests),
        completed=report.completed,
        failed=report.failed,
        hit_rate=report.hit_rate,
        hit_rate_bound=bound,
        ttft_p50_ms=report.ttft_quantile(0.5) * ms,
        ttft_p90_ms=report.ttft_quantile(0.9) * ms,
        ttft_p99_ms=report.ttft_quantile(0.99) * ms,
        itl_p50_ms=report.itl_quantile(0.5) * ms,
        itl_p99_ms=report.itl_quantile(0.99) * ms,
        e2e_p50_ms=report.e2e_quantile(0.5) * ms,
        e2e_p99_ms=report.e2e_quantile(0.99) * ms,
        output_tokens_per_s=report.throughput,
        requests_per_s=report.completed / report.duration if report.duration > 0 else 0.0,
        migrations=migrations,
        fallbacks=fallbacks,
        preemptions=preemptions,
        requests_per_worker=tuple(per_worker),
        sim_seconds=report.duration,
        wall_seconds=wall,
        ttft_ms=tuple(sorted(t * ms for t in report.ttft)),
    )


def trace_bound(trace: Trace, settings: ReplaySettings) -> float:
    """The combined-capacity hit-rate bound of ``trace`` on ``settings``' cluster."""
    return combined_capacity_hit_rate(
        (r.token_ids() for r in trace.requests),
        capacity_blocks=settings.workers * settings.num_gpu_blocks,
        block_size=settings.block_size,
    )


def replay(
    trace: Trace,
    policies: Sequence[ReplayPolicy],
    settings: ReplaySettings | None = None,
    *,
    progress: ReplayProgress | None = None,
) -> ReplayReport:
    """Replay ``trace`` once per policy on identical clusters; return the reports side by side.

    ``trace`` is replayed as given (use `Trace.head` for ``--limit``); ``settings.rate_scale``
    is applied here.

    Raises:
        ConfigError, InvariantViolation: as `replay_policy`.
    """
    settings = settings if settings is not None else ReplaySettings()
    scaled = trace.scaled(settings.rate_scale)
    bound = trace_bound(scaled, settings)
    reports = tuple(
        replay_policy(scaled, policy, settings, bound=bound, progress=progress)
        for policy in policies
    )
    return ReplayReport(
        trace=trace.name,
        trace_format=trace.format,
        requests=len(trace.requests),
        span_seconds=scaled.span,
        settings=settings,
        hit_rate_bound=bound,
        policies=reports,
    )
