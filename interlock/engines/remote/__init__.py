"""Workers in other processes: `RemoteEngine` (the frontend's client), `serve_worker` (the
worker's server), and the ``interlock worker`` command. The protocol is in docs/wire-protocol.md;
its messages and frame codec are in `interlock.wire`. `WorkerMismatch`, `TokenizerMismatch`
and `WorkerUnreachable` belong to every engine kind (`interlock.engines`); they are here too,
where they were first. `WorkerAuthError` is a failed shared-secret handshake,
`WorkerTLSError` a failed TLS one; `server_context` and `client_context` make the TLS
contexts of `serve_worker` and `RemoteEngine`."""

from .._protocol import TokenizerMismatch, WorkerMismatch, WorkerUnreachable
from ._auth import WorkerAuthError
from ._cli import add_parser
from ._client import RemoteEngine
from ._server import WorkerAddress, serve_worker
from ._tls import WorkerTLSError, client_context, server_context

__all__ = [
    "RemoteEngine",
    "TokenizerMismatch",
    "WorkerAddress",
    "WorkerAuthError",
    "WorkerMismatch",
    "WorkerTLSError",
    "WorkerUnreachable",
    "add_parser",
    "client_context",
    "serve_worker",
    "server_context",
]
