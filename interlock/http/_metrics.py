"""Prometheus metrics of one HTTP frontend, in a `CollectorRegistry` of its own.

`HttpMetrics` is a `TransitionSink` (pass it in ``Components.transition_sinks``): from the
transition records it counts state-machine transitions, routing decisions per worker and leg,
prefix-cache overlap, migrations and fallbacks. The HTTP layer adds requests by endpoint and
status, time to first token and inter-token latency.

Everything is kept in plain ints and lists and turned into metric families only when
``/metrics`` is scraped: the hot path pays a dict increment or a bisect per observation, never
a lock or a label lookup (one frontend is one trio thread).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any, Final

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..statemachines import TransitionRecord
from ..wire import ModelRewriteDecision, RoutingDecision, Usage

#: Latency buckets (seconds) for TTFT and request duration.
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Inter-token latency buckets (seconds).
ITL_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class _Histogram:
    """A lock-free histogram: bucket counts, sum and count."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, value: float, times: int) -> None:
        """`observe` ``value`` ``times`` times."""
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


@attrs.define
class RequestWatch:
    """What the sink learned about one request a handler watches (for response ``nvext``)."""

    decision: RoutingDecision | None = None
    prefill_started: float | None = None
    prefill_finished: float | None = None


class HttpMetrics:
    """The frontend's metrics and its window on the transition log.

    Create one per app, pass it to ``Components(transition_sinks=[metrics])`` and to
    `build_app`; ``/metrics`` serves `render`. ``offer`` never blocks or raises.
    """

    def __init__(self, *, namespace: str = "interlock", block_size: int = 16) -> None:
        self.namespace = namespace
        #: KV block size for the prefix hit rate; `build_app` sets the pipeline's.
        self.block_size = block_size
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests: dict[tuple[str, str], int] = {}
        self.in_flight = 0
        self.streams_open = 0
        #: The server is draining (`interlock.http.Drain`): it finishes what is in flight and
        #: takes nothing new.
        self.draining = False
        #: Stream bytes produced and not yet taken by their clients, over all streams.
        self.stream_buffered_bytes = 0
        #: Streams cancelled because their client fell too far behind.
        self.stream_buffer_overflows = 0
        self.ttft = _Histogram(LATENCY_BUCKETS)
        self.itl = _Histogram(ITL_BUCKETS)
        self.duration: dict[tuple[str, str], _Histogram] = {}
        #: Time from asking for a worker slot to getting one (the admission queue).
        self.queue_time = _Histogram(LATENCY_BUCKETS)
        self.transitions: dict[tuple[str, str, str], int] = {}
        self.routed: dict[tuple[int, str], int] = {}
        #: Blocks in the router's KV index per worker (the app refreshes it before a scrape).
        self.kv_blocks: dict[int, int] = {}
        #: Admission and gray-failure state, copied from the pipeline at each scrape.
        self.queued = 0
        self.shed = 0
        self.stalls = 0
        self.ejected: dict[int, float] = {}
        #: The router's load bookkeeping per worker (as of the last scrape): requests counted
        #: on it, whether running here or booked by the route-only API or the endpoint picker.
        self.booked_requests: dict[int, int] = {}
        self.migrations = 0
        self.fallbacks = 0
        self.overlap_blocks = 0
        self.prompt_blocks = 0
        self.output_tokens = 0
        #: Tokens the responses a gateway sent through the endpoint picker reported in their
        #: ``usage``, by kind (prompt, completion, cached).
        self.gateway_usage_tokens: dict[str, int] = {"prompt": 0, "completion": 0, "cached": 0}
        #: Requests a ``[[model_rewrites]]`` rule sent on, by rule, model asked for and target.
        self.model_rewrites: dict[tuple[str, str, str], int] = {}
        #: The model names that label `model_rewrites` as they are (`build_app` sets the
        #: rules' and the served model's); a generic rule matches any name a client makes up,
        #: which is counted as ``other`` so the series stay bounded (as llm-d's do).
        self.model_rewrite_names: frozenset[str] = frozenset()
        self.watched: dict[str, RequestWatch] = {}
        self.registry.register(self)

    # -- TransitionSink ---------------------------------------------------------------------

    def offer(self, record: TransitionRecord) -> None:
        key = (record.src, record.dst, record.trigger)
        transitions = self.transitions
        transitions[key] = transitions.get(key, 0) + 1
        trigger = record.trigger
        if trigger == "route" or trigger == "fall_back":
            decision = record.decision
            if type(decision) is RoutingDecision:
                self._count_route(decision)
                watch = self.watched.get(record.request_id)
                if watch is not None:
                    watch.decision = decision
            if trigger == "fall_back":
                self.fallbacks += 1
        elif trigger == "migrate":
            self.migrations += 1
        elif trigger == "preprocess":
            decision = record.decision
            if type(decision) is ModelRewriteDecision:
                self._count_rewrite(decision)
        elif trigger == "start_prefill" or trigger == "finish_prefill":
            watch = self.watched.get(record.request_id)
            if watch is not None:
                if trigger == "start_prefill":
                    watch.prefill_started = record.wall
                else:
                    watch.prefill_finished = record.wall

    def _count_rewrite(self, decision: ModelRewriteDecision) -> None:
        model = decision.model if decision.model in self.model_rewrite_names else "other"
        key = (decision.rule, model, decision.target)
        self.model_rewrites[key] = self.model_rewrites.get(key, 0) + 1

    def _count_route(self, decision: RoutingDecision) -> None:
        routed = self.routed
        if decision.disaggregated and decision.prefill_worker_id is not None:
            key = (decision.prefill_worker_id, "prefill")
            routed[key] = routed.get(key, 0) + 1
            key = (decision.decode_worker_id, "decode")
        else:
            key = (decision.decode_worker_id, "agg")
        routed[key] = routed.get(key, 0) + 1
        for selection in decision.selections:
            if selection.leg == "prefill" and decision.disaggregated:
                continue
            for candidate in selection.candidates:
                if candidate.worker_id == selection.chosen:
                    self.overlap_blocks += candidate.overlap_blocks
                    break
        self.prompt_blocks += len(decision.token_ids) // self.block_size

    # -- the HTTP layer's observations ------------------------------------------------------

    def watch(self, request_id: str) -> RequestWatch:
        """Start collecting ``request_id``'s routing decision; `unwatch` when it ends."""
        watch = self.watched[request_id] = RequestWatch()
        return watch

    def unwatch(self, request_id: str) -> None:
        self.watched.pop(request_id, None)

    def count_request(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.duration.get(key)
        if histogram is None:
            histogram = self.duration[key] = _Histogram(LATENCY_BUCKETS)
        histogram.observe(seconds)

    def count_gateway_usage(self, usage: Usage) -> None:
        """Count the ``usage`` a response through the endpoint picker reported."""
        tokens = self.gateway_usage_tokens
        tokens["prompt"] += usage.prompt_tokens
        tokens["completion"] += usage.completion_tokens
        tokens["cached"] += usage.cached_tokens

    def observe_queue_time(self, request_id: str, seconds: float) -> None:
        """A request got its worker slot after ``seconds`` (a `Pipeline.queue_time_observers`
        hook; `build_app` installs it)."""
        self.queue_time.observe(seconds)

    # -- exposition ---------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        ns = self.namespace
        requests = CounterMetricFamily(
            f"{ns}_http_requests",
            "HTTP requests answered, by endpoint and status code.",
            labels=("endpoint", "status"),
        )
        for (endpoint, status), count in sorted(self.requests.items()):
            requests.add_metric((endpoint, status), count)
        yield requests
        duration = HistogramMetricFamily(
            f"{ns}_http_request_duration_seconds",
            "Time from receiving a request to sending its last byte, by endpoint and status.",
            labels=("endpoint", "status"),
        )
        for (endpoint, status), histogram in sorted(self.duration.items()):
            duration.add_metric((endpoint, status), histogram.buckets(), histogram.total)
        yield duration
        yield GaugeMetricFamily(
            f"{ns}_http_requests_in_flight",
            "Generation requests being served now.",
            value=self.in_flight,
        )
        yield GaugeMetricFamily(
            f"{ns}_http_streams_open", "Streaming responses open now.", value=self.streams_open
        )
        yield GaugeMetricFamily(
            f"{ns}_draining",
            "1 while the server drains (after SIGTERM): in-flight requests finish, new ones get "
            "503.",
            value=1 if self.draining else 0,
        )
        yield GaugeMetricFamily(
            f"{ns}_http_stream_buffered_bytes",
            "Stream bytes produced and not yet taken by slow clients, over all streams.",
            value=self.stream_buffered_bytes,
        )
        yield CounterMetricFamily(
            f"{ns}_http_stream_buffer_overflows",
            "Streams cancelled because their client fell more than --max-stream-buffer-bytes "
            "behind.",
            value=self.stream_buffer_overflows,
        )
        for name, doc, histogram in (
            ("time_to_first_token_seconds", "Time from request to its first token.", self.ttft),
            (
                "inter_token_latency_seconds",
                (
                    "Time between consecutive tokens (a streamed answer: between the chunks "
                    "sent; a whole answer: each joined output's gap spread over its tokens)."
                ),
                self.itl,
            ),
            (
                "request_queue_time_seconds",
                "Time a request waited in the frontend for a worker slot (admission queue; "
                "about 0 when a worker had room).",
                self.queue_time,
            ),
        ):
            family = HistogramMetricFamily(f"{ns}_{name}", doc)
            family.add_metric((), histogram.buckets(), histogram.total)
            yield family
        yield CounterMetricFamily(
            f"{ns}_output_tokens", "Tokens returned to clients.", value=self.output_tokens
        )
        gateway = CounterMetricFamily(
            f"{ns}_gateway_usage_tokens",
            "Tokens in the usage of responses a gateway passed through the endpoint picker "
            "(response bodies sent to it), by kind: prompt, completion, cached (prompt tokens "
            "served from the engine's prefix cache).",
            labels=("kind",),
        )
        for kind, count in self.gateway_usage_tokens.items():
            gateway.add_metric((kind,), count)
        yield gateway
        rewrites = CounterMetricFamily(
            f"{ns}_model_rewrite_decisions",
            "Requests a [[model_rewrites]] rule (GAIE's InferenceModelRewrite) sent to a target "
            "model, by rule, the model asked for (other: a name no rule spells out) and "
            "target, counted as they enter the pipeline.",
            labels=("model_rewrite_name", "model_name", "target_model"),
        )
        for key, count in sorted(self.model_rewrites.items()):
            rewrites.add_metric(key, count)
        yield rewrites
        routed = CounterMetricFamily(
            f"{ns}_worker_routed_requests",
            "Routing decisions per worker and leg (agg, prefill, decode), queries included.",
            labels=("worker_id", "leg"),
        )
        for (worker, leg), count in sorted(self.routed.items()):
            routed.add_metric((str(worker), leg), count)
        yield routed
        yield CounterMetricFamily(
            f"{ns}_router_overlap_blocks",
            "Prompt KV blocks already cached on the chosen worker, as the router saw it.",
            value=self.overlap_blocks,
        )
        yield CounterMetricFamily(
            f"{ns}_router_prompt_blocks",
            "Full KV blocks of routed prompts.",
            value=self.prompt_blocks,
        )
        yield GaugeMetricFamily(
            f"{ns}_router_prefix_hit_rate",
            "overlap_blocks / prompt_blocks since start (0 before any routing).",
            value=self.overlap_blocks / self.prompt_blocks if self.prompt_blocks else 0.0,
        )
        yield CounterMetricFamily(
            f"{ns}_migrations", "Broken streams continued on another worker.", value=self.migrations
        )
        yield CounterMetricFamily(
            f"{ns}_fallbacks",
            "Disaggregated requests served aggregated after their prefill leg failed.",
            value=self.fallbacks,
        )
        blocks = GaugeMetricFamily(
            f"{ns}_router_kv_blocks",
            "KV blocks the router's index holds per worker, from the engines' KV events "
            "(as of the last scrape; router_mode='kv' only).",
            labels=("worker_id",),
        )
        for worker, count in sorted(self.kv_blocks.items()):
            blocks.add_metric((str(worker),), count)
        yield blocks
        yield GaugeMetricFamily(
            f"{ns}_requests_queued",
            "Requests waiting in the frontend for a worker slot (every worker at its limit).",
            value=self.queued,
        )
        yield CounterMetricFamily(
            f"{ns}_requests_shed",
            "Requests answered 429 because the queue was full or they were sheddable.",
            value=self.shed,
        )
        yield CounterMetricFamily(
            f"{ns}_streams_stalled",
            "Streams that made no progress within first_token_timeout or engine_idle_timeout.",
            value=self.stalls,
        )
        booked = GaugeMetricFamily(
            f"{ns}_router_booked_requests",
            "Requests the router counts on each worker now (as of the last scrape): running "
            "here, or booked by the route-only API or a gateway's picks until released.",
            labels=("worker_id",),
        )
        for worker, count in sorted(self.booked_requests.items()):
            booked.add_metric((str(worker),), count)
        yield booked
        ejected = GaugeMetricFamily(
            f"{ns}_worker_ejected_seconds",
            "Seconds left of each ejected worker's time out of routing (outlier ejection).",
            labels=("worker_id",),
        )
        for worker, left in sorted(self.ejected.items()):
            ejected.add_metric((str(worker),), left)
        yield ejected
        transitions = CounterMetricFamily(
            f"{ns}_transitions",
            "Request state-machine transitions, by edge.",
            labels=("src", "dst", "trigger"),
        )
        for (src, dst, trigger), count in sorted(self.transitions.items()):
            transitions.add_metric((src, dst, trigger), count)
        yield transitions

    def describe(self) -> list[Any]:
        return []
