"""`RemoteEngine`: the `Engine` protocol over one TCP connection to an ``interlock worker``."""

from __future__ import annotations

import collections
import itertools
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import trio

from ..._errors import EngineError, WorkerGone, WorkerRefused
from ...kv import KV_EVENT_TYPES
from ...wire import EngineOutput, PreprocessedRequest, WorkerJoined, WorkerLeft
from ...wire._frames import (
    AUTH_VERSION,
    HEARTBEAT_VERSION,
    HOLD_VERSION,
    MAX_FRAME_SIZE,
    SALT_VERSION,
    SUPPORTED_VERSIONS,
    TAGS,
    Auth,
    Broken,
    Cancel,
    Challenge,
    Goodbye,
    Hello,
    Output,
    Outputs,
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
from ...wire._output import join_outputs, join_waiting
from .._listeners import Listeners
from .._protocol import (
    ROLES,
    EventListener,
    Role,
    TokenizerMismatch,
    WorkerMismatch,
    WorkerSnapshot,
    WorkerUnreachable,
)
from ._auth import (
    NONCE_BYTES,
    WorkerAuthError,
    check_secret,
    frontend_proof,
    new_nonce,
    proofs_match,
    worker_proof,
)
from ._connection import FrameConnection, set_keepalive
from ._tls import FRONTEND_FLAGS, NOT_TLS, WorkerTLSError, ssl_failure, wrap

_logger = logging.getLogger("interlock.engines.remote")

#: The tags of the worker's KV events (`decode_kv_events`).
KV_EVENT_TAGS = tuple(tag for tag, kind in TAGS.items() if kind in KV_EVENT_TYPES)
#: Outputs a stream's queue holds before those that arrive are joined to the last at once.
_JOIN_ON_ARRIVAL = 64


class _Waiter:
    """A snapshot request waiting for its reply."""

    __slots__ = ("done", "error", "snapshot")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.snapshot: WorkerSnapshot | None = None
        self.error: EngineError | None = None


class _Link:
    """One connection's state: its frames and the streams and snapshots open on it."""

    __slots__ = ("conn", "snapshots", "streams", "welcome")

    def __init__(self, conn: FrameConnection, welcome: Welcome) -> None:
        self.conn = conn
        self.welcome = welcome
        self.streams: dict[int, _RemoteStream] = {}
        self.snapshots: dict[int, _Waiter] = {}


class _RemoteStream:
    """The context manager and iterator `RemoteEngine.open_stream` returns.

    Outputs that arrive while the reader of the stream is busy wait in a queue; consecutive
    ones are joined when the reader takes them (`join_waiting`; on arrival once the queue is
    long, `join_outputs`), so a reader that falls behind catches up with one larger output
    instead of one per token.
    """

    __slots__ = (
        "_done",
        "_engine",
        "_id",
        "_items",
        "_link",
        "_request",
        "_wakeup",
        "hold_outputs",
        "received",
    )

    def __init__(self, engine: RemoteEngine, request: PreprocessedRequest) -> None:
        self._engine = engine
        self._request = request
        #: Set before entering (0: off): the reader needs only the final result, so the worker
        #: may keep the outputs after the first with tokens and send them, joined, at most
        #: every ``hold_outputs`` seconds (``Start.hold``; a worker from before protocol
        #: version 4 sends every output, as without it).
        self.hold_outputs = 0.0
        self._link: _Link | None = None
        self._id = -1
        self._done = False
        self._items: collections.deque[EngineOutput | EngineError] = collections.deque()
        #: Set when an item arrives for a reader waiting on an empty queue.
        self._wakeup: trio.Event | None = None
        #: Outputs received from the worker so far (before this side joins any).
        self.received = 0

    async def __aenter__(self) -> AsyncIterator[EngineOutput]:
        engine = self._engine
        link = engine._link
        if link is None or link.conn.closed:
            raise WorkerRefused(
                f"worker {engine.instance_id} at {engine.address} is not connected "
                f"({engine._down_reason}); the engine reconnects in the background",
                worker_id=engine.instance_id,
            )
        if self._request.cache_salt is not None and link.welcome.version < SALT_VERSION:
            # Without the salt, the worker's engine would share this request's cached
            # prefix with other tenants': refused, so the request goes elsewhere or fails.
            raise WorkerRefused(
                f"worker {engine.instance_id} at {engine.address} speaks protocol version "
                f"{link.welcome.version}, which cannot carry cache_salt (version "
                f"{SALT_VERSION} can); upgrade the worker, or send the request without "
                "cache_salt",
                worker_id=engine.instance_id,
            )
        self._id = stream_id = next(engine._stream_ids)
        self._link = link
        hold = self.hold_outputs
        if hold and link.welcome.version >= HOLD_VERSION:
            link.conn.send_nowait(Start(stream=stream_id, request=self._request, hold=hold))
        else:
            link.conn.send_nowait(Start(stream=stream_id, request=self._request))
        link.streams[stream_id] = self
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        link = self._link
        if link is not None and link.streams.pop(self._id, None) is not None:
            # Left before the last frame: the worker frees the slot. Queued, not awaited.
            self._done = True
            link.conn.send_nowait(Cancel(stream=self._id))

    def __aiter__(self) -> AsyncIterator[EngineOutput]:
        return self

    async def __anext__(self) -> EngineOutput:
        if self._done:
            raise StopAsyncIteration
        items = self._items
        if items:
            # A checkpoint, as a channel's receive is: cancellable, and fair to other tasks.
            await trio.lowlevel.checkpoint()
        else:
            wakeup = self._wakeup = trio.Event()
            await wakeup.wait()
        return self._take(items.popleft())

    def receive_nowait(self) -> EngineOutput:
        """The next output if it has arrived, without waiting (or a checkpoint).

        Raises:
            trio.WouldBlock: none is waiting.
            StopAsyncIteration: the stream has ended.
            EngineError: as iterating would.
        """
        if self._done:
            raise StopAsyncIteration
        if not self._items:
            raise trio.WouldBlock
        return self._take(self._items.popleft())

    def fail_waiting(self, exc: EngineError) -> bool:
        """End the reader's wait for the next output with ``exc``, which its `__anext__` then
        raises (the pipeline's `StallWatch`: a stall without a cancel scope per wait).

        Returns False and does nothing when an output or error has already arrived, or the
        stream has ended: the reader takes that instead.
        """
        if self._items or self._done:
            return False
        self._deliver(exc)
        return True

    def _take(self, item: EngineOutput | EngineError) -> EngineOutput:
        items = self._items
        if items and type(item) is EngineOutput and type(items[0]) is EngineOutput:
            # What arrived while the reader was away goes as one output, built once.
            item = join_waiting(item, items)
        if type(item) is not EngineOutput:
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    def _deliver(self, item: EngineOutput | EngineError) -> None:
        items = self._items
        if type(item) is EngineOutput:
            self.received += 1
            # Joined when the reader takes them (`join_waiting`: one output built, not one
            # per join), unless it is far behind: then here, so a stuck reader's backlog
            # stays a few outputs.
            if len(items) >= _JOIN_ON_ARRIVAL:
                last = items[-1]
                if type(last) is EngineOutput:
                    joined = join_outputs(last, item)
                    if joined is not None:
                        items[-1] = joined
                        return
        items.append(item)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()


class RemoteEngine:
    """A worker in another process (``interlock worker``), reached over TCP.

    Implements `Engine`: requests become multiplexed streams on one connection, the worker's
    KV and membership events reach this engine's listeners, and `snapshot` asks the worker.
    ``instance_id``, ``role`` and ``block_size`` are what the worker must report in its
    handshake. ``tokenizer`` (a `interlock.processing.tokenizer_fingerprint`) and
    ``vocab_size`` are the frontend's tokenizer: a worker reporting another fingerprint, or
    no fingerprint while the frontend gives one, or ids beyond ``vocab_size``, is a
    `TokenizerMismatch` (None: not checked; a worker that reports neither, one from before
    these fields, is not checked either).

    `run` connects (retrying with back-off while the worker is not up yet, for at most
    ``connect_timeout`` seconds), then keeps the connection. When the connection is lost,
    every open stream raises `WorkerGone`, listeners get `WorkerLeft`, and the engine
    reconnects in the background (back-off from ``backoff`` up to ``max_backoff`` seconds),
    announcing `WorkerJoined` when the worker is back. Meanwhile `open_stream` raises
    `WorkerRefused`.

    Heartbeat (protocol version 2): every ``heartbeat_interval`` seconds the engine sends a
    ping, which the worker's reader answers at once; a connection on which nothing at all
    arrives for ``heartbeat_timeout`` seconds is dead (a stopped or hung worker process, a
    broken network) and is dropped like a lost one: streams raise `WorkerGone`, the worker
    leaves routing, the engine reconnects. ``heartbeat_interval=None`` turns it off; a
    version-1 worker gets none. The sockets also have TCP keepalive on.

    ``worker_secret`` (bytes or text, at least 16 bytes): the shared secret of workers
    started with one (``interlock worker --secret-file``). The engine proves it knows it
    without sending it, and refuses a worker that cannot prove the same (`WorkerAuthError`).
    ``tls`` (an `ssl.SSLContext`, e.g. `interlock.engines.remote.client_context`): speak
    TLS to the worker (``interlock worker --tls-cert-file``), checking its certificate names
    ``host``; the heartbeat and the secret's handshake run inside it. A TLS failure (a
    certificate the context does not trust, a worker without TLS) raises `WorkerTLSError`.
    ``open_connection(host, port)`` opens the byte stream to the worker (default: TCP).

    ``decode_kv_events=False``: the worker's KV events are skipped undecoded and never reach
    the listeners (for a frontend whose router is not in ``kv`` mode: decoding them would be
    work for nobody). Membership events still arrive.

    ``http_url``: the worker's HTTP surface (``--openai-port``), for a gateway to send its
    requests to; this engine itself speaks the worker protocol only.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        instance_id: int,
        role: Role = "agg",
        block_size: int = 16,
        tokenizer: str | None = None,
        vocab_size: int | None = None,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 5.0,
        snapshot_timeout: float = 10.0,
        backoff: float = 0.02,
        max_backoff: float = 1.0,
        max_frame_size: int = MAX_FRAME_SIZE,
        heartbeat_interval: float | None = 2.0,
        heartbeat_timeout: float = 10.0,
        worker_secret: bytes | str | None = None,
        tls: ssl.SSLContext | None = None,
        open_connection: Callable[[str, int], Awaitable[trio.abc.Stream]] | None = None,
        decode_kv_events: bool = True,
        http_url: str | None = None,
    ) -> None:
        if heartbeat_interval is not None and not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError(
                f"heartbeat_interval={heartbeat_interval} must be positive and below "
                f"heartbeat_timeout={heartbeat_timeout} (a few pings must be able to go "
                "unanswered before the worker counts as dead), or None for no heartbeat"
            )
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if type(instance_id) is not int or instance_id < 0:
            raise ValueError(f"instance_id must be a non-negative int, got {instance_id!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0-65535, got {port!r}")
        self.host = host
        self.port = port
        self._instance_id = instance_id
        self._role: Role = role
        #: Tokens per KV block; checked against the worker's (the pipeline checks it against
        #: its ``kv_block_size``).
        self.block_size = block_size
        #: The frontend's tokenizer fingerprint and vocabulary size, checked against the
        #: worker's (None: not checked).
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.snapshot_timeout = snapshot_timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_frame_size = max_frame_size
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._secret = None if worker_secret is None else check_secret(worker_secret)
        self._open_connection = open_connection or _open_tcp
        #: Decode the worker's KV events and pass them to the listeners; False (a frontend
        #: whose router does not use them) skips their frames undecoded.
        self.decode_kv_events = decode_kv_events
        #: The root URL of the vLLM-compatible HTTP surface the worker serves beside the worker
        #: protocol (``interlock worker --openai-port``), as its etcd record names it (None:
        #: none known). This engine never uses it: a gateway's picker names it as the
        #: worker's endpoint (`interlock.gateway`).
        self.http_url = http_url
        self._tls = tls
        #: What the worker reported in its last handshake (None before the first).
        self.capacity: WorkerCapacity | None = None
        #: Connections made (1 after the first handshake, +1 per reconnection).
        self.connections = 0
        #: Connections dropped because nothing arrived for ``heartbeat_timeout``.
        self.heartbeat_failures = 0
        #: The last handshake showed that every token id the worker generates is in this
        #: frontend's vocabulary (it reported a ``vocab_size`` no larger than
        #: ``vocab_size``, after any tokenizer check): the pipeline then skips the per-token
        #: range check when detokenizing its outputs.
        self.vocab_checked = False
        self._listeners = Listeners()
        self._pings = itertools.count()
        self._link: _Link | None = None
        self._stream_ids = itertools.count()
        self._tokens = itertools.count()
        self._connected = False
        self._worker_registered = True
        self._present = False
        self._down_reason = "never connected"
        #: The protocol version of the last handshake (kept while reconnecting: a worker that
        #: spoke 4 is not trusted with a salt before it says otherwise).
        self._version: int | None = None

    # -- Engine protocol ------------------------------------------------------------------

    @property
    def slots(self) -> int | None:
        """The sequences the worker runs at once (its ``max_num_seqs``), as its welcome said;
        None before the handshake or when it did not say. The router's default in-flight
        limit."""
        capacity = self.capacity
        return capacity.max_num_seqs if capacity is not None else None

    @property
    def instance_id(self) -> int:
        return self._instance_id

    @property
    def role(self) -> Role:
        return self._role

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def registered(self) -> bool:
        """Connected, and the worker is not withdrawn from routing."""
        return self._present

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def protocol_version(self) -> int | None:
        """The protocol version agreed with the worker at the last handshake; None before the
        first. The router reads it to keep requests off workers that cannot carry them
        (a cache_salt: `SALT_VERSION`)."""
        return self._version

    @property
    def open_streams(self) -> int:
        """Streams open on the worker now (a removed worker is stopped once they end)."""
        link = self._link
        return 0 if link is None else len(link.streams)

    def open_stream(self, request: PreprocessedRequest) -> _RemoteStream:
        """Send ``request`` to the worker; the context yields its outputs.

        Entering raises `WorkerRefused` when not connected. Iterating raises
        `WorkerRefused` when the worker refuses the request, `WorkerGone` when the stream
        or the connection breaks before the last output. Leaving early queues a cancel and
        returns at once.
        """
        return _RemoteStream(self, request)

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        return self._listeners.add(listener)

    async def snapshot(self) -> WorkerSnapshot:
        """Ask the worker for its state; waits for the answer.

        Raises:
            WorkerGone: not connected, the connection broke before the answer, or none came
                within ``snapshot_timeout``.
        """
        link = self._link
        if link is None or link.conn.closed:
            await trio.lowlevel.checkpoint()
            raise self._gone(f"is not connected ({self._down_reason})")
        token = next(self._tokens)
        waiter = _Waiter()
        link.snapshots[token] = waiter
        link.conn.send_nowait(SnapshotRequest(token=token))
        with trio.move_on_after(self.snapshot_timeout):
            await waiter.done.wait()
        link.snapshots.pop(token, None)
        if waiter.error is not None:
            raise waiter.error
        if waiter.snapshot is None:
            raise self._gone(f"sent no snapshot within snapshot_timeout={self.snapshot_timeout}s")
        return waiter.snapshot

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, call ``task_status.started()``, and serve the connection until
        cancelled, reconnecting whenever it is lost. Streams open when cancelled break.

        Raises:
            WorkerMismatch: the first worker to answer is not the one configured.
            WorkerUnreachable: no handshake within ``connect_timeout``.
            WorkerAuthError: the secrets differ (`WorkerTLSError`: TLS failed).
            ProtocolError: the first peer to answer does not speak a common protocol version
                (or is not an interlock worker).
        """
        link = await self._connect_first()
        self._attach(link)
        task_status.started()
        try:
            while True:
                reason = await self._serve(link)
                _logger.warning(
                    "lost worker %d at %s: %s; reconnecting", self.instance_id, self.address, reason
                )
                link = await self._reconnect()
                self._attach(link)
        finally:
            if self._link is not None:
                self._drop(self._link, "the engine was stopped", announce=False)

    # -- connecting -----------------------------------------------------------------------

    async def _connect_first(self) -> _Link:
        delay = self.backoff
        last = "no attempt"
        with trio.move_on_after(self.connect_timeout):
            while True:
                try:
                    return await self._connect_once()
                except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                    last = _describe(exc)
                await trio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        raise WorkerUnreachable(
            f"no handshake with worker {self.instance_id} at {self.address} within "
            f"connect_timeout={self.connect_timeout}s (last attempt: {last}); is "
            "`interlock worker` running there?",
            worker_id=self.instance_id,
        )

    async def _reconnect(self) -> _Link:
        delay = self.backoff
        reported = None
        while True:
            try:
                return await self._connect_once()
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                _logger.debug("worker %d at %s: %s", self.instance_id, self.address, exc)
            except (WorkerMismatch, ProtocolError) as exc:
                if str(exc) != reported:
                    reported = str(exc)
                    _logger.error("worker %d stays out of routing: %s", self.instance_id, exc)
            await trio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    async def _connect_once(self) -> _Link:
        with trio.fail_after(self.handshake_timeout):
            stream = await self._open_connection(self.host, self.port)
            if self._tls is not None:
                stream = await self._start_tls(stream)
            conn = FrameConnection(
                stream,
                f"worker {self.address}",
                max_frame_size=self.max_frame_size,
                skip_tags=() if self.decode_kv_events else KV_EVENT_TAGS,
            )
            try:
                hello = Hello(
                    versions=SUPPORTED_VERSIONS, client=f"RemoteEngine {self.instance_id}"
                )
                await stream.send_all(encode_frame(hello))
                answer = await conn.receive()
                expected_proof = None
                if type(answer) is Challenge:
                    answer, expected_proof = await self._authenticate(conn, answer)
                elif self._secret is not None and type(answer) is Welcome:
                    await self._refuse(conn, "this frontend requires the worker to prove a secret")
                    raise WorkerAuthError(
                        f"the worker at {self.address} runs without a secret, but this frontend "
                        "has one: it cannot prove it is the worker the frontend trusts; start "
                        "it with the frontend's secret (interlock worker --secret-file PATH, or "
                        "INTERLOCK_WORKER_SECRET)"
                    )
                welcome = self._check_welcome(answer)
                if expected_proof is not None and not proofs_match(expected_proof, welcome.proof):
                    raise WorkerAuthError(
                        f"the worker at {self.address} accepted this frontend's proof but did "
                        "not prove it knows the secret itself (its welcome carries no valid "
                        "proof): it is not the worker the frontend trusts"
                    )
            except trio.BrokenResourceError as exc:
                await conn.aclose()
                # With TLS 1.3 the worker checks the frontend's certificate after the
                # handshake: its refusal arrives as the answer to hello.
                failure = ssl_failure(exc) if self._tls is not None else None
                if failure is None or isinstance(failure, ssl.SSLEOFError):
                    raise
                raise self._tls_error(failure) from exc
            except BaseException:
                await conn.aclose()
                raise
        link = _Link(conn, welcome)
        self.connections += 1
        self.vocab_checked = (
            self.vocab_size is not None
            and welcome.vocab_size is not None
            and 0 < welcome.vocab_size <= self.vocab_size
        )
        self.capacity = welcome.capacity
        self._worker_registered = welcome.registered
        return link

    async def _start_tls(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        """``stream`` inside TLS, handshake done.

        Raises:
            WorkerTLSError: the handshake failed (what the worker sent is not TLS, or its
                certificate is not trusted or does not name ``host``).
            trio.BrokenResourceError: the connection closed during the handshake.
        """
        assert self._tls is not None
        secured = wrap(stream, self._tls, server_hostname=self.host)
        try:
            await secured.do_handshake()
        except BaseException as exc:
            await trio.aclose_forcefully(stream)
            failure = ssl_failure(exc)
            if failure is None or isinstance(failure, ssl.SSLEOFError):
                raise
            raise self._tls_error(failure) from exc
        return secured

    def _tls_error(self, failure: ssl.SSLError) -> WorkerTLSError:
        where = f"worker {self.instance_id} at {self.address}"
        if isinstance(failure, ssl.SSLCertVerificationError):
            hint = (
                f"its certificate is not one this frontend trusts ({failure.verify_message}): "
                "give --worker-ca-file with the CA that signed it, and make sure the "
                f"certificate names {self.host!r} (an IP address needs an IP SAN)"
            )
        elif failure.reason in NOT_TLS:
            hint = (
                "it does not answer in TLS: start the worker with --tls-cert-file and "
                "--tls-key-file, or drop --worker-tls"
            )
        elif "CERTIFICATE_REQUIRED" in str(failure.reason) or "HANDSHAKE_FAILURE" in str(
            failure.reason
        ):
            hint = (
                "the worker requires a client certificate (--tls-client-ca-file): give "
                "--worker-cert-file and --worker-key-file, signed by that CA"
            )
        else:
            hint = f"check {FRONTEND_FLAGS} against the worker's --tls-* flags"
        return WorkerTLSError(f"TLS with {where} failed ({failure.reason or failure}): {hint}")

    async def _authenticate(self, conn: FrameConnection, challenge: Challenge) -> tuple[Any, bytes]:
        """Answer the worker's challenge; return its next frame (the welcome, if it accepted
        the proof) and the proof that welcome must carry.

        Raises:
            WorkerAuthError: this engine has no secret, or the worker refused its proof.
        """
        secret = self._secret
        if secret is None:
            await self._refuse(conn, "this frontend has no secret")
            raise WorkerAuthError(
                f"the worker at {self.address} requires a secret; give --worker-secret-file "
                "PATH (or INTERLOCK_WORKER_SECRET) with the worker's secret "
                "(RemoteEngine(worker_secret=...) in Python)"
            )
        if challenge.version not in SUPPORTED_VERSIONS or challenge.version < AUTH_VERSION:
            raise ProtocolError(
                f"worker at {self.address} challenged with protocol version "
                f"{challenge.version}, which has no authentication this frontend speaks"
            )
        if len(challenge.nonce) != NONCE_BYTES:
            raise ProtocolError(
                f"worker at {self.address} sent a {len(challenge.nonce)}-byte nonce; the "
                f"protocol's are {NONCE_BYTES} bytes"
            )
        nonce = new_nonce()
        proof = frontend_proof(secret, challenge.version, challenge.nonce, nonce)
        await conn.stream.send_all(encode_frame(Auth(nonce=nonce, proof=proof)))
        answer = await conn.receive()
        if type(answer) is Goodbye:
            raise WorkerAuthError(
                f"the worker at {self.address} refused this frontend: {answer.reason}"
            )
        if type(answer) is Welcome and answer.version != challenge.version:
            raise ProtocolError(
                f"worker at {self.address} challenged with version {challenge.version} but "
                f"welcomed with version {answer.version}"
            )
        return answer, worker_proof(secret, challenge.version, challenge.nonce, nonce)

    async def _refuse(self, conn: FrameConnection, reason: str) -> None:
        """Tell the worker why this engine ends the handshake (best effort)."""
        with trio.move_on_after(1.0):
            try:
                await conn.stream.send_all(encode_frame(Goodbye(reason=reason)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _check_welcome(self, answer: Any) -> Welcome:
        if type(answer) is Goodbye:
            raise ProtocolError(f"worker at {self.address} refused the handshake: {answer.reason}")
        if type(answer) is not Welcome:
            raise ProtocolError(
                f"the peer at {self.address} answered hello with a {frame_tag(answer)!r} frame; "
                "is it an interlock worker?"
            )
        if answer.version not in SUPPORTED_VERSIONS:
            raise ProtocolError(
                f"worker at {self.address} chose protocol version {answer.version}, which this "
                f"frontend does not speak (it speaks {list(SUPPORTED_VERSIONS)})"
            )
        reported = (answer.worker_id, answer.role, answer.block_size)
        expected = (self.instance_id, self.role, self.block_size)
        if answer.block_size is None:
            reported = (answer.worker_id, answer.role, self.block_size)
        if reported != expected:
            raise WorkerMismatch(
                f"the worker at {self.address} is instance {answer.worker_id} (role "
                f"{answer.role!r}, blocks of {answer.block_size} tokens), but this RemoteEngine "
                f"expects instance {self.instance_id} (role {self.role!r}, blocks of "
                f"{self.block_size} tokens); fix the worker's --id/--role/--block-size or the "
                "RemoteEngine's arguments",
                worker_id=self.instance_id,
            )
        self._check_tokenizer(answer)
        return answer

    def _check_tokenizer(self, answer: Welcome) -> None:
        expected, size = self.tokenizer, self.vocab_size
        if expected is not None and answer.tokenizer is not None:
            if answer.tokenizer == expected:
                return
            worker = f"decodes with tokenizer {answer.tokenizer}"
        elif expected is not None and answer.tokenizer is None and answer.vocab_size is not None:
            # Ids from no tokenizer at all are not the frontend's tokens, even when they fit
            # its vocabulary (a 32,000-id mock under a 151,669-id tokenizer would pass).
            worker = f"has no tokenizer and generates token ids up to {answer.vocab_size - 1}"
        elif size is not None and answer.vocab_size is not None and answer.vocab_size > size:
            worker = (
                f"has no tokenizer and generates token ids up to {answer.vocab_size - 1}"
                if answer.tokenizer is None
                else f"decodes with tokenizer {answer.tokenizer}, with ids up to "
                f"{answer.vocab_size - 1}"
            )
        else:
            return
        ids = "" if size is None else f"ids 0..{size - 1}"
        if expected is None:
            frontend = f"has {ids}"
        else:
            frontend = f"is {expected}" + (f" ({ids})" if ids else "")
        if expected is None:
            fix = "--tokenizer builtin or --tokenizer PATH naming the frontend's tokenizer"
        elif expected.startswith("builtin:"):
            fix = "--tokenizer builtin (the frontend's built-in byte tokenizer)"
        else:
            fix = "--tokenizer PATH naming the frontend's tokenizer (its --tokenizer)"
        raise TokenizerMismatch(
            f"the worker at {self.address} (instance {answer.worker_id}) {worker}, but this "
            f"frontend's tokenizer {frontend}: the worker's token ids would not decode, or "
            f"decode to the wrong text; start the worker with {fix}",
            worker_id=self.instance_id,
        )

    # -- serving one connection -----------------------------------------------------------

    def _attach(self, link: _Link) -> None:
        self._link = link
        self._version = link.welcome.version
        self._connected = True
        _logger.info("connected to worker %d at %s", self.instance_id, self.address)
        self._update_presence()

    async def _serve(self, link: _Link) -> str:
        try:
            async with trio.open_nursery() as nursery:
                if (
                    self.heartbeat_interval is not None
                    and link.welcome.version >= HEARTBEAT_VERSION
                ):
                    nursery.start_soon(self._heartbeat, link.conn, self.heartbeat_interval)
                reason = await link.conn.serve(lambda message: self._on_message(link, message))
                nursery.cancel_scope.cancel()
        finally:
            await link.conn.aclose()
        self._drop(link, reason, announce=True)
        return reason

    async def _heartbeat(self, conn: FrameConnection, interval: float) -> None:
        """Ping every ``interval``; end the connection once nothing (no frame of any kind)
        has arrived for ``heartbeat_timeout``. Runs until cancelled with the connection."""
        timeout = self.heartbeat_timeout
        next_ping = trio.current_time() + interval
        while True:
            await trio.sleep_until(min(next_ping, conn.last_receive + timeout))
            now = trio.current_time()
            if now - conn.last_receive >= timeout:
                # Before judging, let the reader take what the socket holds: a frontend
                # whose own loop was blocked wakes this task with the worker's frames
                # still unread. Two scheduling rounds: one for the I/O poll to wake the
                # reader, one for the reader to run.
                await trio.lowlevel.checkpoint()
                await trio.lowlevel.checkpoint()
                now = trio.current_time()
            silent = now - conn.last_receive
            if silent >= timeout:
                self.heartbeat_failures += 1
                conn.abort(
                    f"no frame for {silent:.1f}s, not even an answer to a ping (heartbeat_timeout"
                    f"={timeout}s): the worker process is stopped or hung, or the network is down"
                )
                return
            if now >= next_ping:
                conn.send_nowait(Ping(token=next(self._pings)))
                next_ping = now + interval

    def _on_message(self, link: _Link, message: Any) -> None:
        kind = type(message)
        if kind is Outputs:
            streams = link.streams
            for stream_id, output in message.outputs:
                stream = streams.get(stream_id)
                if stream is not None:
                    if output.finish_reason is not None:
                        del streams[stream_id]
                    stream._deliver(output)
                # Otherwise cancelled here already: its last outputs were in flight.
        elif kind is Output:
            stream = link.streams.get(message.stream)
            if stream is not None:
                output = message.output
                if output.finish_reason is not None:
                    del link.streams[message.stream]
                stream._deliver(output)
            # Otherwise cancelled here already: its last frames were in flight.
        elif kind in KV_EVENT_TYPES:
            self._check_worker(message)
            self._publish(message)
        elif kind is Refused or kind is Broken:
            stream = link.streams.pop(message.stream, None)
            if stream is not None:
                error = WorkerRefused if kind is Refused else WorkerGone
                stream._deliver(
                    error(
                        f"worker {self.instance_id}: {message.message}", worker_id=self.instance_id
                    )
                )
        elif kind is Pong:
            pass  # Its arrival is the sign of life (FrameConnection.last_receive).
        elif kind is SnapshotReply:
            waiter = link.snapshots.pop(message.token, None)
            if waiter is not None:
                waiter.snapshot = message.snapshot
                waiter.done.set()
        elif kind is WorkerLeft or kind is WorkerJoined:
            self._check_worker(message)
            self._worker_registered = kind is WorkerJoined
            self._update_presence()
        else:
            raise ProtocolError(f"a worker does not send {frame_tag(message)!r} frames")

    def _check_worker(self, event: Any) -> None:
        if event.worker_id != self.instance_id:
            raise ProtocolError(
                f"worker {self.instance_id} sent an event of worker {event.worker_id}: {event!r}"
            )

    def _drop(self, link: _Link, reason: str, *, announce: bool) -> None:
        """The connection ended: break what was open on it, and leave routing."""
        link.conn.closed = True
        if self._link is link:
            self._link = None
        self._connected = False
        self._down_reason = reason
        if announce:
            self._update_presence()
        else:
            self._present = False
        streams = list(link.streams.values())
        link.streams.clear()
        for stream in streams:
            stream._deliver(
                self._gone(f"lost the connection after {stream.received} outputs ({reason})")
            )
        for waiter in link.snapshots.values():
            waiter.error = self._gone(f"lost the connection before answering ({reason})")
            waiter.done.set()
        link.snapshots.clear()

    def _gone(self, what: str) -> WorkerGone:
        return WorkerGone(
            f"worker {self.instance_id} at {self.address} {what}", worker_id=self.instance_id
        )

    def _update_presence(self) -> None:
        present = self._connected and self._worker_registered
        if present != self._present:
            self._present = present
            event = WorkerJoined(self.instance_id) if present else WorkerLeft(self.instance_id)
            self._publish(event)

    def _publish(self, event: Any) -> None:
        self._listeners.publish(event)

    def __repr__(self) -> str:
        return f"<RemoteEngine {self.instance_id} role={self.role} at {self.address}>"


async def _open_tcp(host: str, port: int) -> trio.abc.Stream:
    stream = await trio.open_tcp_stream(host, port)
    set_keepalive(stream)
    return stream


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "no answer to hello within handshake_timeout"
    return str(exc) or type(exc).__name__
