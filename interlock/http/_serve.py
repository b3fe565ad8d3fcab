"""`serve_http`: run an ASGI app on Hypercorn's trio worker, in the caller's trio run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve


async def serve_http(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    backlog: int = 4096,
    keep_alive_timeout: float = 75.0,
    graceful_timeout: float = 1.0,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled (or ``shutdown_trigger`` returns).

    Use with ``await nursery.start(serve_http, app, host, port)``: it returns once the socket
    listens, with the URL it listens on (``port=0`` picks a free port, and the URL says which).
    Connections are trio ``SocketStream``s, which set ``TCP_NODELAY``: without it a stream's
    small chunks wait for the peer's delayed ACK (about 40 ms each).

    ``keep_alive_timeout`` is generous because load balancers and gateways keep pools of idle
    connections; ``graceful_timeout`` bounds how long open requests get when shutting down.

    Raises:
        OSError: the address cannot be bound (in use, not local).
    """
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.backlog = backlog
    config.keep_alive_timeout = keep_alive_timeout
    config.graceful_timeout = graceful_timeout
    config.accesslog = None
    config.include_server_header = False
    # Hypercorn logs "Running on ..." at INFO; the caller prints its own banner. Errors in the
    # app still reach stderr (there should be none: the app answers every error itself).
    config.loglevel = "WARNING"

    hypercorn_status = _Forward(task_status)
    await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=hypercorn_status)


class _Forward:
    """Hypercorn reports every bound URL; callers want the one."""

    def __init__(self, outer: trio.TaskStatus[str]) -> None:
        self._outer = outer

    def started(self, binds: list[str] | None = None) -> None:
        self._outer.started((binds or [""])[0])
