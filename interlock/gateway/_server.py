"""The gRPC side: `ExtProcPicker` served over h2c with connectrpc on Hypercorn's trio worker.

`ext_proc_app` is an ASGI app answering ``envoy.service.ext_proc.v3.ExternalProcessor/Process``
(bidirectional streaming) and ``grpc.health.v1.Health/Check``; `health_app` answers the health
check alone (for ``--ext-proc-health-port``). `serve_ext_proc` serves one in this trio run.
Message classes are xds-protos' and grpcio-health-checking's; no threads.

Health service names (GAIE's EPP): ``liveness`` is SERVING while the process answers;
``readiness``, ``envoy.service.ext_proc.v3.ExternalProcessor`` and ``""`` are SERVING while
the picker can pick (`ExtProcPicker.ready`: not draining, a worker with an HTTP endpoint
registered), NOT_SERVING otherwise; any other name is gRPC NOT_FOUND.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import trio
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_codecs
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from hypercorn.config import Config
from hypercorn.trio import serve

from ._picker import ExtProcPicker

__all__ = ["EXT_PROC_SERVICE", "ext_proc_app", "health_app", "serve_ext_proc"]

EXT_PROC_SERVICE: Final = "envoy.service.ext_proc.v3.ExternalProcessor"
_HEALTH_SERVICE: Final = "grpc.health.v1.Health"
_PROCESS: Final = MethodInfo(
    name="Process",
    service_name=EXT_PROC_SERVICE,
    input=ProcessingRequest,
    output=ProcessingResponse,
    idempotency_level=IdempotencyLevel.UNKNOWN,
    stream_type=StreamType.BIDI_STREAM,
)
_CHECK: Final = MethodInfo(
    name="Check",
    service_name=_HEALTH_SERVICE,
    input=HealthCheckRequest,
    output=HealthCheckResponse,
    idempotency_level=IdempotencyLevel.UNKNOWN,
    stream_type=StreamType.UNARY,
)
_SERVING: Final = HealthCheckResponse.SERVING
_NOT_SERVING: Final = HealthCheckResponse.NOT_SERVING
#: The largest gRPC message accepted: a body chunk Envoy sends stays far below it.
_READ_MAX_BYTES: Final = 64 * 1024 * 1024


class _App(ConnectASGIApplication[ExtProcPicker]):
    """connectrpc's ASGI application over the endpoints given (no generated stubs)."""

    @property
    def path(self) -> str:
        return "/"


def _endpoints(picker: ExtProcPicker, *, process: bool) -> Mapping[str, Endpoint[Any, Any]]:
    async def check(request: HealthCheckRequest, ctx: RequestContext[Any, Any]) -> Any:
        service = request.service
        if service == "liveness":
            return HealthCheckResponse(status=_SERVING)
        if service in ("", "readiness", EXT_PROC_SERVICE):
            return HealthCheckResponse(status=_SERVING if picker.ready else _NOT_SERVING)
        raise ConnectError(Code.NOT_FOUND, f"unknown service {service!r}")

    def process_stream(
        requests: AsyncIterator[ProcessingRequest], ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[ProcessingResponse]:
        # The picker's own generator, not one wrapping it: connectrpc closes what it gets,
        # so the stream's booking is freed when the stream ends, not at garbage collection.
        return picker.process(requests)

    found: dict[str, Endpoint[Any, Any]] = {
        f"/{_HEALTH_SERVICE}/Check": Endpoint.unary(_CHECK, check)
    }
    if process:
        found[f"/{EXT_PROC_SERVICE}/Process"] = Endpoint.bidi_stream(_PROCESS, process_stream)
    return found


def ext_proc_app(picker: ExtProcPicker) -> Any:
    """The ASGI app serving ``picker`` (``.../ExternalProcessor/Process``) and the gRPC
    health check."""
    return _App(
        service=picker,
        endpoints=lambda p: _endpoints(p, process=True),
        codecs=google_protobuf_codecs(),
        compressions=(),
        read_max_bytes=_READ_MAX_BYTES,
    )


def health_app(picker: ExtProcPicker) -> Any:
    """The ASGI app answering only ``grpc.health.v1.Health/Check`` for ``picker``."""
    return _App(
        service=picker,
        endpoints=lambda p: _endpoints(p, process=False),
        codecs=google_protobuf_codecs(),
        compressions=(),
    )


async def serve_ext_proc(
    app: Any,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` (`ext_proc_app` or `health_app`) over h2c (HTTP/2 with prior knowledge,
    as Envoy's gRPC client speaks it) with ``hypercorn.trio.serve`` on ``host:port`` until
    cancelled. Use with ``nursery.start``: it reports the ``host:port`` it listens on
    (``port=0``: a free one).

    Raises:
        OSError: the address cannot be bound.
    """
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.include_server_header = False
    config.loglevel = "WARNING"
    # Every request in flight through the gateway holds its ext_proc stream for its whole life
    # (a long generation), and Envoy multiplexes them over few connections: Hypercorn's 100
    # streams per connection would make it open a connection per hundred requests.
    config.h2_max_concurrent_streams = _MAX_STREAMS
    # A gateway keeps its connection to the picker; an idle one costs nothing.
    config.keep_alive_timeout = _KEEP_ALIVE
    # Hypercorn closes an HTTP/2 connection after 1,000 streams by default, cutting the stream
    # that went over (Envoy answers that request 500, or lets it through unpicked) and every
    # long generation's stream still open on it (their bookings freed early). One stream per
    # request: a gateway's connection serves millions.
    config.keep_alive_max_requests = _MAX_REQUESTS
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(functools.partial(serve, app, config, mode="asgi"))
        task_status.started(binds[0].removeprefix("http://"))


#: Concurrent ext_proc streams per gateway connection.
_MAX_STREAMS: Final = 65_536
#: Seconds an idle gateway connection stays open.
_KEEP_ALIVE: Final = 3600.0
#: Streams one gateway connection may open over its life (no limit in practice).
_MAX_REQUESTS: Final = 2**62
