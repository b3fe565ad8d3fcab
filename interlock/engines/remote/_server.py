"""`serve_worker`: put any `Engine` behind a TCP listener that speaks the worker protocol."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import ssl
from typing import Any

import attrs
import trio

from ..._errors import EngineError, RequestError, WorkerRefused
from ...processing import tokenizer_fingerprint
from ...wire import EngineOutput, WorkerLeft
from ...wire._frames import (
    AUTH_VERSION,
    HEARTBEAT_VERSION,
    MAX_FRAME_SIZE,
    OUTPUTS_VERSION,
    SUPPORTED_VERSIONS,
    Auth,
    Broken,
    Cancel,
    Challenge,
    Goodbye,
    Hello,
    Ping,
    Pong,
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
from ...wire._output import join_outputs
from .._protocol import Engine
from ._auth import NONCE_BYTES, check_secret, frontend_proof, new_nonce, proofs_match, worker_proof
from ._connection import GOODBYE_TIMEOUT, FrameConnection, set_keepalive
from ._tls import NOT_TLS, ssl_failure, wrap

_logger = logging.getLogger("interlock.engines.remote")

_PLAINTEXT_REFUSAL = (
    "this worker speaks only TLS (it runs with --tls-cert-file): give the frontend "
    "--worker-tls, and --worker-ca-file with the CA that signed the worker's certificate"
)


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
    secret: bytes | str | None = None,
    tls: ssl.SSLContext | None = None,
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
    started, refuses new ones. With a ``secret`` (at least 16 bytes), only a frontend that
    proves it knows the same secret gets a welcome (docs/wire-protocol.md); the others get a
    `Goodbye` saying why. With ``tls`` (a server context, from
    `interlock.engines.remote.server_context`), every connection is TLS: a client whose TLS
    handshake fails (or does not finish within ``handshake_timeout``) is logged and
    disconnected, and the secret's handshake, if any, runs inside TLS. Every accepted
    socket has TCP keepalive on.

    Raises:
        OSError: cannot listen on ``host:port``.
        ConfigError: ``secret`` is too short.
    """
    hub = _Hub(
        engine,
        handshake_timeout=handshake_timeout,
        max_frame_size=max_frame_size,
        secret=None if secret is None else check_secret(secret),
        tls=tls,
    )
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

    def __init__(
        self,
        engine: Engine,
        *,
        handshake_timeout: float,
        max_frame_size: int,
        secret: bytes | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.engine = engine
        self.handshake_timeout = handshake_timeout
        self.max_frame_size = max_frame_size
        self.secret = secret
        self.tls = tls
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

    def welcome(self, version: int, proof: bytes | None = None) -> Welcome:
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
            proof=proof,
        )

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        peer = _peer_name(stream)
        set_keepalive(stream)
        if self.tls is not None:
            try:
                secured = await self._tls_handshake(stream, peer)
            except Exception:
                # As below: a bug here must cost one connection, not the worker.
                _logger.exception("closing the connection of frontend %s after an error", peer)
                secured = None
            if secured is None:
                await trio.aclose_forcefully(stream)
                return
            stream = secured
        conn = FrameConnection(stream, f"frontend {peer}", max_frame_size=self.max_frame_size)
        try:
            accepted = await self._handshake(conn)
            if accepted is None:
                return
            hello, version, proof = accepted
            _logger.info("frontend %s connected (%s)", peer, hello.client or "unnamed")
            # A version-3 frontend gets the outputs queued between two writes in one frame.
            conn.batch_outputs = version >= OUTPUTS_VERSION
            async with trio.open_nursery() as tasks:
                session = _Session(self.engine, conn, tasks, self.drain, version)
                conn.send_nowait(self.welcome(version, proof))
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

    async def _tls_handshake(
        self, stream: trio.abc.Stream, peer: str
    ) -> trio.SSLStream[trio.abc.Stream] | None:
        """``stream`` inside TLS, handshake done; None (the reason logged, the socket closed)
        when the client's handshake fails or takes more than ``handshake_timeout``."""
        assert self.tls is not None
        secured = wrap(stream, self.tls)
        try:
            with trio.fail_after(self.handshake_timeout):
                await secured.do_handshake()
            return secured
        except trio.TooSlowError:
            reason = f"no TLS handshake within {self.handshake_timeout}s"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failure = ssl_failure(exc)
            reason = f"TLS handshake failed: {failure or exc or 'the connection closed'}"
            if failure is not None and failure.reason in NOT_TLS:
                reason += " (the frontend does not speak TLS: it needs --worker-tls)"
                # Tell it why in the frames it reads, instead of leaving it to retry a
                # silently closed connection.
                data = encode_frame(Goodbye(reason=_PLAINTEXT_REFUSAL))
            else:
                # trio leaves the TLS alert saying why (e.g. "certificate required") unsent
                # when the handshake fails: send it, so that the frontend can say why too.
                alert = getattr(secured, "_outgoing", None)
                data = alert.read() if isinstance(alert, ssl.MemoryBIO) else b""
            if data:
                with trio.move_on_after(GOODBYE_TIMEOUT):
                    try:
                        await stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        _logger.warning("refusing frontend %s: %s", peer, reason)
        await trio.aclose_forcefully(stream)
        return None

    async def _handshake(self, conn: FrameConnection) -> tuple[Hello, int, bytes | None] | None:
        """The frontend's hello, the version chosen (the highest both speak) and, with a
        secret, this worker's proof for the welcome; None after refusing the connection."""
        try:
            with trio.fail_after(self.handshake_timeout):
                hello = await conn.receive()
                if type(hello) is not Hello:
                    raise ProtocolError(
                        f"the first frame must be 'hello', got {frame_tag(hello)!r}"
                    )
                common = set(hello.versions) & set(SUPPORTED_VERSIONS)
                if not common:
                    raise ProtocolError(
                        f"no common protocol version: the frontend speaks {list(hello.versions)}"
                        f", this worker speaks {list(SUPPORTED_VERSIONS)}"
                    )
                version = max(common)
                proof = None
                if self.secret is not None:
                    proof = await self._authenticate(conn, version)
                return hello, version, proof
        except trio.TooSlowError:
            what = "hello" if self.secret is None else "hello and auth"
            reason = f"no {what} within {self.handshake_timeout}s"
        except ProtocolError as exc:
            reason = str(exc)
        _logger.warning("refusing %s: %s", conn.peer, reason)
        with trio.move_on_after(GOODBYE_TIMEOUT):
            await conn.stream.send_all(encode_frame(Goodbye(reason=reason)))
        return None

    async def _authenticate(self, conn: FrameConnection, version: int) -> bytes:
        """Challenge the frontend; return this worker's proof for the welcome.

        Raises:
            ProtocolError: the frontend does not prove it knows the secret (the reason is
                what it is told).
        """
        assert self.secret is not None
        if version < AUTH_VERSION:
            raise ProtocolError(
                "the worker requires a secret, and this frontend speaks only protocol "
                f"version {version}, from before authentication: upgrade the frontend and "
                "give it the worker's secret (--worker-secret-file PATH or INTERLOCK_WORKER_SECRET)"
            )
        nonce = new_nonce()
        await conn.stream.send_all(encode_frame(Challenge(version=version, nonce=nonce)))
        answer = await conn.receive()
        if type(answer) is Goodbye:
            raise ProtocolError(f"the frontend gave up the handshake: {answer.reason}")
        if type(answer) is not Auth:
            raise ProtocolError(
                f"the worker requires a secret: the answer to 'challenge' must be 'auth', got "
                f"{frame_tag(answer)!r}"
            )
        expected = frontend_proof(self.secret, version, nonce, answer.nonce)
        if len(answer.nonce) != NONCE_BYTES or not proofs_match(expected, answer.proof):
            raise ProtocolError(
                "authentication failed: the frontend's proof does not match this worker's "
                "secret; give the frontend the worker's secret (--worker-secret-file PATH or "
                "INTERLOCK_WORKER_SECRET)"
            )
        return worker_proof(self.secret, version, nonce, answer.nonce)


