"""vLLM's KV-event feed: one ZMQ SUB socket every engine's publisher connects to, and replays.

interlock binds the SUB (``--kv-events-bind ENDPOINT``); each vLLM is started with
``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": ENDPOINT,
"replay_endpoint": "tcp://HOST:PORT", "topic": "kv@ID"}'`` so its PUB connects to it, and
:class:`KvEventFeed` hands each batch to the handler subscribed for topic ``kv@ID``. Everything
runs in trio tasks (pyzmq has no trio integration: non-blocking receives plus
``trio.lowlevel.wait_readable`` on the socket's edge-triggered ``zmq.FD``, reference/stack.md
section 6); there is no thread per engine, only the ZMQ context's own I/O thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import attrs
import trio
import zmq

from ..._errors import InterlockError
from ...wire import (
    KvBatchDecoder,
    VllmKvBatch,
    VllmKvDecodeError,
    kv_topic,
    parse_kv_message,
    parse_replay_reply,
    replay_request_frames,
)
from .._zmq import recv_multipart

__all__ = [
    "KvBatchHandler",
    "KvEventFeed",
    "KvEventRelay",
    "KvFeedBindError",
    "KvFeedStats",
    "KvReplayFailed",
    "kv_topic",
    "recv_multipart",
    "replay_kv_batches",
]

_logger = logging.getLogger("interlock.engines.openai.kv")

KvBatchHandler = Callable[[int, VllmKvBatch], None]
"""Called as ``handler(seq, batch)`` for each batch of one engine, in the feed's task: it must not
block or await (``KvMirror.on_batch`` is one)."""

#: How many distinct unknown topics are remembered (to log each once); more are still counted.
_MAX_REMEMBERED_TOPICS = 1024


class KvFeedBindError(InterlockError):
    """The feed's SUB socket could not bind its endpoint (in use, or not a ZMQ address)."""


class KvReplayFailed(InterlockError):
    """A replay from an engine's ROUTER did not complete: timed out, or a malformed reply."""


@attrs.frozen
class KvFeedStats:
    """Counters of a :class:`KvEventFeed` since it was made, for metrics.

    ``messages``: every message received; ``delivered``: batches handed to a handler;
    ``undecodable``: messages dropped because their frames or payload could not be read;
    ``unknown_topic``: messages for a topic no handler is subscribed to; ``unknown_events``:
    events of types the decoder does not know, skipped inside delivered batches;
    ``handler_errors``: interlock errors a handler raised (logged; the feed carries on).
    """

    messages: int = 0
    delivered: int = 0
    undecodable: int = 0
    unknown_topic: int = 0
    unknown_events: int = 0
    handler_errors: int = 0


