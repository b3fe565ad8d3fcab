"""The SERVER span of each generation request (OpenTelemetry), around its raw ASGI endpoint.

The span is started with an explicit parent (the caller's W3C ``traceparent``, if any) and
ended explicitly when the endpoint returns; it is current only inside the endpoint's own
coroutine (`trace.use_span`), which attaches and detaches the context in one task and never
across a ``yield``. The pipeline's `RequestTracing` hangs the engine legs and transition
events below it.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Final
from urllib.parse import urlsplit

import trio
from opentelemetry import propagate, trace
from opentelemetry.trace import ProxyTracer, SpanKind, Status, StatusCode, Tracer

from .._errors import ConfigError
from .._tracing import E2E_ATTRIBUTE

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Endpoint = Callable[[Scope, Receive, Send], Awaitable[None]]

_logger = logging.getLogger("interlock.http")

_TRACE_HEADERS: Final = frozenset({b"traceparent", b"tracestate", b"baggage"})


class TracedEndpoint:
    """``endpoint`` (a raw ASGI callable serving ``POST route``) inside a SERVER span.

    Attributes: ``http.request.method``, ``http.route``, ``url.path``,
    ``http.response.status_code``, ``gen_ai.operation.name``, ``gen_ai.request.model`` (``model``;
    the endpoint sets the name its request's client sent, and ``gen_ai.response.model``, the
    model that ran),
    ``x_request_id`` (the caller's ``x-request-id`` header, as Dynamo names it) and
    ``gen_ai.latency.e2e``. A 5xx answer or an exception sets the status to ERROR.
    """

    def __init__(
        self, endpoint: Endpoint, tracer: Tracer, *, route: str, operation: str, model: str
    ) -> None:
        self.endpoint = endpoint
        self.tracer = tracer
        self.route = route
        self.name = f"POST {route}"
        self.attributes: dict[str, Any] = {
            "http.request.method": "POST",
            "http.route": route,
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if type(self.tracer) is ProxyTracer and not getattr(trace, "_TRACER_PROVIDER", True):
            # The global tracer while no provider is installed: its every span is the API's
            # no-op one, so none is made (the span and the header scan, a coroutine frame
            # less). The test is the proxy's own (opentelemetry.trace.ProxyTracer._tracer);
            # get_tracer_provider() would look the environment up, which costs as much as the
            # span. Should the name go away, every request takes the whole path.
            await self.endpoint(scope, receive, send)
            return
        carrier: dict[str, str] = {}
        request_id = None
        for key, value in scope["headers"]:
            if key in _TRACE_HEADERS:
                carrier[key.decode("latin-1")] = value.decode("latin-1")
            elif key == b"x-request-id":
                request_id = value.decode("latin-1")
        parent = propagate.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            self.name, context=parent, kind=SpanKind.SERVER, attributes=self.attributes
        )
        if not span.is_recording():
            await self.endpoint(scope, receive, send)
            return
        span.set_attribute("url.path", scope.get("path", self.route))
        if request_id is not None:
            span.set_attribute("x_request_id", request_id)
        status = 0

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = trio.current_time()
        try:
            with trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                await self.endpoint(scope, receive, send_and_watch)
        except BaseException as exc:
            if not isinstance(exc, trio.Cancelled):
                span.record_exception(exc)
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            span.set_attribute(E2E_ATTRIBUTE, trio.current_time() - start)
            if status:
                span.set_attribute("http.response.status_code", status)
            marked = getattr(getattr(span, "status", None), "status_code", None)
            if status >= 500 and marked is not StatusCode.ERROR:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
            span.end()


#: The environment variables that turn on OTLP export without ``--otlp-endpoint``.
OTLP_ENV: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def configure_otlp(endpoint: str | None, environ: Mapping[str, str]) -> Callable[[], None] | None:
    """Install the OpenTelemetry SDK's global tracer provider with a batching OTLP/HTTP span
    exporter, for ``interlock serve``.

    ``endpoint`` (``--otlp-endpoint``) is the collector's base URL (``http://host:4318``;
    ``/v1/traces`` is added unless the URL has a path) and wins over the standard variables
    (`OTLP_ENV`), which are read by the exporter itself. ``OTEL_SERVICE_NAME`` names the
    service (default ``interlock``); ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``
    choose the sampler (default: parent-based, always on).

    Returns the function that flushes and shuts the provider down, or None when neither the
    flag nor the variables ask for export (tracing stays the API's no-op, or whatever provider
    an embedder installed).

    Without the ``otel`` extra, the variables alone only log a warning (they may be meant for
    other programs).

    Raises:
        ConfigError: ``endpoint`` was given but the ``otel`` extra is not installed.
    """
    if endpoint is None and not any(environ.get(name) for name in OTLP_ENV):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        if "InstrumentationScope" in str(exc):
            raise ConfigError(_clobbered_protos(exc), knobs=("otlp_endpoint",)) from None
        missing = f"the SDK and OTLP exporter are not installed ({exc.name} is missing)"
        if endpoint is None:
            # The variables may be set for other programs on the machine: say it, go on.
            _logger.warning(
                "%s is set but %s: no traces are exported; pip install 'interlock[otel]'",
                " or ".join(name for name in OTLP_ENV if environ.get(name)),
                missing,
            )
            return None
        raise ConfigError(
            f"--otlp-endpoint asks for OpenTelemetry trace export, but {missing}: "
            "pip install 'interlock[otel]', or drop --otlp-endpoint",
            knobs=("otlp_endpoint",),
        ) from None
    if endpoint is not None and not urlsplit(endpoint).path.strip("/"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": "interlock"}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    return provider.shutdown


def _clobbered_protos(exc: ImportError) -> str:
    """What to do when opentelemetry-proto's modules are the stale copies xds-protos ships."""
    try:
        version = f"=={importlib.metadata.version('opentelemetry-proto')}"
    except importlib.metadata.PackageNotFoundError:
        version = ""
    return (
        f"the OTLP exporter cannot load opentelemetry-proto's modules ({exc}): xds-protos (the "
        "Envoy messages of interlock's gateway) installs an old copy of them over "
        "opentelemetry-proto's (grpc/grpc#42429). Put them back: pip install "
        f"--force-reinstall --no-deps 'opentelemetry-proto{version}' (docs/operations.md, "
        "Tracing)"
    )
