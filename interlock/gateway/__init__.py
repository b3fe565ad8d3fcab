"""interlock as a Gateway API Inference Extension endpoint picker (EPP) over Envoy's ext_proc.

- `ExtProcPicker`: answers one ext_proc stream per HTTP request the gateway forwards: picks
  the endpoint (KV-aware, with the frontend's preprocessing and the pipeline's router), books
  the request's load until the response ends, passes the bodies through. Its module docstring
  (`interlock.gateway._picker`) describes every phase, header and status.
- `ext_proc_app` / `health_app`: the gRPC services as ASGI apps (connectrpc);
  `serve_ext_proc`: serve one over h2c in this trio run (``interlock route --ext-proc-port``).
- `endpoint_of` / `http_endpoints`: the ``host:port`` a gateway reaches a worker at.
"""

from ._endpoints import endpoint_of, http_endpoints, match_endpoints
from ._picker import (
    BODY_CHUNK_BYTES,
    DESTINATION_HEADER,
    PREFILLER_HEADER,
    SERVED_TEST_HEADER,
    ExtProcPicker,
)
from ._server import EXT_PROC_SERVICE, ext_proc_app, health_app, serve_ext_proc

__all__ = [
    "BODY_CHUNK_BYTES",
    "DESTINATION_HEADER",
    "EXT_PROC_SERVICE",
    "PREFILLER_HEADER",
    "SERVED_TEST_HEADER",
    "ExtProcPicker",
    "endpoint_of",
    "ext_proc_app",
    "health_app",
    "http_endpoints",
    "match_endpoints",
    "serve_ext_proc",
]