class KvEventFeed:
    """One bound SUB socket receiving every engine's KV events, dispatched by topic.

    ``endpoint`` is where to bind (``tcp://127.0.0.1:5557``; port 0 picks a free port, read back
    from :attr:`endpoint` or from ``nursery.start(feed.run)``). ``hwm`` is the receive high-water
    mark in messages: past it ZMQ drops, which the mirrors see as gaps and replay.

    With ``connect=True`` the SUB connects to ``endpoint`` instead of binding it: to a
    publisher that forwards the engines' events (``interlock serve --processes``, where one
    process binds and re-publishes them to the others).

    The feed owns a private ZMQ context, so that closing it releases the port before
    :meth:`run` returns (a shared context closes sockets in the background).
    """

    def __init__(self, endpoint: str, *, hwm: int = 100_000, connect: bool = False) -> None:
        self._requested = endpoint
        self._connect = connect
        self._hwm = hwm
        self._endpoint: str | None = None
        self._handlers: dict[bytes, KvBatchHandler] = {}
        # Per topic: each engine's decoder remembers its own event layout.
        self._decoders: dict[bytes, KvBatchDecoder] = {}
        self._warned_topics: set[bytes] = set()
        self._running = False
        self._messages = 0
        self._delivered = 0
        self._undecodable = 0
        self._unknown_topic = 0
        self._unknown_events = 0
        self._handler_errors = 0

    @property
    def endpoint(self) -> str:
        """The bound endpoint while running (a port 0 resolved), else the one asked for."""
        return self._endpoint or self._requested

    @property
    def stats(self) -> KvFeedStats:
        """The counters now (a frozen copy)."""
        return KvFeedStats(
            messages=self._messages,
            delivered=self._delivered,
            undecodable=self._undecodable,
            unknown_topic=self._unknown_topic,
            unknown_events=self._unknown_events,
            handler_errors=self._handler_errors,
        )

    def subscribe(self, engine_id: int, handler: KvBatchHandler) -> Callable[[], None]:
        """Deliver the batches published on topic ``kv@<engine_id>`` to ``handler(seq, batch)``.

        Returns a function that unsubscribes (idempotent; it leaves a later subscriber of the same
        id alone). Raises ``ValueError`` if the engine id already has a handler: two engines with
        one id would interleave two sequence counters.
        """
        topic = kv_topic(engine_id)
        if topic in self._handlers:
            raise ValueError(
                f"engine {engine_id} is already subscribed to the KV event feed (topic "
                f"{topic.decode()!r}); every engine needs its own id and topic"
            )
        self._handlers[topic] = handler
        self._decoders[topic] = KvBatchDecoder()

        def unsubscribe() -> None:
            if self._handlers.get(topic) is handler:
                del self._handlers[topic]
                del self._decoders[topic]

        return unsubscribe

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the bound endpoint through ``task_status.started``, then receive and
        dispatch until cancelled; the socket is closed (linger 0, port released) on the way out.

        Raises :class:`KvFeedBindError` if the endpoint cannot be bound, ``RuntimeError`` if the
        feed is already running. A handler's :class:`~interlock.InterlockError` is logged and
        counted; any other exception from a handler ends the feed (it is a bug).
        """
        if self._running:
            raise RuntimeError(f"the KV event feed on {self.endpoint} is already running")
        self._running = True
        context = zmq.Context()
        socket = context.socket(zmq.SUB)
        try:
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.RCVHWM, self._hwm)
            socket.setsockopt(zmq.SUBSCRIBE, b"")
            try:
                if self._connect:
                    socket.connect(self._requested)
                else:
                    socket.bind(self._requested)
            except zmq.ZMQError as exc:
                raise KvFeedBindError(_bind_advice(self._requested, exc)) from exc
            self._endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
            verb = "connected to" if self._connect else "bound to"
            _logger.info("KV event feed %s %s", verb, self._endpoint)
            task_status.started(self._endpoint)
            while True:
                self._dispatch(await recv_multipart(socket))
        finally:
            socket.close(linger=0)
            # Waits for the I/O thread to let the port go (a millisecond), so a new feed can
            # bind the same endpoint at once.
            context.term()
            self._endpoint = None
            self._running = False

    def _dispatch(self, frames: list[bytes]) -> None:
        self._messages += 1
        try:
            message = parse_kv_message(frames)
        except VllmKvDecodeError as exc:
            self._undecodable += 1
            self._warn_once(b"frames", "dropped an unreadable KV event message: %s", exc)
            return
        topic = message.topic
        assert topic is not None
        handler = self._handlers.get(topic)
        if handler is None:
            self._unknown_topic += 1
            self._warn_once(
                b"topic:" + topic,
                "KV events on topic %r, which no engine subscribed to, are dropped: start each "
                "vLLM with the topic kv@<its interlock engine id>",
                topic.decode(errors="replace"),
            )
            return
        try:
            batch = self._decoders[topic].decode(message.payload, merge_removals=True)
        except VllmKvDecodeError as exc:
            self._undecodable += 1
            self._warn_once(
                b"payload:" + topic,
                "dropped KV event batch %d on topic %r (the gap will be replayed if it can): %s",
                message.seq,
                topic.decode(errors="replace"),
                exc,
            )
            return
        self._unknown_events += len(batch.unknown_event_types)
        self._delivered += 1
        try:
            handler(message.seq, batch)
        except InterlockError:
            # Deliberate errors (a block size mismatch) belong to the engine, which its mirror
            # re-raises there; the other engines' events keep flowing.
            self._handler_errors += 1
            _logger.exception("the KV event handler of topic %r failed", topic.decode())

    def _warn_once(self, key: bytes, message: str, *args: object) -> None:
        if key in self._warned_topics or len(self._warned_topics) >= _MAX_REMEMBERED_TOPICS:
            return
        self._warned_topics.add(key)
        _logger.warning(message, *args)


def _bind_advice(endpoint: str, exc: zmq.ZMQError) -> str:
    if exc.errno == zmq.EADDRINUSE:
        return (
            f"cannot bind the KV event feed to {endpoint}: the address is already in use (by "
            "another interlock, or a vLLM whose kv-events 'endpoint' binds instead of "
            "connecting); pick a free one with --kv-events-bind (port 0 picks any) and give "
            "vLLM that address as its kv-events 'endpoint'"
        )
    return (
        f"cannot bind the KV event feed to {endpoint!r}: {exc.strerror}; --kv-events-bind takes "
        "a ZMQ endpoint such as tcp://127.0.0.1:5557 or ipc:///tmp/interlock-kv"
    )


# The timeout is part of the answer: running out of it is a failed replay (KvReplayFailed,
# which a mirror handles by clearing), not a cancellation of the caller.
async def replay_kv_batches(
    replay_endpoint: str,
    start_seq: int,
    *,
    timeout: float,  # noqa: ASYNC109
) -> list[tuple[int, VllmKvBatch]]:
    """Ask an engine's replay ROUTER for every batch it still buffers from ``start_seq`` on.

    Connects a DEALER, sends the request and reads replies in either layout until the end
    marker; waits at most ``timeout`` seconds (trio's clock) in all. Returns ``(seq, batch)``
    pairs in the order sent (possibly starting after ``start_seq``, when the engine's buffer no
    longer holds it, or empty). Raises :class:`KvReplayFailed` on timeout, a malformed reply or
    endpoint, or a socket error.
    """
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    got: list[tuple[int, VllmKvBatch]] = []
    decoder = KvBatchDecoder()
    try:
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(replay_endpoint)
        # Queued on the pipe even before the TCP connection is up.
        socket.send_multipart(replay_request_frames(start_seq), zmq.NOBLOCK)
        with trio.move_on_after(timeout):
            while True:
                message = parse_replay_reply(await recv_multipart(socket))
                if message is None:
                    return got
                got.append((message.seq, decoder.decode(message.payload, merge_removals=True)))
        raise KvReplayFailed(
            f"replay from {replay_endpoint} (from seq {start_seq}) did not end within {timeout} s "
            f"({len(got)} batches received); check the engine's kv-events 'replay_endpoint' is "
            "this address and reachable"
        )
    except VllmKvDecodeError as exc:
        raise KvReplayFailed(
            f"replay from {replay_endpoint} sent a malformed reply after {len(got)} batches: {exc}"
        ) from exc
    except zmq.ZMQError as exc:
        raise KvReplayFailed(f"replay from {replay_endpoint!r} failed: {exc}") from exc
    finally:
        socket.close(linger=0)


class KvEventRelay:
    """Binds the engines' KV-event endpoint once and re-publishes every message, unchanged, to
    any number of `KvEventFeed`\\ s connected to :attr:`relay_endpoint` (``connect=True``).

    A vLLM publishes its KV events to one endpoint only, so ``interlock serve --processes N``
    binds ``--kv-events-bind`` in the supervising process, here, and its N frontend processes
    each subscribe to the relay. It is a ZMQ XSUB/XPUB proxy on a daemon thread: subscriptions
    travel up to the engines' PUB sockets as they would to a single frontend, and messages
    travel down without being decoded. A process that connects late misses what was published
    before it connected; its mirrors see the gap in the sequence numbers and replay it
    (``--kv-replay``), as they do after any drop.
    """

    def __init__(self, endpoint: str, relay_endpoint: str, *, hwm: int = 100_000) -> None:
        """Bind ``endpoint`` (where the engines connect) and ``relay_endpoint`` (where the
        feeds connect); nothing is relayed until `start`.

        Raises:
            KvFeedBindError: either endpoint cannot be bound (the message says what to change).
        """
        self._context = zmq.Context()
        self._sockets: list[zmq.Socket[Any]] = []
        self._thread: threading.Thread | None = None
        try:
            for kind, address in ((zmq.XSUB, endpoint), (zmq.XPUB, relay_endpoint)):
                socket = self._context.socket(kind)
                self._sockets.append(socket)
                socket.setsockopt(zmq.LINGER, 0)
                socket.setsockopt(zmq.RCVHWM, hwm)
                socket.setsockopt(zmq.SNDHWM, hwm)
                try:
                    socket.bind(address)
                except zmq.ZMQError as exc:
                    raise KvFeedBindError(_bind_advice(address, exc)) from exc
        except BaseException:
            self.close()
            raise
        self.endpoint = self._sockets[0].getsockopt_string(zmq.LAST_ENDPOINT)
        self.relay_endpoint = self._sockets[1].getsockopt_string(zmq.LAST_ENDPOINT)

    def start(self) -> None:
        """Relay on a daemon thread until `close`. Never blocks."""
        self._thread = threading.Thread(target=self._relay, name="interlock-kv-relay", daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        try:
            zmq.proxy(self._sockets[0], self._sockets[1])
        except zmq.ContextTerminated:
            pass
        finally:
            for socket in self._sockets:
                socket.close(linger=0)

    def close(self) -> None:
        """Stop relaying and release both endpoints; waits for the relay thread (a
        millisecond). Idempotent."""
        if self._thread is None:
            for socket in self._sockets:
                socket.close(linger=0)
        # Terminating the context ends zmq.proxy on its thread, which closes the sockets;
        # term() returns once they are closed.
        self._context.term()
        if self._thread is not None:
            self._thread.join()
