"""The gRPC side: `serve_ext_proc` serves `ExtProcPicker` with grpcio's C-core server.

gRPC's HTTP/2, framing and protobuf coding run in grpcio (C-core, ``grpc.aio``) on an asyncio
loop in one thread of its own (``interlock-ext-proc``); the picker stays in this trio run. That
thread answers each message that needs no router state itself (`ExtProcStream.answer_now`:
request headers, body chunks before the last, every response phase) and hands the bookkeeping
it implies to trio without waiting. A stream gets a trio task (`ExtProcPicker.process_batches`)
only at its first message that needs the router (the pick); from then on, while the task holds
a message, the stream's later messages go to it too, in order, through two bounded queues
between the threads (`_Queue`): a side wakes the other only when that one waits, and the
answers to one message are handed over together up to the queue's bound (`_Queue.put_all`: a
pick's answer and its body chunks wake the loop's thread once a window's worth). Every call for
the trio thread goes through one `_Inbox`, so calls posted before trio gets to them share one
wake-up. A stream whose task has answered every message it was given closes at the gateway's
half-close without waiting for trio (the task frees the booking as it takes that end). The
loop's thread's own answers are bounded as the task's are: once `_WINDOW` of them wait to be
sent it reads no more of the stream until they are taken, so gRPC's flow control holds back a
gateway that does not read its answers. A message it fails to answer ends the stream INTERNAL
(the booking freed), as a failure in the trio task does. No thread per stream: thousands of
long generations keep their streams open on one loop.

Served (``127.0.0.1:E`` over h2c, HTTP/2 with prior knowledge as Envoy's gRPC client speaks it,
or over TLS with ``tls``, `interlock.gateway._tls`):
``envoy.service.ext_proc.v3.ExternalProcessor/Process`` (bidirectional streaming) and
``grpc.health.v1.Health/Check``; on the health port (``--ext-proc-health-port``), the health
check alone. Message classes are xds-protos' and grpcio-health-checking's.

Health service names (GAIE's EPP): ``liveness`` is SERVING while the process answers;
``readiness``, ``envoy.service.ext_proc.v3.ExternalProcessor`` and ``""`` are SERVING while
the picker can pick (`ExtProcPicker.ready`: not draining, a worker with an HTTP endpoint
registered), NOT_SERVING otherwise; any other name is gRPC NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, Final

import grpc
import grpc.aio
import trio
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from google.protobuf.message import DecodeError
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from .._errors import ConfigError
from ._endpoints import host_port
from ._picker import ExtProcPicker, ExtProcStream
from ._tls import SERVABLE_KEYS, ExtProcTLS

__all__ = ["EXT_PROC_SERVICE", "serve_ext_proc"]

_logger = logging.getLogger("interlock.gateway")

EXT_PROC_SERVICE: Final = "envoy.service.ext_proc.v3.ExternalProcessor"
_HEALTH_SERVICE: Final = "grpc.health.v1.Health"
_SERVING: Final = HealthCheckResponse.SERVING
_NOT_SERVING: Final = HealthCheckResponse.NOT_SERVING
#: The largest gRPC message accepted: a body chunk Envoy sends stays far below it.
_READ_MAX_BYTES: Final = 64 * 1024 * 1024
_SERVER_OPTIONS: Final = (
    # gRPC sets SO_REUSEPORT by default: a second picker on a taken port would share it
    # silently instead of failing to start.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", _READ_MAX_BYTES),
    # Every request in flight through the gateway holds its ext_proc stream for its whole
    # life (a long generation), and Envoy multiplexes them over few connections.
    ("grpc.max_concurrent_streams", 65_536),
)
#: Messages one side of a stream may queue before it waits for the other side to take them.
_WINDOW: Final = 16
#: Body bytes one side of a stream may queue before it waits the same way: without it a
#: gateway that does not read a stream's answers while 62,000-byte body chunks pass would have
#: it hold 16 of them (~1 MB). 64 KiB is HTTP/2's default stream window, all gRPC lets a
#: stream have in flight unread: a queue holds at most that and one chunk (~126 kB), and still
#: hands a body over two chunks at a time.
_WINDOW_BYTES: Final = 64 * 1024
#: The messages that carry a body chunk, the ones whose bytes add up in a queue.
_BODIES: Final = frozenset({"request_body", "response_body"})
#: The end of a direction of a stream (the gateway's half-close; the picker's last answer).
_END: Final = object()
#: The picker's task ended without its end (cancelled: the server stops).
_GONE: Final = object()
#: How long a stopping server waits for its open streams to be answered (UNAVAILABLE, their
#: tasks cancelled and bookings freed) before it stops grpcio's servers, which cancel the rest.
_ANSWER_TIMEOUT: Final = 3.0
#: How long `serve_ext_proc` waits for the server's thread to end once asked to stop: past
#: it, a thread stuck in grpcio's shutdown is left behind (a daemon), so the process can exit.
_JOIN_TIMEOUT: Final = _ANSWER_TIMEOUT + 3.0


class _Unreadable(Exception):
    """A message of the stream could not be read (``__cause__``: why); the stream ends with
    `code`: INVALID_ARGUMENT for a message that is not a ProcessingRequest, else INTERNAL."""

    def __init__(self, cause: Exception) -> None:
        if isinstance(cause, DecodeError):
            self.code = grpc.StatusCode.INVALID_ARGUMENT
            what = "a message of the stream is not a valid ProcessingRequest"
        else:
            self.code = grpc.StatusCode.INTERNAL
            what = "a message of the stream could not be read"
        super().__init__(f"{what}: {cause}")
        self.__cause__ = cause


class _Inbox:
    """Calls for the trio thread from the loop's thread (`post`), run there in order. Calls
    posted before the trio thread gets to them share one `run_sync_soon`: each is a write to
    trio's wake-up socket and a hand-over of the GIL, the bridge's main cost."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._scheduled = False

    def post(self, function: Callable[..., None], *args: Any) -> bool:
        """Have the trio thread call ``function(*args)`` soon (any thread; never waits);
        False when the trio run is over (nothing is called any more)."""
        with self._lock:
            self._calls.append((function, args))
            if self._scheduled:
                return True
            self._scheduled = True
        try:
            self._token.run_sync_soon(self._run)
        except trio.RunFinishedError:
            with self._lock:
                self._scheduled = False
            return False
        return True

    def _run(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            self._scheduled = False
        for function, args in calls:
            # A callback of the trio thread must not raise: it would end the trio run.
            try:
                function(*args)
            except Exception:
                _logger.exception("a call from the ext_proc server's thread failed")


class _TrioWaiter:
    """What a trio task waits on until the loop's thread wakes it (`wake`, any thread)."""

    def __init__(self, inbox: _Inbox) -> None:
        self._inbox = inbox
        self._event = trio.Event()

    def prepare(self) -> None:
        self._event = trio.Event()

    def wake(self) -> None:
        self._inbox.post(self._event.set)

    async def wait(self) -> None:
        await self._event.wait()


class _LoopWaiter:
    """What an asyncio task waits on until the trio thread wakes it (`wake`, any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] | None = None

    def prepare(self) -> None:
        self._future = self._loop.create_future()

    def wake(self) -> None:
        future = self._future
        if future is None:
            return
        if _running_loop() is self._loop:
            _resolve(future)  # the loop's own thread: no hop
        else:
            try:
                self._loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:
                pass  # the loop is closed: nobody waits

    async def wait(self) -> None:
        assert self._future is not None
        await self._future


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    """``future``'s result (an exception: raised) unless it is cancelled already."""
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


class _Queue:
    """Items from one thread to the other, in order: the producer `put`s, the consumer `take`s
    everything queued. Each side wakes the other only when that one waits (an empty queue,
    or `_WINDOW` items or `_WINDOW_BYTES` body bytes not taken yet). The answers' queue has
    two producers, one at a time: the trio task and the loop's thread
    (`ExtProcStream.answer_now`), each with its waiter."""

    def __init__(self, producer: _TrioWaiter | _LoopWaiter, consumer: _TrioWaiter | _LoopWaiter):
        self.producer = producer
        self.consumer = consumer
        self._lock = threading.Lock()
        self._items: collections.deque[Any] = collections.deque()
        #: The body bytes in ``_items`` (`_body_bytes`).
        self._bytes = 0
        #: The producers' waiters to wake at the next `take` (the queue was full).
        self._producers_waiting: list[_TrioWaiter | _LoopWaiter] = []
        self._consumer_waits = False

    def put(self, item: Any, producer: _TrioWaiter | _LoopWaiter | None = None) -> bool:
        """Queue ``item`` (the producer's thread; ``producer``: its waiter, default
        `producer`); whether the queue is full (`_WINDOW` items or `_WINDOW_BYTES` body
        bytes): then await ``producer.wait()`` before the next `put`."""
        return self.put_all([item], producer)

    def put_all(self, items: list[Any], producer: _TrioWaiter | _LoopWaiter | None = None) -> bool:
        """`put` ``items`` from the first, in order, as one hand-over, until the queue is full;
        what was queued is removed from ``items``. Whether the queue is full: then await
        ``producer.wait()`` before putting the rest (`put_all_waiting` does both). The first
        item always goes in, the others while there is room, so a queue holds at most the
        window and one chunk, as with one `put` after another. A waiting consumer is woken
        once, after the last item queued (put one by one, it could wake, take the first and
        wait again, a wake-up of its thread per item)."""
        if producer is None:
            producer = self.producer
        queued = 0
        full = False
        with self._lock:
            for item in items:
                if full:
                    break
                self._items.append(item)
                self._bytes += _body_bytes(item)
                queued += 1
                full = len(self._items) >= _WINDOW or self._bytes >= _WINDOW_BYTES
            wake = self._consumer_waits and queued > 0
            if wake:
                self._consumer_waits = False
            if full:
                producer.prepare()
                self._producers_waiting.append(producer)
        del items[:queued]
        if wake:
            self.consumer.wake()
        return full

    async def put_all_waiting(
        self, items: list[Any], producer: _TrioWaiter | _LoopWaiter | None = None
    ) -> None:
        """`put_all` ``items``, waiting on ``producer`` (default `producer`) whenever the
        queue is full, until all are queued and there is room for the next `put`. Either
        thread may call it: it awaits only its own thread's waiter. ``items`` ends empty."""
        if producer is None:
            producer = self.producer
        while items:
            if self.put_all(items, producer):
                await producer.wait()

    def take(self) -> list[Any] | None:
        """Everything queued (the consumer's thread); None when nothing is: await
        ``consumer.wait()``, then take again."""
        with self._lock:
            if not self._items:
                self.consumer.prepare()
                self._consumer_waits = True
                return None
            items = list(self._items)
            self._items.clear()
            self._bytes = 0
            waiting, self._producers_waiting = self._producers_waiting, []
        for producer in waiting:
            producer.wake()
        return items

    @property
    def producer_waits(self) -> bool:
        """Whether a producer waits for the consumer to take (the queue was full)."""
        return bool(self._producers_waiting)


def _body_bytes(item: Any) -> int:
    """``item``'s size when it is a message carrying a body chunk, else 0 (headers and
    trailers are small: `_WINDOW` bounds them; sizing one costs a serialization's time)."""
    kind = type(item)
    if kind is ProcessingResponse:
        carries_body = item.WhichOneof("response") in _BODIES
    elif kind is ProcessingRequest:
        carries_body = item.WhichOneof("request") in _BODIES
    else:
        return 0
    return item.ByteSize() if carries_body else 0


class _Stream:
    """One ext_proc stream between the loop's thread (the gRPC call) and its trio task; in
    that task, the async iterator of Envoy's messages (to its half-close)."""

    def __init__(
        self, inbox: _Inbox, loop: asyncio.AbstractEventLoop, state: ExtProcStream
    ) -> None:
        #: The picker's state of the stream: the loop's thread answers what it can with it
        #: (`ExtProcStream.answer_now`), the trio task the rest.
        self.state = state
        #: Messages given to the trio task (the loop's thread counts) and answered by it (the
        #: task counts, once each one's answers are queued): the loop's thread answers a
        #: message itself only while the two are equal, so answers keep Envoy's order.
        self.given = 0
        self.answered = 0
        #: The call ended before the task (`_END` given to it once it had answered all).
        self.released = False
        #: Messages the task took (`__anext__`).
        self._taken = 0
        #: Envoy's messages, then `_END` (the loop's thread puts, the trio task takes).
        self.requests = _Queue(_LoopWaiter(loop), _TrioWaiter(inbox))
        #: The picker's answers, then `_END`, `_GONE` or the exception that ended it.
        self.responses = _Queue(_TrioWaiter(inbox), _LoopWaiter(loop))
        #: What the loop's thread waits on when its own answers (`ExtProcStream.answer_now`)
        #: fill `responses`: it reads no more of the stream until they are taken to be sent,
        #: so gRPC's flow control holds back a gateway that does not read its answers.
        self.room = _LoopWaiter(loop)
        #: Cancelled (in the trio thread) when the gRPC call ends first: a dropped stream.
        self.scope = trio.CancelScope()
        #: The trio task was started (the loop's thread sets it, with the first message).
        self.spawned = False
        #: The trio task has ended (it sets it, before its last `responses` item).
        self.finished = False
        #: Messages taken from `requests`, not yet given to the picker.
        self._pending: collections.deque[Any] = collections.deque()

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> ProcessingRequest:
        """Envoy's next message, in the trio task (StopAsyncIteration: its half-close)."""
        # Asked for the next message: the previous one's answers are all queued.
        self.answered = self._taken
        queue = self.requests
        while not self._pending:
            items = queue.take()
            if items is None:
                await queue.consumer.wait()
            else:
                self._pending.extend(items)
        item = self._pending.popleft()
        if item is _END:
            self._pending.appendleft(_END)
            raise StopAsyncIteration
        if isinstance(item, Exception):  # _Unreadable, or `answer_now` failed
            self._pending.appendleft(item)
            raise item
        self._taken += 1
        return item

    async def answer(self, picker: ExtProcPicker) -> None:
        """The trio task: run the picker over the stream, hand its answers to the loop."""
        queue = self.responses
        end: object = _GONE
        try:
            with self.scope:
                batches = picker.process_batches(self, self.state)
                async with contextlib.aclosing(batches):
                    async for batch in batches:
                        # The whole batch is queued before the picker reads on (`answered`
                        # counts it then), in parts when it passes the window.
                        await queue.put_all_waiting(batch)
                    end = _END
        except _Unreadable as exc:
            _logger.warning("an ext_proc stream ended: %s", exc)
            end = exc
        except Exception as exc:
            _logger.exception("the ext_proc stream failed")
            end = exc
        finally:
            self.finished = True
            queue.put(end)

    def cancel(self) -> None:
        """End the trio task (the trio thread): the gateway dropped the stream."""
        self.scope.cancel()


class _Server:
    """grpc.aio servers on an asyncio loop run by `run` in a thread; the trio side starts
    it, spawns each stream's task in ``nursery`` and stops it with `stop`."""

    def __init__(
        self,
        picker: ExtProcPicker,
        nursery: trio.Nursery,
        binds: list[tuple[str, int, bool]],
        tls: ExtProcTLS | None = None,
    ) -> None:
        self.picker = picker
        #: TLS on the ext_proc port (None: h2c); the health-only port stays h2c.
        self.tls = tls
        self.nursery = nursery
        self.token = trio.lowlevel.current_trio_token()
        self.inbox = _Inbox(self.token)
        self.loop = asyncio.new_event_loop()
        #: (host, port, whether ext_proc is served there besides the health check).
        self.binds = binds
        #: Set (in the trio thread) once the ports are bound or binding failed.
        self.started = trio.Event()
        #: Set (in the trio thread) once the thread's loop has ended, however.
        self.ended = trio.Event()
        self.addresses: list[str] = []
        #: What ended the thread's loop other than `stop` (a port not bound, a failure).
        self.error: BaseException | None = None
        self._stop = asyncio.Event()
        self._servers: list[grpc.aio.Server] = []
        #: The ext_proc calls open now (their handlers' tasks) -> their streams.
        self._calls: dict[asyncio.Task[Any], _Stream] = {}
        #: Set once the server stops: no stream's task starts any more.
        self._stopping = False

    # -- the thread ---------------------------------------------------------------------------

    def run(self) -> None:
        """The thread: the loop, until `stop` (or a failure: `error`)."""
        main = self.loop.create_task(self._main())
        try:
            self.loop.run_until_complete(main)
        except BaseException as exc:  # reported to the trio side, which raises it
            self.error = exc
            # The loop stopped early (or a handler raised a BaseException): `_main`'s
            # cleanup still stops grpcio's servers, closing their ports.
            main.cancel()
            with contextlib.suppress(BaseException):
                self.loop.run_until_complete(main)
        finally:
            self.loop.close()
            self._report(self.started)
            self._report(self.ended)

    async def _main(self) -> None:
        try:
            for host, port, process in self.binds:
                server = grpc.aio.server(options=_SERVER_OPTIONS)
                self._servers.append(server)
                server.add_generic_rpc_handlers((self._handlers(process=process),))
                address = host_port(host, port)
                try:
                    if self.tls is not None and process:
                        bound = server.add_secure_port(address, self.tls.credentials())
                    else:
                        bound = server.add_insecure_port(address)
                except RuntimeError as exc:
                    # grpcio says only "Failed to bind": the errno is the reason a bind gives.
                    code = _bind_errno(host, port)
                    if code is None and self.tls is not None and process:
                        # The port binds: what grpcio refused is the certificate or its key.
                        raise ConfigError(
                            f"cannot serve TLS on {address}: grpcio refused the {self.tls.source} "
                            f"or its key (the port is free); give a certificate with a key of "
                            f"these: {SERVABLE_KEYS}"
                        ) from None
                    reason = os.strerror(code) if code is not None else str(exc)
                    raise OSError(code, f"cannot listen on {address}: {reason}", address) from None
                self.addresses.append(host_port(host, bound))
            for server in self._servers:
                await server.start()
            self._report(self.started)
            await self._stop.wait()
            await self._answer_calls()
        finally:
            # No grace: the streams were answered above (or given up on after a while).
            await asyncio.gather(*(server.stop(None) for server in self._servers))

    async def _answer_calls(self) -> None:
        """Let the open streams end before the servers stop (the loop's thread): the trio
        side has cancelled their tasks, each answered UNAVAILABLE as it ends; a stream whose
        task has not started is answered so now. Waits `_ANSWER_TIMEOUT` at most."""
        self._stopping = True
        for stream in self._calls.values():
            if not stream.spawned:
                stream.responses.put(_GONE)
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=_ANSWER_TIMEOUT)

    def _report(self, event: trio.Event) -> None:
        """Set ``event`` in the trio thread (unless the trio run is over)."""
        try:
            self.token.run_sync_soon(event.set)
        except trio.RunFinishedError:
            pass

    def stop(self) -> None:
        """Stop the servers and end the thread's loop (any thread; idempotent)."""
        try:
            self.loop.call_soon_threadsafe(self._stop.set)
        except RuntimeError:
            pass  # the loop is closed already

    # -- the handlers (in the loop's thread) ------------------------------------------------------

    def _handlers(self, *, process: bool) -> grpc.GenericRpcHandler:
        methods: dict[str, grpc.RpcMethodHandler] = {}
        if process:
            methods["Process"] = grpc.stream_stream_rpc_method_handler(
                self._process,
                request_deserializer=ProcessingRequest.FromString,
                response_serializer=ProcessingResponse.SerializeToString,
            )
        handler = grpc.method_handlers_generic_handler(EXT_PROC_SERVICE, methods)
        health = grpc.method_handlers_generic_handler(
            _HEALTH_SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self._check,
                    request_deserializer=HealthCheckRequest.FromString,
                    response_serializer=HealthCheckResponse.SerializeToString,
                )
            },
        )
        return _Handlers((handler, health))

    async def _process(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        stream = _Stream(self.inbox, self.loop, self.picker.open_stream())
        call = asyncio.current_task()
        assert call is not None
        self._calls[call] = stream
        reader = asyncio.ensure_future(self._read(context, stream))
        try:
            queue = stream.responses
            while True:
                items = queue.take()
                if items is None:
                    await queue.consumer.wait()
                    continue
                for item in items:
                    if item is _END:
                        return
                    if item is _GONE:
                        await context.abort(
                            grpc.StatusCode.UNAVAILABLE, "the endpoint picker is stopping"
                        )
                    if isinstance(item, _Unreadable):
                        await context.abort(item.code, str(item))
                    if isinstance(item, BaseException):
                        await context.abort(
                            grpc.StatusCode.INTERNAL, f"the endpoint picker failed: {item!r}"
                        )
                    await context.write(item)
        finally:
            del self._calls[call]
            reader.cancel()
            if stream.spawned and not stream.finished and not stream.released:
                # The call ended first (the gateway dropped the stream, or a write failed):
                # the picker's task ends too, freeing the request's booking.
                self.inbox.post(stream.cancel)

    async def _read(self, context: grpc.aio.ServicerContext, stream: _Stream) -> None:
        """Hand the stream's messages to its trio task, then `_END` (or `_Unreadable`: the
        picker's iteration raises it). The task starts with the first message (one wake-up of
        the trio thread for both)."""
        queue = stream.requests
        while True:
            try:
                message = await context.read()
            except Exception as exc:
                # Not a ProcessingRequest (or a broken call): the task's iteration raises it,
                # ending the task (its booking freed), which ends the call with its status.
                error = _Unreadable(exc)
                if stream.spawned:
                    queue.put(error)
                else:
                    stream.responses.put(error)
                return
            if message is grpc.aio.EOF:
                if not stream.spawned:
                    stream.responses.put(_END)  # nothing booked: nothing to free
                    return
                queue.put(_END)
                if stream.given == stream.answered:
                    # The task has queued every answer it owes: all it does with this `_END`
                    # is free the booking (`ExtProcStream.close`), which answers nothing. The
                    # call ends now, without a wake-up of this thread from trio for it.
                    stream.released = True
                    stream.responses.put(_END)
                return
            if stream.finished:
                continue  # the picker ended the stream (an ImmediateResponse): ignored
            if stream.given == stream.answered:
                try:
                    answers = self._answer_now(stream, message)
                except Exception as exc:
                    # As when the trio task answers: the stream ends INTERNAL, and the task
                    # (its iteration raises it; it logs it) frees the booking.
                    if stream.spawned:
                        queue.put(exc)
                    else:
                        _logger.exception("the ext_proc stream failed")
                        stream.responses.put(exc)
                    return
                if answers is not None:
                    # No more of the stream is read until they are all queued (in parts
                    # when they pass the window), so gRPC's flow control holds back Envoy.
                    await stream.responses.put_all_waiting(answers, stream.room)
                    continue
            stream.given += 1
            full = queue.put(message)
            if not stream.spawned:
                if self._stopping:
                    stream.responses.put(_GONE)  # no new stream's task once the server stops
                    return
                stream.spawned = True
                if not self.inbox.post(self._spawn, stream):
                    stream.responses.put(_GONE)
                    return
            if full:
                await queue.producer.wait()

    def _answer_now(
        self, stream: _Stream, message: ProcessingRequest
    ) -> list[ProcessingResponse] | None:
        """The answers to ``message`` if it needs no router state (the loop's thread), to
        queue to `_Stream.responses` with ``stream.room``, its bookkeeping handed to the trio
        thread without waiting for it. None: it needs the trio task. Raises what
        `ExtProcStream.answer_now` raises."""
        state = stream.state
        answers = state.answer_now(message)
        if answers is not None and state.chores:
            chores, state.chores = state.chores, []
            self.inbox.post(state.run_chores, chores)
        return answers

    def _spawn(self, stream: _Stream) -> None:
        """Start ``stream``'s trio task (the trio thread)."""
        try:
            self.nursery.start_soon(stream.answer, self.picker)
        except RuntimeError:
            stream.responses.put(_GONE)  # the server is stopping: no new streams

    async def _check(
        self, request: HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> HealthCheckResponse:
        service = request.service
        if service == "liveness":
            return HealthCheckResponse(status=_SERVING)
        if service in ("", "readiness", EXT_PROC_SERVICE):
            ready = await self._in_trio(lambda: self.picker.ready)
            return HealthCheckResponse(status=_SERVING if ready else _NOT_SERVING)
        await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
        raise AssertionError("abort raises")

    async def _in_trio(self, function: Callable[[], bool]) -> bool:
        """``function()`` called in the trio thread (the picker's state lives there)."""
        loop = self.loop
        future: asyncio.Future[bool] = loop.create_future()

        def call() -> None:
            # A callback of the trio thread must not raise: the loop may be closed by now.
            with contextlib.suppress(RuntimeError):
                try:
                    result: Any = function()
                except Exception as exc:
                    result = exc
                loop.call_soon_threadsafe(_settle, future, result)

        self.token.run_sync_soon(call)
        return await future


class _Handlers(grpc.GenericRpcHandler):
    """The first of ``handlers`` that knows the method."""

    def __init__(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        for handler in self._handlers:
            found = handler.service(handler_call_details)
            if found is not None:
                return found
        return None


async def serve_ext_proc(
    picker: ExtProcPicker,
    host: str,
    port: int,
    *,
    health_port: int | None = None,
    tls: ExtProcTLS | None = None,
    task_status: trio.TaskStatus[tuple[str, str | None]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``picker`` (``.../ExternalProcessor/Process`` and the gRPC health check) on
    ``host:port`` over h2c (with ``tls``: over TLS, HTTP/2 by ALPN), and the health check alone
    on ``host:health_port`` if given (always h2c, as GAIE's picker serves it: Kubernetes' gRPC
    probes speak no TLS, and it tells nothing but SERVING or not), until cancelled. Use with
    ``nursery.start``: it reports where each listens (``host:port``, ``[v6]:port``; port 0: a
    free one). Runs grpcio's server in a thread of its own. When
    cancelled, the open streams' tasks are cancelled (their bookings freed) and the streams
    answered UNAVAILABLE (for `_ANSWER_TIMEOUT` at most), then the servers stop and the thread
    ends; a thread that has not ended `_JOIN_TIMEOUT` after is left behind (a daemon) with a
    warning.

    Raises:
        OSError: an address cannot be bound (``filename`` is that address; ``errno`` why, or
            None if not known).
        ConfigError: grpcio refused ``tls`` (its certificate's key; the port binds).
        BaseException: whatever ended the server's thread early (raised when it ends).
    """
    binds = [(host, port, True)]
    if health_port is not None:
        binds.append((host, health_port, False))
    async with trio.open_nursery() as nursery:
        server = _Server(picker, nursery, binds, tls)
        thread = threading.Thread(target=server.run, name="interlock-ext-proc", daemon=True)
        thread.start()
        try:
            await server.started.wait()
            if server.error is None:
                found = server.addresses
                task_status.started((found[0], found[1] if len(found) > 1 else None))
                # Until cancelled: the thread ends first only if it failed (`server.error`).
                await server.ended.wait()
        finally:
            # The streams' tasks end first (each frees its booking); the thread answers their
            # calls, then stops the servers.
            nursery.cancel_scope.cancel()
            server.stop()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join, _JOIN_TIMEOUT)
            if thread.is_alive():
                _logger.warning(
                    "the ext_proc server's thread (%s) has not ended %s s after being asked to "
                    "stop (grpcio's shutdown is stuck): it is left behind, so the process can exit",
                    thread.name,
                    _JOIN_TIMEOUT,
                )
            elif server.error is not None:
                raise server.error
        raise RuntimeError("the ext_proc server's thread ended by itself")


def _bind_errno(host: str, port: int) -> int | None:
    """Why ``host:port`` cannot be bound, as an errno: a bind of each of its addresses (as
    grpcio's listeners bind); None when that is not known (the name does not resolve, or the
    binds work now)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:  # gaierror: its codes are not errnos
        return None
    for family, kind, proto, _, address in found:
        try:
            with socket.socket(family, kind, proto) as probe:
                # grpcio sets it too: a port left in TIME_WAIT binds.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            return exc.errno
    return None
