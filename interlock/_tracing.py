"""OpenTelemetry spans for the pipeline's requests, made from their transition records.

`RequestTracing` is a `TransitionSink` the pipeline always installs. It follows each request
that has a *recording* parent span (the HTTP layer's SERVER span, or an embedder's own span
current when ``generate`` starts): each transition becomes a span event on that parent, and
each engine leg (``start_prefill`` / ``start_decode`` up to its end) a CLIENT span named after
the GenAI semantic conventions (``chat {model}``, ``text_completion {model}``). A request with
no recording parent (no SDK configured: the API's no-op tracer) costs one dict look-up per
transition and nothing per token.

Why transitions and explicit span objects: a span made current across a ``yield`` of an async
generator (the pipeline's ``generate``, an SSE body) and ended in another task breaks
OpenTelemetry's context ("Failed to detach context") and leaks the span as current. Here no
context is ever attached: spans are started with an explicit parent and ended explicitly.

The open leg span of a request is also kept by request id so that an engine speaking HTTP can
put its W3C ``traceparent`` on the request it sends (`inject_trace_headers`).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, Final
from urllib.parse import urlsplit

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from .statemachines import TransitionRecord
from .wire import RoutingDecision

__all__ = [
    "LEG_ATTRIBUTE",
    "TTFT_ATTRIBUTE",
    "RequestTracing",
    "describe_request",
    "inject_trace_headers",
]

#: vLLM-compatible request latency attributes (seconds), on the request's span.
TTFT_ATTRIBUTE: Final = "gen_ai.latency.time_to_first_token"
E2E_ATTRIBUTE: Final = "gen_ai.latency.e2e"
QUEUE_ATTRIBUTE: Final = "gen_ai.latency.time_in_queue"
#: ``agg``, ``prefill`` or ``decode`` on each engine leg's span.
LEG_ATTRIBUTE: Final = "interlock.leg"

_TERMINAL: Final = frozenset({"done", "failed", "cancelled"})

#: Request id -> its open leg span, for `inject_trace_headers` (every `RequestTracing`
#: shares it: request ids are unique among a process's running requests, as the HTTP layer
#: makes them; two pipelines reusing one id at once would at worst swap a traceparent).
_OPEN_LEGS: dict[str, Span] = {}


def inject_trace_headers(headers: MutableMapping[str, str], request_id: str | None) -> None:
    """Add the W3C ``traceparent`` (and ``tracestate``) of ``request_id``'s open engine leg
    to ``headers``; nothing when the request is not traced. Never raises."""
    if not _OPEN_LEGS or request_id is None:
        return
    span = _OPEN_LEGS.get(request_id)
    if span is not None:
        propagate.inject(headers, context=trace.set_span_in_context(span))


def describe_request(
    tracing: RequestTracing | None, request_id: str, parent: Span, operation: str, model: str
) -> None:
    """Trace ``request_id`` under ``parent`` (when it records), its legs named
    ``{operation} {model}``. Call before the request's first transition."""
    if tracing is not None and parent.is_recording():
        tracing.requests[request_id] = _Traced(parent, operation, model)


class _Traced:
    """What the sink keeps about one traced request."""

    __slots__ = ("leg", "leg_kind", "model", "operation", "parent", "prompt_tokens")

    def __init__(self, parent: Span, operation: str, model: str | None) -> None:
        self.parent = parent
        self.operation = operation
        self.model = model
        self.leg: Span | None = None
        self.leg_kind = "agg"
        self.prompt_tokens: int | None = None


