"""`serve_worker`: put any `Engine` behind a TCP listener that speaks the worker protocol."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from ..._errors import EngineError, RequestError, WorkerRefused
from ...processing import tokenizer_fingerprint
from ...wire import WorkerLeft
from ...wire._frames import (
    MAX_FRAME_SIZE,
    SUPPORTED_VERSIONS,
    Broken,
    Cancel,
    Goodbye,
    Hello,
    Output,
    ProtocolError,
    Refused,
    SnapshotReply,
    SnapshotRequest,
    Start,
    Welcome,
    WorkerCapacity,
    encode_frame,
    frame_tag,
)
from .._protocol import Engine
from ._connection import GOODBYE_TIMEOUT, FrameConnection

_logger = logging.getLogger("interlock.engines.remote")


@attrs.frozen
class WorkerAddress:
    """Where `serve_worker` listens (the port the OS chose when asked for port 0)."""

    host: str
    port: int


class WorkerDrain:
    """A worker's drain, for `serve_worker`'s ``drain``: `start` withdraws the worker from
    routing (every connected frontend gets `WorkerLeft`; later handshakes say
    ``registered=False``) and refuses every new stream (a ``refused`` frame, which the frontend
    treats as `WorkerRefused`), while the streams running carry on; `wait_idle` waits for
    them. ``interlock worker`` drains on SIGTERM (docs/operations.md, "Draining")."""

    def __init__(self) -> None:
        #: `start` was called.
        self.draining = False
        #: Streams running now.
        self.in_flight = 0
        #: Streams that ended by themselves while draining, and new ones refused.
        self.finished = 0
        self.refused = 0
        self._idle = trio.Event()
        self._hub: _Hub | None = None

    def start(self) -> None:
        """Withdraw from routing and refuse new streams (again: nothing). Never blocks."""
        if self.draining:
            return
        self.draining = True
        if self.in_flight == 0:
            self._idle.set()
        if self._hub is not None:
            self._hub.publish(WorkerLeft(self._hub.engine.instance_id))

    async def wait_idle(self) -> None:
        """Wait until draining and no stream is running."""
        await self._idle.wait()

    async def say_goodbye(self) -> None:
        """Send every connected frontend what is queued for it and a goodbye (at most
        ``GOODBYE_TIMEOUT`` seconds, all at once), so that the last outputs of the streams
        that finished arrive before the connection closes."""
        hub = self._hub
        if hub is None:
            return
        reason = f"worker {hub.engine.instance_id} is shutting down"
        async with trio.open_nursery() as nursery:
            for session in list(hub.sessions):
                nursery.start_soon(session.conn.goodbye, reason)

    def _stream_started(self) -> None:
        self.in_flight += 1

    def _stream_ended(self) -> None:
        self.in_flight -= 1
        if self.draining:
            self.finished += 1
            if self.in_flight == 0:
                self._idle.set()


async def serve_worker(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    handshake_timeout: float = 10.0,
    max_frame_size: int = MAX_FRAME_SIZE,
    drain: WorkerDrain | None = None,
    task_status: trio.TaskStatus[WorkerAddress] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``engine`` and serve it to frontends (`RemoteEngine`) on ``host:port`` until
    cancelled.

    Starts ``engine.run``, listens, then calls ``task_status.started(WorkerAddress)``. Any
    number of frontends may connect; each gets every event the engine publishes from its
    handshake on. Each started stream runs in its own task; a cancel frame, or the frontend
    disconnecting, cancels it, which frees the engine's slot. A connection that breaks the
    protocol (or sends no hello within ``handshake_timeout``) is closed with the reason
    logged; the others carry on. ``drain`` (a `WorkerDrain`) counts the streams and, once
    started, refuses new ones.

    Raises:
        OSError: cannot listen on ``host:port``.
    """
    hub = _Hub(engine, handshake_timeout=handshake_timeout, max_frame_size=max_frame_size)
    hub.drain = drain if drain is not None else WorkerDrain()
    hub.drain._hub = hub
    # Listen first, so that a port in use raises OSError itself, not inside a group.
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    address = WorkerAddress(host=bound[0], port=bound[1])
    remove = engine.add_listener(hub.publish)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_run_engine, engine)
            await nursery.start(trio.serve_listeners, hub.handle_connection, listeners)
            _logger.info(
                "worker %d (%s) listening on %s:%d",
                engine.instance_id,
                engine.role,
                address.host,
                address.port,
            )
            task_status.started(address)
    finally:
        remove()
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def _run_engine(engine: Engine, *, task_status: trio.TaskStatus[None]) -> None:
    await engine.run(task_status=task_status)