def _vocab_size(engine: Engine) -> int | None:
    """How many token ids ``engine`` may generate: one past the largest of its token pool,
    else its ``vocab_size``; None when it says neither."""
    pool: Any = getattr(engine, "token_pool", None)
    if pool:
        return int(max(pool)) + 1
    size: Any = getattr(engine, "vocab_size", None)
    return size if type(size) is int else None


#: How much earlier than its deadline a held stream's output may go, so that the streams of a
#: busy connection share `_Session._flush_due`'s wake-ups.
_FLUSH_EARLY = 0.02


class _HeldStream:
    """A held stream's (``Start.hold``) state, shared by its task and `_Session._flush_due`."""

    __slots__ = ("held", "hold", "send_at", "stream_id")

    def __init__(self, stream_id: int, hold: float) -> None:
        self.stream_id = stream_id
        self.hold = hold
        #: The outputs joined since the last send (None: none).
        self.held: EngineOutput | None = None
        #: When what is held goes (-inf until the first output with tokens went: the
        #: frontend's router counts the prefill as done on it; inf once the stream ended).
        self.send_at = -math.inf


class _Session:
    """One frontend's connection: its open streams by id."""

    def __init__(
        self,
        engine: Engine,
        conn: FrameConnection,
        tasks: trio.Nursery,
        drain: WorkerDrain,
        version: int,
    ) -> None:
        self.engine = engine
        self.conn = conn
        self.tasks = tasks
        self.drain = drain
        self.version = version
        self.streams: dict[int, trio.CancelScope] = {}
        #: Held streams' send deadlines, soonest first: ``(deadline, tiebreak, stream)``
        #: (`_flush_due` sends what they hold then; entries of streams sent since are stale).
        self._due: list[tuple[float, int, _HeldStream]] = []
        self._due_ids = itertools.count()
        #: `_flush_due`'s wait until the soonest deadline (None: not started yet).
        self._due_wait: trio.CancelScope | None = None

    def on_message(self, message: Any) -> None:
        kind = type(message)
        if kind is Ping and self.version >= HEARTBEAT_VERSION:
            # Answered here, in the reader, not by the engine: a busy engine still answers
            # while the process runs; a stopped or hung process does not.
            self.conn.send_nowait(Pong(token=message.token))
        elif kind is Start:
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
            if message.hold:
                self.tasks.start_soon(
                    self._run_held_stream, stream_id, message.request, scope, message.hold
                )
            else:
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
        send_output = self.conn.send_output_nowait
        try:
            with scope:
                try:
                    async with self.engine.open_stream(request) as outputs:
                        async for output in outputs:
                            send_output(stream_id, output)
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

    async def _run_held_stream(
        self, stream_id: int, request: Any, scope: trio.CancelScope, hold: float
    ) -> None:
        """`_run_stream` for a frontend that needs only the final result (``Start.hold``):
        the first output with tokens goes at once, later ones are joined and go ``hold``
        seconds after the last send (`_flush_due`, whether or not the engine sends more
        meanwhile), or at once when the engine's output comes later than that, or with the
        last output. So the frontend never waits much longer than ``hold`` or the engine's
        own gap between outputs, whichever is longer. Whatever is held when the engine fails
        goes before the `Broken` (so the frontend keeps it)."""
        send = self.conn.send_nowait
        send_output = self.conn.send_output_nowait
        now = trio.current_time
        state = _HeldStream(stream_id, hold)
        try:
            with scope:
                try:
                    async with self.engine.open_stream(request) as outputs:
                        async for output in outputs:
                            held = state.held
                            if held is not None:
                                joined = join_outputs(held, output)
                                if joined is None:
                                    send_output(stream_id, held)
                                else:
                                    output = joined
                                state.held = None
                            if output.finish_reason is not None:
                                send_output(stream_id, output)
                                return
                            if now() < state.send_at:
                                state.held = output
                                continue
                            send_output(stream_id, output)
                            if output.token_ids:
                                self._send_at(state, now() + hold)
                    self._flush(stream_id, state.held)
                    send(Broken(stream=stream_id, message="the engine ended the stream early"))
                except (WorkerRefused, RequestError) as exc:
                    self._flush(stream_id, state.held)
                    send(Refused(stream=stream_id, message=str(exc)))
                except EngineError as exc:
                    self._flush(stream_id, state.held)
                    send(Broken(stream=stream_id, message=str(exc)))
                except Exception as exc:
                    _logger.exception("stream %d of %s failed", stream_id, self.conn.peer)
                    self._flush(stream_id, state.held)
                    send(Broken(stream=stream_id, message=f"{type(exc).__name__}: {exc}"))
        finally:
            # Its entries in the deadlines are stale from now on.
            state.held = None
            state.send_at = math.inf
            self.streams.pop(stream_id, None)
            self.drain._stream_ended()

    def _send_at(self, state: _HeldStream, deadline: float) -> None:
        """Make ``deadline`` the time `_flush_due` sends what ``state`` holds."""
        state.send_at = deadline
        heapq.heappush(self._due, (deadline, next(self._due_ids), state))
        wait = self._due_wait
        if wait is None:
            self._due_wait = trio.CancelScope(deadline=deadline)
            self.tasks.start_soon(self._flush_due)
        elif deadline < wait.deadline:
            wait.deadline = deadline

    async def _flush_due(self) -> None:
        """Send what held streams hold when their deadlines pass, even if their engines are
        silent then: the frontend must not wait for an engine's next output (after a long
        pause it would see hold + pause of silence and take a live worker for a stalled
        one). One task per connection, not one per stream; runs until the connection ends."""
        due = self._due
        send_output = self.conn.send_output_nowait
        while True:
            assert self._due_wait is not None
            with self._due_wait:
                await trio.sleep_forever()
            now = trio.current_time()
            # Deadlines within _FLUSH_EARLY of now go in this pass: a busy connection's
            # streams share wake-ups (flushing a little early only makes an output smaller).
            horizon = now + _FLUSH_EARLY
            while due and due[0][0] <= horizon:
                deadline, _, state = heapq.heappop(due)
                if state.send_at != deadline:
                    continue  # stale: the stream sent since, or ended
                if state.held is not None:
                    send_output(state.stream_id, state.held)
                    state.held = None
                    # (The wait this moves is over: the next one is set from the heap below.)
                    self._send_at(state, now + state.hold)
                else:
                    # Its hold ends in this pass, early or not: with no entry left in the
                    # deadlines, an output held until send_at would wait for the engine's
                    # next one (hold + the engine's pause of silence: a stall to the frontend).
                    state.send_at = now
            self._due_wait = trio.CancelScope(deadline=due[0][0] if due else math.inf)

    def _flush(self, stream_id: int, held: EngineOutput | None) -> None:
        """Send ``held`` (when there is one) before a stream's error."""
        if held is not None:
            self.conn.send_output_nowait(stream_id, held)

    async def _send_snapshot(self, token: int) -> None:
        snapshot = await self.engine.snapshot()
        self.conn.send_nowait(SnapshotReply(token=token, snapshot=snapshot))


def _peer_name(stream: trio.abc.Stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return "(unknown)"
    return f"{host}:{port}"
