"""interlock as a Gateway API Inference Extension endpoint picker (EPP) over Envoy's ext_proc.

- `ExtProcPicker`: answers one ext_proc stream per HTTP request the gateway forwards: picks
  the endpoint (KV-aware, with the frontend's preprocessing and the pipeline's router), books
  the request's load until the response ends, passes the bodies through. Its module docstring
  (`interlock.gateway._picker`) describes every phase, header and status.
- `serve_ext_proc`: serve a picker (and gRPC health) over h2c (or TLS) from this trio run,
  HTTP/2 by h2 on trio sockets, no thread (``interlock route --ext-proc-port``).
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
from ._server import EXT_PROC_SERVICE, serve_ext_proc

__all__ = [
    "BODY_CHUNK_BYTES",
    "DESTINATION_HEADER",
    "EXT_PROC_SERVICE",
    "PREFILLER_HEADER",
    "SERVED_TEST_HEADER",
    "ExtProcPicker",
    "endpoint_of",
    "http_endpoints",
    "match_endpoints",
    "serve_ext_proc",
]