class _Hub:
    """The engine's side of every connection: handshakes, and one encoding of each event
    fanned out to every connected frontend."""

    def __init__(self, engine: Engine, *, handshake_timeout: float, max_frame_size: int) -> None:
        self.engine = engine
        self.handshake_timeout = handshake_timeout
        self.max_frame_size = max_frame_size
        self.sessions: set[_Session] = set()
        self.drain = WorkerDrain()

    def publish(self, event: Any) -> None:
        if not self.sessions:
            return
        if frame_tag(event) is None:
            _logger.debug("not forwarding %r: the worker protocol does not carry it", event)
            return
        frame = encode_frame(event, max_frame_size=self.max_frame_size)
        for session in self.sessions:
            session.conn.send_frame_nowait(frame)

    def welcome(self, version: int) -> Welcome:
        engine = self.engine
        tokenizer = getattr(engine, "tokenizer", None)
        return Welcome(
            version=version,
            worker_id=engine.instance_id,
            role=engine.role,
            block_size=getattr(engine, "block_size", None),
            capacity=WorkerCapacity(
                kv_blocks=getattr(engine, "num_gpu_blocks", None),
                max_num_seqs=getattr(engine, "max_num_seqs", None),
            ),
            registered=getattr(engine, "registered", True) and not self.drain.draining,
            vocab_size=_vocab_size(engine),
            tokenizer=None if tokenizer is None else tokenizer_fingerprint(tokenizer),
        )

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        conn = FrameConnection(stream, f"frontend {peer}", max_frame_size=self.max_frame_size)
        try:
            hello = await self._handshake(conn)
            if hello is None:
                return
            version = max(set(hello.versions) & set(SUPPORTED_VERSIONS))
            _logger.info("frontend %s connected (%s)", peer, hello.client or "unnamed")
            async with trio.open_nursery() as tasks:
                session = _Session(self.engine, conn, tasks, self.drain)
                conn.send_nowait(self.welcome(version))
                # From here on the frontend gets every event, after the welcome.
                self.sessions.add(session)
                try:
                    reason = await conn.serve(session.on_message)
                finally:
                    self.sessions.discard(session)
                    # Its streams end with it, freeing their slots in the engine.
                    tasks.cancel_scope.cancel()
            _logger.info("frontend %s disconnected: %s", peer, reason)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            _logger.info("frontend %s disconnected during the handshake: %s", peer, exc)
        except Exception:
            # A bug here must cost one connection, not the worker.
            _logger.exception("closing the connection of frontend %s after an error", peer)
        finally:
            await conn.aclose()

    async def _handshake(self, conn: FrameConnection) -> Hello | None:
        """The frontend's hello (naming a version both speak), or None after refusing the
        connection."""
        try:
            with trio.fail_after(self.handshake_timeout):
                hello = await conn.receive()
            if type(hello) is not Hello:
                raise ProtocolError(f"the first frame must be 'hello', got {frame_tag(hello)!r}")
        except trio.TooSlowError:
            reason = f"no hello within {self.handshake_timeout}s"
        except ProtocolError as exc:
            reason = str(exc)
        else:
            if set(hello.versions) & set(SUPPORTED_VERSIONS):
                return hello
            reason = (
                f"no common protocol version: the frontend speaks {list(hello.versions)}, this "
                f"worker speaks {list(SUPPORTED_VERSIONS)}"
            )
        _logger.warning("refusing %s: %s", conn.peer, reason)
        with trio.move_on_after(GOODBYE_TIMEOUT):
            await conn.stream.send_all(encode_frame(Goodbye(reason=reason)))
        return None


def _vocab_size(engine: Engine) -> int | None:
    """How many token ids ``engine`` may generate: one past the largest of its token pool,
    else its ``vocab_size``; None when it says neither."""
    pool: Any = getattr(engine, "token_pool", None)
    if pool:
        return int(max(pool)) + 1
    size: Any = getattr(engine, "vocab_size", None)
    return size if type(size) is int else None


class _Session:
    """One frontend's connection: its open streams by id."""

    def __init__(
        self, engine: Engine, conn: FrameConnection, tasks: trio.Nursery, drain: WorkerDrain
    ) -> None:
        self.engine = engine
        self.conn = conn
        self.tasks = tasks
        self.drain = drain
        self.streams: dict[int, trio.CancelScope] = {}

    def on_message(self, message: Any) -> None:
        kind = type(message)
        if kind is Start:
            stream_id = message.stream
            if stream_id in self.streams:
                raise ProtocolError(f"stream {stream_id} was started twice")
            if self.drain.draining:
                # The frontend takes a refusal as `WorkerRefused`: another worker may take it.
                self.drain.refused += 1
                self.conn.send_nowait(
                    Refused(
                        stream=stream_id,
                        message=f"worker {self.engine.instance_id} is draining (shutting "
                        "down) and takes no new requests",
                    )
                )
                return
            scope = self.streams[stream_id] = trio.CancelScope()
            self.drain._stream_started()  # counted at once: a drain starting now waits for it
            self.tasks.start_soon(self._run_stream, stream_id, message.request, scope)
        elif kind is Cancel:
            running = self.streams.get(message.stream)
            if running is not None:
                running.cancel()
        elif kind is SnapshotRequest:
            self.tasks.start_soon(self._send_snapshot, message.token)
        else:
            raise ProtocolError(f"a frontend does not send {frame_tag(message)!r} frames")

    async def _run_stream(self, stream_id: int, request: Any, scope: trio.CancelScope) -> None:
        send = self.conn.send_nowait
        try:
            with scope:
                try:
                    async with self.engine.open_stream(request) as outputs:
                        async for output in outputs:
                            send(Output(stream=stream_id, output=output))
                            if output.finish_reason is not None:
                                return
                    send(Broken(stream=stream_id, message="the engine ended the stream early"))
                except (WorkerRefused, RequestError) as exc:
                    # A request this worker cannot fit (say, longer than its context) is
                    # refused here; another worker may take it.
                    send(Refused(stream=stream_id, message=str(exc)))
                except EngineError as exc:
                    send(Broken(stream=stream_id, message=str(exc)))
                except Exception as exc:
                    _logger.exception("stream %d of %s failed", stream_id, self.conn.peer)
                    send(Broken(stream=stream_id, message=f"{type(exc).__name__}: {exc}"))
        finally:
            self.streams.pop(stream_id, None)
            self.drain._stream_ended()

    async def _send_snapshot(self, token: int) -> None:
        snapshot = await self.engine.snapshot()
        self.conn.send_nowait(SnapshotReply(token=token, snapshot=snapshot))


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "(unknown)"
    return f"{host}:{port}"