class RequestTracing:
    """Spans and span events for traced requests (see the module docstring).

    ``tracer_provider``: where spans go; None uses the global one (`opentelemetry.trace`),
    which does nothing until an SDK is configured. ``engine_of`` finds a worker's engine by
    id (for ``server.address`` and ``gen_ai.system`` on its legs). ``offer`` never blocks or
    raises.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        engine_of: Callable[[int], Any] | None = None,
    ) -> None:
        self.tracer: Tracer = trace.get_tracer("interlock", tracer_provider=tracer_provider)
        self.engine_of = engine_of
        #: Traced requests in flight, by request id.
        self.requests: dict[str, _Traced] = {}

    def forget(self, request_id: str) -> None:
        """Stop tracing ``request_id`` (it ended, or never started in the pipeline): end its
        open leg span, if any. Its terminal transition does this too; unknown ids are fine."""
        traced = self.requests.pop(request_id, None)
        if traced is not None:
            self._end_leg(traced, request_id)

    def queued(self, request_id: str, seconds: float) -> None:
        """Record how long ``request_id`` waited for a worker slot (a pipeline hook)."""
        traced = self.requests.get(request_id)
        if traced is not None:
            traced.parent.set_attribute(QUEUE_ATTRIBUTE, seconds)

    # -- TransitionSink ---------------------------------------------------------------------

    def offer(self, record: TransitionRecord) -> None:
        traced = self.requests.get(record.request_id)
        if traced is None:
            if record.trigger != "preprocess":
                return
            # An embedder's own span, current as generate() starts (never attached by us).
            parent = trace.get_current_span()
            if not parent.is_recording():
                return
            traced = self.requests[record.request_id] = _Traced(parent, "text_completion", None)
        try:
            self._apply(traced, record)
        except Exception:  # a sink must never take the pipeline down
            pass
        if record.dst in _TERMINAL:
            self._end_leg(traced, record.request_id)
            del self.requests[record.request_id]

    def _apply(self, traced: _Traced, record: TransitionRecord) -> None:
        trigger = record.trigger
        attributes: dict[str, Any] = {
            "interlock.from": record.src,
            "interlock.to": record.dst,
        }
        if record.worker_id is not None:
            attributes["interlock.worker_id"] = record.worker_id
        if record.detail:
            attributes["interlock.detail"] = record.detail
        decision = record.decision
        if type(decision) is RoutingDecision:
            attributes["interlock.disaggregated"] = decision.disaggregated
            if decision.prefill_worker_id is not None:
                attributes["interlock.prefill_worker_id"] = decision.prefill_worker_id
            if decision.split_reason:
                attributes["interlock.split_reason"] = decision.split_reason
            traced.prompt_tokens = len(decision.token_ids)
        error_type = _error_type(record)
        if error_type is not None:
            attributes["error.type"] = error_type
        traced.parent.add_event(str(trigger), attributes)
        if trigger == "start_prefill":
            self._start_leg(traced, record, "prefill")
        elif trigger == "start_decode":
            self._start_leg(traced, record, "decode" if record.src == "prefilled" else "agg")
        elif trigger == "finish_prefill":
            self._end_leg(traced, record.request_id)
        elif trigger in ("fall_back", "migrate", "fail"):
            self._end_leg(traced, record.request_id, error_type or "WorkerGone", record.detail)
            if trigger == "fail":
                traced.parent.set_attribute("error.type", error_type or "error")
                traced.parent.set_status(Status(StatusCode.ERROR, record.detail))

    def _start_leg(self, traced: _Traced, record: TransitionRecord, kind: str) -> None:
        self._end_leg(traced, record.request_id)
        operation = traced.operation
        name = f"{operation} {traced.model}" if traced.model else operation
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            LEG_ATTRIBUTE: kind,
        }
        if traced.model:
            attributes["gen_ai.request.model"] = traced.model
        if record.worker_id is not None:
            attributes["interlock.worker_id"] = record.worker_id
            attributes.update(_engine_attributes(self.engine_of, record.worker_id))
        if traced.prompt_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = traced.prompt_tokens
        span = self.tracer.start_span(
            name,
            context=trace.set_span_in_context(traced.parent),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        traced.leg = span
        traced.leg_kind = kind
        _OPEN_LEGS[record.request_id] = span

    def _end_leg(
        self,
        traced: _Traced,
        request_id: str,
        error_type: str | None = None,
        detail: str | None = None,
    ) -> None:
        span = traced.leg
        if span is None:
            return
        traced.leg = None
        if _OPEN_LEGS.get(request_id) is span:
            del _OPEN_LEGS[request_id]
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, detail))
        span.end()


def _error_type(record: TransitionRecord) -> str | None:
    """The exception type behind a failed, migrated or fallen-back transition."""
    decision = record.decision
    if isinstance(decision, dict) and isinstance(decision.get("error"), str):
        return decision["error"]
    detail = record.detail
    if record.trigger in ("fail", "migrate", "fall_back") and detail:
        head = detail.split(":", 1)[0]
        if head.isidentifier():
            return head
    return None


def _engine_attributes(engine_of: Callable[[int], Any] | None, worker_id: int) -> dict[str, Any]:
    engine = engine_of(worker_id) if engine_of is not None else None
    if engine is None:
        return {"gen_ai.system": "interlock"}
    base_url = getattr(engine, "base_url", None)
    if isinstance(base_url, str):
        parts = urlsplit(base_url)
        attributes: dict[str, Any] = {"gen_ai.system": "openai", "server.address": parts.hostname}
        if parts.port is not None:
            attributes["server.port"] = parts.port
        return attributes
    host = getattr(engine, "host", None)
    if isinstance(host, str):
        attributes = {"gen_ai.system": "interlock", "server.address": host}
        port = getattr(engine, "port", None)
        if isinstance(port, int):
            attributes["server.port"] = port
        return attributes
    return {"gen_ai.system": "interlock"}
